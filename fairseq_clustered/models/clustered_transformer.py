"""Translation: ``clustered_transformer`` and the size variants of fairseq's ``transformer``.

fairseq's transformer with a clustered encoder self-attention; the decoder is
fairseq's own (exact). Every ``transformer_*`` architecture has a
``clustered_transformer_*`` twin with the same sizes; the ``--clustered-*`` options
(see :mod:`fairseq_clustered.modules.config`) choose the attention.
"""

from __future__ import annotations

import argparse

from fairseq.models import register_model
from fairseq.models.transformer import transformer_legacy
from fairseq.models.transformer.transformer_legacy import TransformerModel
from omegaconf import OmegaConf

from ..modules import (
    ClusteredAttentionSettings,
    ClusteredTransformerEncoderBase,
    add_clustered_attention_args,
    set_clustered_attention_defaults,
)
from .twins import register_clustered_twin


@register_model("clustered_transformer")
class ClusteredTransformerModel(TransformerModel):
    """fairseq's ``TransformerModel`` whose encoder self-attention is clustered."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_clustered_attention_args(parser)

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            # fairseq-hydra-train hands a DictConfig; TransformerConfig.from_namespace keeps
            # options it does not declare (ours) only from a namespace.
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
        set_clustered_attention_defaults(args)
        ClusteredAttentionSettings.from_args(args)  # refuse bad options before building anything
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return ClusteredTransformerEncoderBase(
            cfg, src_dict, embed_tokens, settings=ClusteredAttentionSettings.from_args(cfg)
        )


for _arch, _fn in [
    ("transformer", transformer_legacy.base_architecture),
    ("transformer_tiny", transformer_legacy.tiny_architecture),
    ("transformer_iwslt_de_en", transformer_legacy.transformer_iwslt_de_en),
    ("transformer_wmt_en_de", transformer_legacy.transformer_wmt_en_de),
    ("transformer_vaswani_wmt_en_de_big", transformer_legacy.transformer_vaswani_wmt_en_de_big),
    ("transformer_vaswani_wmt_en_fr_big", transformer_legacy.transformer_vaswani_wmt_en_fr_big),
    ("transformer_wmt_en_de_big", transformer_legacy.transformer_wmt_en_de_big),
    ("transformer_wmt_en_de_big_t2t", transformer_legacy.transformer_wmt_en_de_big_t2t),
]:
    register_clustered_twin("clustered_transformer", _arch, _fn)
