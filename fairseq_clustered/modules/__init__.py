"""fairseq modules: clustered multi-head attention and the encoder layers built on it."""

from .clustered_multihead_attention import ClusteredMultiheadAttention
from .config import (
    ATTENTION_VARIANTS,
    LEAK_MESSAGE,
    ClusteredAttentionConfig,
    ClusteredAttentionSettings,
    add_clustered_attention_args,
    set_clustered_attention_defaults,
)
from .transformer_layer import (
    ClusteredTransformerEncoder,
    ClusteredTransformerEncoderBase,
    ClusteredTransformerEncoderLayerBase,
    build_clustered_encoder_layer,
    describe_encoder_attention,
)

__all__ = [
    "ATTENTION_VARIANTS",
    "LEAK_MESSAGE",
    "ClusteredAttentionConfig",
    "ClusteredAttentionSettings",
    "ClusteredMultiheadAttention",
    "ClusteredTransformerEncoder",
    "ClusteredTransformerEncoderBase",
    "ClusteredTransformerEncoderLayerBase",
    "add_clustered_attention_args",
    "build_clustered_encoder_layer",
    "describe_encoder_attention",
    "set_clustered_attention_defaults",
]
