"""Masked LM / RoBERTa-style encoders: ``clustered_roberta_base``, ``_large``, ``_tiny``.

fairseq's ``roberta`` with a clustered encoder self-attention; the LM head,
classification heads and everything else are fairseq's.
"""

from __future__ import annotations

from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta import model as roberta
from fairseq.models.roberta.model import RobertaEncoder, RobertaModel
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from fairseq.utils import safe_getattr, safe_hasattr
from omegaconf import OmegaConf

from ..modules import (
    ClusteredAttentionSettings,
    ClusteredTransformerEncoder,
    add_clustered_attention_args,
    set_clustered_attention_defaults,
)


class ClusteredRobertaEncoder(RobertaEncoder):
    """fairseq's RoBERTa encoder whose sentence encoder is a :class:`ClusteredTransformerEncoder`."""

    def build_encoder(self, args, dictionary, embed_tokens):
        encoder = ClusteredTransformerEncoder(args, dictionary, embed_tokens)
        encoder.apply(init_bert_params)
        return encoder


@register_model("clustered_roberta")
class ClusteredRobertaModel(RobertaModel):
    """fairseq's ``RobertaModel`` with clustered encoder self-attention."""

    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        add_clustered_attention_args(parser)

    @classmethod
    def build_model(cls, args, task):
        # As fairseq's RobertaModel.build_model, with the clustered encoder.
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, False)
        set_clustered_attention_defaults(args)
        ClusteredAttentionSettings.from_args(args)  # refuse bad options before building anything
        roberta.base_architecture(args)
        if not safe_hasattr(args, "max_positions"):
            if not safe_hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        encoder = ClusteredRobertaEncoder(args, task.source_dictionary)
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, True)
        return cls(args, encoder)


@register_model_architecture("clustered_roberta", "clustered_roberta")
def clustered_roberta_architecture(args):
    set_clustered_attention_defaults(args)
    roberta.base_architecture(args)


@register_model_architecture("clustered_roberta", "clustered_roberta_base")
def clustered_roberta_base_architecture(args):
    set_clustered_attention_defaults(args)
    roberta.roberta_base_architecture(args)


@register_model_architecture("clustered_roberta", "clustered_roberta_large")
def clustered_roberta_large_architecture(args):
    set_clustered_attention_defaults(args)
    roberta.roberta_large_architecture(args)


@register_model_architecture("clustered_roberta", "clustered_roberta_tiny")
def clustered_roberta_tiny_architecture(args):
    """2 layers of width 64 (tests and smoke runs)."""
    args.encoder_layers = safe_getattr(args, "encoder_layers", 2)
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 4)
    clustered_roberta_architecture(args)
