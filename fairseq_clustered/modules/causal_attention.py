"""``CausalClusteredMultiheadAttention``: leak-free clustered attention for decoder self-attention.

A drop-in for fairseq's ``MultiheadAttention`` at a *causal self-attention* site (the
decoder of a language model or of a translation model): same constructor arguments,
same ``forward`` signature, same parameters (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``), so checkpoints move between full and clustered models unchanged.

Over a whole sequence (training, ``fairseq-eval-lm``, teacher forcing) it computes
:func:`fairseq_clustered.ops.causal_clustered_attention`: exact attention to the last
``window`` to ``2 window - 1`` positions plus ``num_clusters`` key-cluster summaries of
the older past, which never reads a later position (see :mod:`fairseq_clustered.ops.causal`).
Incremental decoding (one new query per step, ``incremental_state``) is fairseq's exact
attention over the key/value cache (DESIGN.md section 2), which is already O(S) per step.
It equals the whole-sequence result wherever that is exact (sequences of at most
``2 window`` positions); beyond, the step sees the exact past where the sequence pass
saw summaries of it.

Randomness is :class:`~fairseq_clustered.modules.ClusteredMultiheadAttention`'s: hash
planes redrawn each training forward from a module-owned generator seeded with
``seed`` and ``layer_index``, one fixed set of planes in ``eval()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from fairseq.modules import MultiheadAttention
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from torch import Tensor

from .. import ops
from ..ops import causal as causal_ops
from .clustered_multihead_attention import ClusteredMultiheadAttention
from .config import ClusteredAttentionSettings, parse_layers, variant_for_layer

CAUSAL_VARIANTS = ("full", "causal_clustered")


class CausalClusteredMultiheadAttention(ClusteredMultiheadAttention):
    """Causal self-attention with exact recent past and clustered distant past.

    Args:
        embed_dim ... xformers_blocksparse_blocksize: as fairseq's ``MultiheadAttention``;
            must describe a self-attention (``self_attention=True``, no
            ``encoder_decoder_attention``, ``add_bias_kv``, ``add_zero_attn`` or xformers).
        attention: ``'causal_clustered'`` or ``'full'`` (fairseq's exact attention).
        window: chunk size ``W`` (each query sees its last ``W`` to ``2W - 1`` positions exactly).
        num_clusters, iterations, bits: key clustering of the older past.
        seed, layer_index: seed the hash-plane generators.

    ``forward`` over a sequence: ``attn_mask`` must be None or fairseq's future mask
    (``-inf`` above the diagonal), which this attention implies anyway; any other mask is an
    error. ``before_softmax`` / ``need_head_weights`` are errors and ``need_weights`` returns
    None weights: no per-query attention matrix is ever formed.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        kdim=None,
        vdim=None,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        self_attention=False,
        encoder_decoder_attention=False,
        dictionary=None,
        q_noise=0.0,
        qn_block_size=8,
        xformers_att_config: Optional[str] = None,
        xformers_blocksparse_layout: Optional[torch.Tensor] = None,
        xformers_blocksparse_blocksize: Optional[int] = 16,
        *,
        attention: str = "causal_clustered",
        window: int = causal_ops.DEFAULT_WINDOW,
        num_clusters: int = causal_ops.DEFAULT_NUM_CLUSTERS,
        iterations: int = ops.DEFAULT_ITERATIONS,
        bits: int = ops.DEFAULT_BITS,
        seed: int = 1,
        layer_index: int = 0,
    ):
        # The parent builds the projections, generators and plane cache; it is told 'full'
        # because its own (query-)clustered variants are refused at a causal site.
        super().__init__(
            embed_dim, num_heads, kdim=kdim, vdim=vdim, dropout=dropout, bias=bias,
            add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, self_attention=self_attention,
            encoder_decoder_attention=encoder_decoder_attention, dictionary=dictionary,
            q_noise=q_noise, qn_block_size=qn_block_size, xformers_att_config=xformers_att_config,
            xformers_blocksparse_layout=xformers_blocksparse_layout,
            xformers_blocksparse_blocksize=xformers_blocksparse_blocksize,
            attention="full", num_clusters=num_clusters, iterations=iterations, bits=bits,
            seed=seed, layer_index=layer_index, causal=True,
        )
        if attention not in CAUSAL_VARIANTS:
            raise ValueError(f"attention must be one of {', '.join(CAUSAL_VARIANTS)}; got {attention!r}")
        if attention != "full":
            if encoder_decoder_attention or not self_attention:
                raise ValueError(
                    f"attention={attention!r} is causal *self*-attention; for encoder-decoder attention "
                    "or attention over another sequence use attention='full'"
                )
            if add_bias_kv or add_zero_attn or self.use_xformers:
                raise ValueError(
                    f"attention={attention!r} does not support add_bias_kv, add_zero_attn or "
                    "xformers_att_config; use attention='full' with them"
                )
        ClusteredAttentionSettings(attention="full", num_clusters=num_clusters, iterations=iterations,
                                   bits=bits, seed=seed)
        ops.validation.check_int_range("window", window, 1)
        self.attention = attention
        self.window = window

    def extra_repr(self) -> str:
        text = f"attention={self.attention}"
        if self.attention != "full":
            text += (f", window={self.window}, num_clusters={self.num_clusters}, "
                     f"iterations={self.iterations}, bits={self.bits}, layer_index={self.layer_index}")
        return text

    def uses_clustering(self, length: int, incremental_state=None, static_kv: bool = False) -> bool:
        """True when a forward over ``length`` positions reads cluster summaries (``length > 2W``)."""
        return self.attention != "full" and incremental_state is None and not static_kv \
            and length > 2 * self.window

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Input ``query`` ``(T, B, C)`` (``key``/``value`` are the same sequence and ignored).

        ``key_padding_mask``: ``(B, T)``, True (or non-zero) at padded positions.
        Returns ``(attn (T, B, C), None)``; incremental decoding and ``attention='full'``
        return fairseq's exact result and weights.
        """
        if self.attention == "full" or incremental_state is not None or static_kv:
            return MultiheadAttention.forward(
                self, query, key, value, key_padding_mask=key_padding_mask,
                incremental_state=incremental_state, need_weights=need_weights, static_kv=static_kv,
                attn_mask=attn_mask, before_softmax=before_softmax, need_head_weights=need_head_weights,
            )
        if before_softmax or need_head_weights:
            raise ValueError(
                "before_softmax / need_head_weights need a per-query attention matrix, which "
                "attention='causal_clustered' never forms; use attention='full'"
            )
        self._check_future_mask(attn_mask, query.size(0))
        return self._causal_forward(query, key_padding_mask), None

    @staticmethod
    def _check_future_mask(attn_mask: Optional[Tensor], length: int) -> None:
        """Accept None or fairseq's future mask ``(T, T)``: 0 on and below the diagonal,
        ``-inf`` above. Anything else would be silently ignored, so it is refused."""
        if attn_mask is None:
            return
        future = torch.ones(length, length, dtype=torch.bool, device=attn_mask.device).triu(1)
        if tuple(attn_mask.shape) != (length, length) or not (
            torch.equal(torch.isneginf(attn_mask), future) and bool((attn_mask[~future] == 0).all())
        ):
            raise ValueError(
                f"attn_mask must be None or the ({length}, {length}) causal future mask (-inf above the "
                f"diagonal, 0 elsewhere) with attention='causal_clustered', got shape "
                f"{tuple(attn_mask.shape)} with another pattern; use attention='full' for other masks"
            )

    def _causal_forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        """Causal clustered self-attention of ``x (T, B, C)`` -> ``(T, B, C)``."""
        length, batch, embed_dim = x.shape
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(device=x.device, dtype=torch.bool)
        if self.training:
            generator = self._training_generator(x.device)
            planes = ops.draw_hash_planes(self.bits, self.head_dim, generator, device=x.device)
            dropout_p = self.dropout_module.p
        else:
            planes = self._fixed_planes(self.head_dim, x.device)
            generator = None
            dropout_p = self.dropout_module.p if self.dropout_module.apply_during_inference else 0.0
            if dropout_p > 0.0:
                generator = self._training_generator(x.device)
        out = ops.causal_clustered_attention(
            q, k, v, key_padding_mask, window=self.window, num_clusters=self.num_clusters,
            iterations=self.iterations, bits=self.bits, planes=planes, generator=generator,
            scale=self.scaling, dropout_p=float(dropout_p),
        )
        out = out.permute(2, 0, 1, 3).reshape(length, batch, embed_dim)
        return self.out_proj(out)


# ====================================================================== settings


@dataclass(frozen=True)
class CausalClusteredAttentionSettings:
    """Validated options of a decoder's causal self-attention (``--clustered-*`` flags of
    :mod:`fairseq_clustered.models.clustered_lm`)."""

    attention: str = "causal_clustered"
    window: int = causal_ops.DEFAULT_WINDOW
    num_clusters: int = causal_ops.DEFAULT_NUM_CLUSTERS
    iterations: int = ops.DEFAULT_ITERATIONS
    bits: int = ops.DEFAULT_BITS
    layers: str = "all"
    seed: int = 1

    def __post_init__(self):
        if str(self.attention) not in CAUSAL_VARIANTS:
            raise ValueError(
                f"--clustered-causal-attention must be one of {', '.join(CAUSAL_VARIANTS)}; got {self.attention!r}"
            )
        for flag, value, low, high in (
            ("--clustered-window", self.window, 1, None),
            ("--clustered-num-clusters", self.num_clusters, 1, None),
            ("--clustered-iterations", self.iterations, 0, None),
            ("--clustered-bits", self.bits, 1, 63),
            ("--clustered-seed", self.seed, 0, None),
        ):
            ops.validation.check_int_range(flag, value, low, high)
        parse_layers(self.layers)

    @classmethod
    def from_args(cls, args) -> "CausalClusteredAttentionSettings":
        """Read the options from an argparse Namespace or a DictConfig; missing ones take
        the defaults above, the seed defaults to the run's ``seed``."""
        def get(name, default):
            value = getattr(args, name, None)
            return default if value is None else value

        defaults = cls.__dataclass_fields__
        return cls(
            attention=str(get("clustered_causal_attention", defaults["attention"].default)),
            window=get("clustered_window", defaults["window"].default),
            num_clusters=get("clustered_num_clusters", defaults["num_clusters"].default),
            iterations=get("clustered_iterations", defaults["iterations"].default),
            bits=get("clustered_bits", defaults["bits"].default),
            layers=str(get("clustered_layers", defaults["layers"].default)),
            seed=get("clustered_seed", get("seed", defaults["seed"].default)),
        )

    def variant_for_layer(self, layer_index: int, num_layers: int) -> str:
        """``'causal_clustered'`` or ``'full'`` for decoder layer ``layer_index``."""
        return variant_for_layer(self.layers, self.attention, layer_index, num_layers, "decoder")


