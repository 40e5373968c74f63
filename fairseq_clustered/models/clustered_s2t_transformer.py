"""Speech-to-text: ``clustered_s2t_transformer_s/m/l`` (and the other sizes of fairseq's).

fairseq's ``s2t_transformer`` (convolutional subsampler + transformer encoder +
exact transformer decoder) with clustered encoder self-attention. Speech encoders
see long inputs (100 frames per second, subsampled 4x), where clustering pays.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fairseq import checkpoint_utils
from fairseq.models import register_model
from fairseq.models.speech_to_text import s2t_transformer
from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerEncoder, S2TTransformerModel
from fairseq.models.transformer import TransformerConfig
from torch import nn

from ..modules import (
    ClusteredAttentionSettings,
    ClusteredTransformerEncoderLayerBase,
    add_clustered_attention_args,
    describe_encoder_attention,
    set_clustered_attention_defaults,
)
from .twins import register_clustered_twin

logger = logging.getLogger(__name__)


class ClusteredS2TTransformerEncoder(S2TTransformerEncoder):
    """fairseq's speech encoder with :class:`ClusteredTransformerEncoderLayerBase` layers."""

    def __init__(self, args):
        super().__init__(args)
        settings = ClusteredAttentionSettings.from_args(args)
        cfg = TransformerConfig.from_namespace(args)
        # Same attribute name and parameter names as fairseq's layers (checkpoints carry over).
        self.transformer_layers = nn.ModuleList([
            ClusteredTransformerEncoderLayerBase(cfg, settings, index, args.encoder_layers)
            for index in range(args.encoder_layers)
        ])
        logger.info(describe_encoder_attention(self.transformer_layers))


@register_model("clustered_s2t_transformer")
class ClusteredS2TTransformerModel(S2TTransformerModel):
    """fairseq's ``S2TTransformerModel`` with clustered encoder self-attention."""

    @staticmethod
    def add_args(parser):
        S2TTransformerModel.add_args(parser)
        add_clustered_attention_args(parser)

    @classmethod
    def build_encoder(cls, args):
        set_clustered_attention_defaults(args)
        encoder = ClusteredS2TTransformerEncoder(args)
        pretraining_path = getattr(args, "load_pretrained_encoder_from", None)
        if pretraining_path is not None:
            if not Path(pretraining_path).exists():
                logger.warning(f"skipped pretraining because {pretraining_path} does not exist")
            else:
                encoder = checkpoint_utils.load_pretrained_component_from_model(
                    component=encoder, checkpoint=pretraining_path
                )
                logger.info(f"loaded pretrained encoder from: {pretraining_path}")
        return encoder


for _arch in ["s2t_transformer", "s2t_transformer_xs", "s2t_transformer_s", "s2t_transformer_sp",
              "s2t_transformer_m", "s2t_transformer_mp", "s2t_transformer_l", "s2t_transformer_lp"]:
    _fn = getattr(s2t_transformer, "base_architecture" if _arch == "s2t_transformer" else _arch)
    register_clustered_twin("clustered_s2t_transformer", _arch, _fn)
