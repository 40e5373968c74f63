"""``ClusteredMultiheadAttention``: a drop-in for fairseq's ``MultiheadAttention``.

Same constructor arguments, same ``forward`` signature, same parameters
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), so a checkpoint trained with full
attention loads into a clustered model and back without conversion. At a clustered
site (encoder self-attention) the attention itself is computed by
:func:`fairseq_clustered.ops.clustered_attention` or
:func:`fairseq_clustered.ops.improved_clustered_attention`; everywhere else, and
wherever clustering would gain nothing, it is fairseq's own exact attention.

When is it exact? (``attention`` is ``'full'``; or incremental decoding; or
``static_kv``; or the sequence is shorter than ``min_length``). Otherwise the
queries of each (sequence, head) are clustered and the result is approximate
(exact again when ``num_clusters`` >= the number of valid queries).

Randomness: the hash hyperplanes come from generators owned by the module and
seeded with ``seed`` and ``layer_index``. In training they are redrawn at every
forward (from a generator on the input's device, which also draws the attention
dropout mask); in ``eval()`` one fixed set of planes, drawn from a fresh CPU
generator with the same seed, is used, so evaluation is reproducible run to run
and machine to machine. Neither the generators nor the planes are part of the
``state_dict``, so checkpoints of full and clustered models are interchangeable.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor

from .. import ops
from .config import ATTENTION_VARIANTS, LEAK_MESSAGE, ClusteredAttentionSettings

# Mixes the model seed and the layer index into one generator seed, so that layers
# draw different planes and (seed, layer) pairs do not collide for small seeds.
_LAYER_SEED_STRIDE = 1_000_003


class ClusteredMultiheadAttention(MultiheadAttention):
    """Multi-head attention whose self-attention may cluster its queries.

    Args:
        embed_dim ... xformers_blocksparse_blocksize: as fairseq's ``MultiheadAttention``.
        attention: ``'full'`` (fairseq's exact attention), ``'clustered'`` or ``'improved'``.
        num_clusters, iterations, bits, topk: clustering parameters (see :mod:`fairseq_clustered.ops`).
        min_length: sequences (padded length) shorter than this use exact attention.
        seed, layer_index: seed the module's hash-plane generators.
        causal: True for a decoder (causal) self-attention site.

    Clustering is refused (``ValueError``) at a decoder site: cross-attention
    (``encoder_decoder_attention=True``), causal self-attention (``causal=True``) or any
    attention that is not self-attention, because a cluster centroid mixes queries from
    later target positions (DESIGN.md section 2).

    ``forward`` at a clustered site: ``attn_mask`` is an error (clustered attention has
    no per-query mask), ``before_softmax`` and ``need_head_weights`` are errors (there is
    no per-query weight matrix), and ``need_weights=True`` returns ``None`` weights.
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
        attention: str = "clustered",
        num_clusters: int = ops.DEFAULT_NUM_CLUSTERS,
        iterations: int = ops.DEFAULT_ITERATIONS,
        bits: int = ops.DEFAULT_BITS,
        topk: int = ops.DEFAULT_TOPK,
        min_length: int = 0,
        seed: int = 1,
        layer_index: int = 0,
        causal: bool = False,
    ):
        super().__init__(
            embed_dim, num_heads, kdim=kdim, vdim=vdim, dropout=dropout, bias=bias,
            add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, self_attention=self_attention,
            encoder_decoder_attention=encoder_decoder_attention, dictionary=dictionary,
            q_noise=q_noise, qn_block_size=qn_block_size, xformers_att_config=xformers_att_config,
            xformers_blocksparse_layout=xformers_blocksparse_layout,
            xformers_blocksparse_blocksize=xformers_blocksparse_blocksize,
        )
        if self.use_xformers:
            # fairseq keeps its xformers attention in self.attention, the name of our variant.
            raise ValueError(
                "xformers_att_config (--encoder-xformers-att-config) is not supported by "
                "ClusteredMultiheadAttention; leave it unset"
            )
        if attention not in ATTENTION_VARIANTS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_VARIANTS)}; got {attention!r}")
        if attention != "full":
            if encoder_decoder_attention or causal or not self_attention:
                site = (
                    "encoder-decoder attention" if encoder_decoder_attention
                    else "causal self-attention" if causal else "attention over another sequence"
                )
                raise ValueError(f"attention={attention!r}: " + LEAK_MESSAGE.format(site=site))
            if add_bias_kv or add_zero_attn:
                raise ValueError(
                    f"attention={attention!r} does not support add_bias_kv or add_zero_attn; "
                    "use attention='full' with them"
                )
        # Validates the clustering parameters with the command-line names in the message.
        ClusteredAttentionSettings(
            attention=attention, num_clusters=num_clusters, iterations=iterations, bits=bits,
            topk=topk, min_length=min_length, seed=seed,
        )
        self.attention = attention
        self.num_clusters = num_clusters
        self.iterations = iterations
        self.bits = bits
        self.topk = topk
        self.min_length = min_length
        self.causal = causal
        self.layer_index = layer_index
        self.seed = seed
        self.plane_seed = (seed * _LAYER_SEED_STRIDE + layer_index) % (2**63)
        # Plain attributes, not buffers: never saved in (or required by) a state_dict.
        self._training_generators: Dict[torch.device, torch.Generator] = {}
        self._eval_planes: Dict[torch.device, Tensor] = {}

    @classmethod
    def from_settings(cls, embed_dim, num_heads, settings: ClusteredAttentionSettings,
                      attention: str, layer_index: int, **kwargs) -> "ClusteredMultiheadAttention":
        """Build from validated model options; ``attention`` is this site's variant."""
        return cls(
            embed_dim, num_heads, attention=attention, num_clusters=settings.num_clusters,
            iterations=settings.iterations, bits=settings.bits, topk=settings.topk,
            min_length=settings.min_length, seed=settings.seed, layer_index=layer_index, **kwargs,
        )

    def extra_repr(self) -> str:
        text = f"attention={self.attention}"
        if self.attention != "full":
            text += (f", num_clusters={self.num_clusters}, iterations={self.iterations}, "
                     f"bits={self.bits}, min_length={self.min_length}, layer_index={self.layer_index}")
            if self.attention == "improved":
                text += f", topk={self.topk}"
        return text

    # ------------------------------------------------------------------ randomness

    def _training_generator(self, device: torch.device) -> torch.Generator:
        """The generator of hash planes and dropout masks on ``device`` (created once, seeded)."""
        generator = self._training_generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.plane_seed)
            self._training_generators[device] = generator
        return generator

    def _fixed_planes(self, dim: int, device: torch.device) -> Tensor:
        """Evaluation planes ``(bits, dim)``: always the same for this seed and layer."""
        planes = self._eval_planes.get(device)
        if planes is None or planes.shape != (self.bits, dim):
            cpu_generator = torch.Generator().manual_seed(self.plane_seed)
            planes = ops.draw_hash_planes(self.bits, dim, cpu_generator, device=device)
            self._eval_planes[device] = planes
        return planes

    # --------------------------------------------------------------------- forward

    def uses_clustering(self, length: int, incremental_state=None, static_kv: bool = False) -> bool:
        """True when a forward over ``length`` positions takes the clustered path."""
        return (
            self.attention != "full"
            and incremental_state is None
            and not static_kv
            and length >= self.min_length
        )

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
        """Input ``query`` (and ``key``/``value``, ignored for self-attention): ``(T, B, C)``.

        ``key_padding_mask``: ``(B, T)``, True (or non-zero) at padded positions.
        Returns ``(attn (T, B, C), weights)``; ``weights`` is None at a clustered site.
        Other arguments as in fairseq's ``MultiheadAttention.forward``.
        """
        length = query.size(0)
        if not self.uses_clustering(length, incremental_state, static_kv):
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask,
                incremental_state=incremental_state, need_weights=need_weights,
                static_kv=static_kv, attn_mask=attn_mask, before_softmax=before_softmax,
                need_head_weights=need_head_weights,
            )
        if attn_mask is not None:
            raise ValueError(
                f"attn_mask is not supported with attention={self.attention!r} (layer "
                f"{self.layer_index}): clustered attention shares one attention row per cluster, "
                "so per-query masks cannot be honoured; use attention='full' for this layer"
            )
        if before_softmax or need_head_weights:
            raise ValueError(
                f"before_softmax / need_head_weights need a per-query attention matrix, which "
                f"attention={self.attention!r} never forms; use attention='full'"
            )
        return self._clustered_forward(query, key_padding_mask), None

    def _split_heads(self, x: Tensor) -> Tensor:
        """``(T, B, H*Dh)`` -> ``(B, H, T, Dh)`` (a view)."""
        length, batch, _ = x.shape
        return x.view(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def _clustered_forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        """Clustered self-attention of ``x (T, B, C)`` -> ``(T, B, C)``."""
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
        common = dict(
            num_clusters=self.num_clusters, iterations=self.iterations, bits=self.bits,
            planes=planes, generator=generator, scale=self.scaling, dropout_p=float(dropout_p),
        )
        # Self-attention: the key padding mask is also the query padding mask, so padded
        # positions join no cluster (their output is zero; nothing downstream reads it).
        if self.attention == "improved":
            out = ops.improved_clustered_attention(
                q, k, v, key_padding_mask, key_padding_mask, topk=self.topk, **common
            )
        else:
            out = ops.clustered_attention(q, k, v, key_padding_mask, key_padding_mask, **common)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, embed_dim)
        return self.out_proj(out)