# ========================================================================= layer


class CausalClusteredTransformerDecoderLayerBase(TransformerDecoderLayerBase):
    """fairseq's decoder layer whose self-attention is :class:`CausalClusteredMultiheadAttention`.

    Only ``build_self_attention`` differs; encoder-decoder attention (if any) stays exact.

    Args:
        cfg: a ``TransformerConfig``. no_encoder_attn: as fairseq's layer.
        settings: the decoder's causal clustered-attention options.
        layer_index: 0-based index of this layer. num_layers: layers of the decoder.
    """

    def __init__(self, cfg, settings: CausalClusteredAttentionSettings, layer_index: int, num_layers: int,
                 no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False):
        # Read by build_self_attention, which the parent constructor calls.
        self.attention_settings = settings
        self.layer_index = layer_index
        self.num_layers = num_layers
        if cfg.cross_self_attention and settings.variant_for_layer(layer_index, num_layers) != "full":
            raise ValueError("--cross-self-attention is not supported with --clustered-causal-attention="
                             f"{settings.attention}; use 'full'")
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn)

    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        settings = self.attention_settings
        return CausalClusteredMultiheadAttention(
            embed_dim,
            cfg.decoder.attention_heads,
            dropout=cfg.attention_dropout,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            self_attention=not cfg.cross_self_attention,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
            xformers_att_config=cfg.decoder.xformers_att_config,
            attention=settings.variant_for_layer(self.layer_index, self.num_layers),
            window=settings.window,
            num_clusters=settings.num_clusters,
            iterations=settings.iterations,
            bits=settings.bits,
            seed=settings.seed,
            layer_index=self.layer_index,
        )
