"""Speech-to-text: ``clustered_s2t_transformer_s/m/l`` (and the other sizes of fairseq's).

fairseq's ``s2t_transformer`` (convolutional subsampler + transformer encoder +
exact transformer decoder) with clustered encoder self-attention. Speech encoders
see long inputs (100 frames per second, subsampled 4x), where clustering pays.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fairseq import checkpoint_utils
from fairseq.models import register_model, register_model_architecture
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


def _clustered_twin(fairseq_arch: str, fairseq_arch_fn) -> None:
    """Register ``clustered_<fairseq_arch>``: clustered defaults, then fairseq's sizes."""

    def architecture(args):
        set_clustered_attention_defaults(args)
        fairseq_arch_fn(args)

    architecture.__name__ = f"clustered_{fairseq_arch}"
    architecture.__doc__ = f"fairseq's ``{fairseq_arch}`` sizes with clustered encoder self-attention."
    register_model_architecture("clustered_s2t_transformer", f"clustered_{fairseq_arch}")(architecture)


for _arch in ["s2t_transformer", "s2t_transformer_xs", "s2t_transformer_s", "s2t_transformer_sp",
              "s2t_transformer_m", "s2t_transformer_mp", "s2t_transformer_l", "s2t_transformer_lp"]:
    _clustered_twin(_arch, getattr(s2t_transformer, _arch if _arch != "s2t_transformer" else "base_architecture"))
