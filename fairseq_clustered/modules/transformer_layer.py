"""Transformer encoder layers and encoders whose self-attention may be clustered.

The layer subclass overrides only ``build_self_attention``; the encoder subclasses
only say which layer to build (and give each layer its index, which seeds its hash
planes and selects it through ``--clustered-layers``). Parameter names are fairseq's,
so checkpoints move between these and fairseq's own classes unchanged.
"""

from __future__ import annotations

import logging
from typing import Optional

from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerConfig, TransformerEncoderBase
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase

from .clustered_multihead_attention import ClusteredMultiheadAttention
from .config import ClusteredAttentionSettings

logger = logging.getLogger(__name__)


def describe_encoder_attention(layers) -> str:
    """One line naming each encoder layer's attention, e.g.
    ``encoder self-attention: layer 0 clustered, layer 1 full (C=100, iterations=10, ...)``."""
    # Found by type, not by attribute, so that checkpoint/FSDP wrappers do not hide them.
    attentions = [m for m in layers.modules() if isinstance(m, ClusteredMultiheadAttention)]
    parts = [f"layer {index} {attn.attention}" for index, attn in enumerate(attentions)]
    clustered = [attn for attn in attentions if attn.attention != "full"]
    text = "encoder self-attention: " + ", ".join(parts)
    if clustered:
        attn = clustered[0]
        text += (f" (C={attn.num_clusters}, iterations={attn.iterations}, bits={attn.bits}, "
                 f"topk={attn.topk}, exact below length {attn.min_length}, seed={attn.seed})")
    return text


class ClusteredTransformerEncoderLayerBase(TransformerEncoderLayerBase):
    """fairseq's encoder layer with a :class:`ClusteredMultiheadAttention` self-attention.

    Args:
        cfg: a ``TransformerConfig`` (as for fairseq's ``TransformerEncoderLayerBase``).
        settings: the model's clustered-attention options.
        layer_index: 0-based index of this layer in its encoder.
        num_layers: number of layers of the encoder (to check ``--clustered-layers``).
    """

    def __init__(self, cfg, settings: ClusteredAttentionSettings, layer_index: int,
                 num_layers: int, return_fc: bool = False):
        # Read by build_self_attention, which the parent constructor calls.
        self.attention_settings = settings
        self.layer_index = layer_index
        self.num_layers = num_layers
        super().__init__(cfg, return_fc=return_fc)

    def build_self_attention(self, embed_dim, cfg):
        return ClusteredMultiheadAttention.from_settings(
            embed_dim,
            cfg.encoder.attention_heads,
            self.attention_settings,
            attention=self.attention_settings.variant_for_layer(self.layer_index, self.num_layers),
            layer_index=self.layer_index,
            dropout=cfg.attention_dropout,
            self_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
            xformers_att_config=cfg.encoder.xformers_att_config,
        )


def build_clustered_encoder_layer(cfg, settings: ClusteredAttentionSettings, layer_index: int,
                                  return_fc: bool = False):
    """One layer, wrapped for activation checkpointing / FSDP exactly as fairseq wraps its own."""
    layer = ClusteredTransformerEncoderLayerBase(
        cfg, settings, layer_index, cfg.encoder.layers, return_fc=return_fc
    )
    return wrap_layer_like_fairseq(layer, cfg)


def wrap_layer_like_fairseq(layer, cfg):
    """Wrap a built layer for activation checkpointing and FSDP as fairseq wraps its own."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    # As fairseq: a checkpointed layer is always wrapped by FSDP, whatever its size.
    min_params_to_wrap = cfg.min_params_to_wrap if not checkpoint else 0
    return fsdp_wrap(layer, min_num_params=min_params_to_wrap)


class ClusteredTransformerEncoderBase(TransformerEncoderBase):
    """fairseq's ``TransformerEncoderBase`` built from :class:`ClusteredTransformerEncoderLayerBase`.

    Args: as ``TransformerEncoderBase``, plus ``settings`` (default: read from ``cfg``).
    """

    def __init__(self, cfg, dictionary, embed_tokens, return_fc=False,
                 settings: Optional[ClusteredAttentionSettings] = None):
        self.attention_settings = settings or ClusteredAttentionSettings.from_args(cfg)
        self._layers_built = 0  # the parent builds layers in order; this is the next index
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        logger.info(describe_encoder_attention(self.layers))

    def build_encoder_layer(self, cfg):
        layer_index = self._layers_built
        self._layers_built += 1
        return build_clustered_encoder_layer(
            cfg, self.attention_settings, layer_index, return_fc=self.return_fc
        )


class ClusteredTransformerEncoder(ClusteredTransformerEncoderBase):
    """Legacy-argparse form (``args`` namespace or DictConfig), as fairseq's ``TransformerEncoder``."""

    def __init__(self, args, dictionary, embed_tokens, return_fc=False):
        self.args = args
        super().__init__(
            TransformerConfig.from_namespace(args), dictionary, embed_tokens, return_fc=return_fc,
            settings=ClusteredAttentionSettings.from_args(args),
        )

    def build_encoder_layer(self, args):
        return super().build_encoder_layer(TransformerConfig.from_namespace(args))
