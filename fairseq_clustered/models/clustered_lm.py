"""``clustered_transformer_lm``: fairseq's transformer language model with leak-free causal
clustered self-attention (:mod:`fairseq_clustered.ops.causal`).

Every architecture of fairseq's ``transformer_lm`` family has a ``clustered_`` twin
(``clustered_transformer_lm``, ``clustered_transformer_lm_gpt``, ``clustered_transformer_lm_big``,
``clustered_transformer_lm_wiki103`` ...) with the same sizes. They train with
``fairseq-train --task language_modeling --arch clustered_transformer_lm_gpt`` and evaluate
with ``fairseq-eval-lm`` (``--user-dir`` on both). Options (flags, or hydra keys with
underscores):

* ``--clustered-causal-attention {causal_clustered,full}``: ``full`` keeps fairseq's exact
  attention (the baseline, with the same parameters and the same initialisation);
* ``--clustered-window W`` (each position sees its last ``W`` to ``2W - 1`` positions exactly),
  ``--clustered-num-clusters C``, ``--clustered-iterations``, ``--clustered-bits``;
* ``--clustered-layers all|none|0,2,...`` (the other layers are exact),
  ``--clustered-seed`` (hash planes; default ``--seed``).

Parameter names are fairseq's, so a ``transformer_lm`` checkpoint loads into a
``clustered_transformer_lm`` of the same size and back.
"""


import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.models import (
    ARCH_CONFIG_REGISTRY,
    ARCH_MODEL_NAME_REGISTRY,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import TransformerConfig, TransformerDecoder
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig
from omegaconf import II

from ..modules.causal_attention import (
    CAUSAL_VARIANTS,
    CausalClusteredAttentionSettings,
    CausalClusteredMultiheadAttention,
    CausalClusteredTransformerDecoderLayerBase,
)
from ..modules.transformer_layer import wrap_layer_like_fairseq
from ..ops import DEFAULT_BITS, DEFAULT_ITERATIONS
from ..ops.causal import DEFAULT_NUM_CLUSTERS, DEFAULT_WINDOW

logger = logging.getLogger(__name__)


@dataclass
class ClusteredTransformerLanguageModelConfig(TransformerLanguageModelConfig):
    """fairseq's ``transformer_lm`` options plus the causal clustered-attention ones."""

    clustered_causal_attention: ChoiceEnum(list(CAUSAL_VARIANTS)) = field(
        default="causal_clustered",
        metadata={"help": "decoder self-attention: 'causal_clustered' (exact recent window plus "
                          "key-cluster summaries of the older past, leak-free) or 'full' (exact)"},
    )
    clustered_window: int = field(
        default=DEFAULT_WINDOW,
        metadata={"help": "chunk size W: each position attends exactly to its last W..2W-1 "
                          "positions; exact attention for sequences of at most 2W"},
    )
    clustered_num_clusters: int = field(
        default=DEFAULT_NUM_CLUSTERS, metadata={"help": "key clusters C summarising the older past"}
    )
    clustered_iterations: int = field(
        default=DEFAULT_ITERATIONS, metadata={"help": "Lloyd iterations of the key codebook fit"}
    )
    clustered_bits: int = field(default=DEFAULT_BITS, metadata={"help": "hash bits per key (1..63)"})
    clustered_layers: str = field(
        default="all",
        metadata={"help": "decoder layers with causal clustered attention: 'all', 'none' or a "
                          "comma list of 0-based indices; the others are exact"},
    )
    clustered_seed: Optional[int] = field(
        default=None, metadata={"help": "seed of the hash hyperplanes (plus the layer index); default: --seed"}
    )
    seed: int = II("common.seed")


class ClusteredCausalTransformerDecoder(TransformerDecoder):
    """fairseq's ``TransformerDecoder`` whose layers use causal clustered self-attention.

    When every layer's self-attention is causal clustered, no ``(T, T)`` future mask is
    built (the attention is causal by construction), so long contexts cost no quadratic
    memory; otherwise fairseq's mask is passed and checked by each clustered layer.
    """

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        self.attention_settings = CausalClusteredAttentionSettings.from_args(args)
        self._layers_built = 0  # gives each layer its index (fairseq builds them in order)
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn,
                         output_projection=output_projection)
        logger.info(self.describe_attention())

    def build_decoder_layer(self, args, no_encoder_attn=False):
        cfg = TransformerConfig.from_namespace(args)
        layer = CausalClusteredTransformerDecoderLayerBase(
            cfg, self.attention_settings, self._layers_built, cfg.decoder.layers, no_encoder_attn=no_encoder_attn
        )
        self._layers_built += 1
        return wrap_layer_like_fairseq(layer, cfg)

    def self_attentions(self):
        """The layers' self-attention modules, in order (found by type, through any wrapper)."""
        return [m for m in self.layers.modules() if isinstance(m, CausalClusteredMultiheadAttention)]

    def describe_attention(self) -> str:
        attentions = self.self_attentions()
        text = "decoder self-attention: " + ", ".join(
            f"layer {index} {attn.attention}" for index, attn in enumerate(attentions)
        )
        clustered = [attn for attn in attentions if attn.attention != "full"]
        if clustered:
            attn = clustered[0]
            text += (f" (window={attn.window}, C={attn.num_clusters}, iterations={attn.iterations}, "
                     f"bits={attn.bits}, seed={self.attention_settings.seed})")
        return text

    def buffered_future_mask(self, tensor):
        attentions = self.self_attentions()
        if attentions and all(attn.attention != "full" for attn in attentions):
            return None
        return super().buffered_future_mask(tensor)


@register_model("clustered_transformer_lm", dataclass=ClusteredTransformerLanguageModelConfig)
class ClusteredTransformerLanguageModel(TransformerLanguageModel):
    """``transformer_lm`` with :class:`ClusteredCausalTransformerDecoder`."""

    @classmethod
    def build_model(cls, args, task):
        # fairseq's build_model makes the embeddings (plain, adaptive or character) and
        # checks the options; its decoder is then replaced by ours, built on the same embeddings.
        base = TransformerLanguageModel.build_model(args, task)
        decoder = ClusteredCausalTransformerDecoder(
            args, task.target_dictionary, base.decoder.embed_tokens, no_encoder_attn=True
        )
        return cls(decoder)


def _mirror(arch: str):
    """Register ``clustered_<arch>`` with the sizes of fairseq's ``<arch>``."""

    def architecture(args):
        ARCH_CONFIG_REGISTRY[arch](args)

    architecture.__name__ = f"clustered_{arch}"
    architecture.__doc__ = f"The sizes of fairseq's ``{arch}`` with causal clustered self-attention."
    register_model_architecture("clustered_transformer_lm", f"clustered_{arch}")(architecture)


MIRRORED_ARCHITECTURES = sorted(
    arch for arch, model in ARCH_MODEL_NAME_REGISTRY.items() if model == "transformer_lm" and arch != "transformer_lm"
)
for _arch in MIRRORED_ARCHITECTURES:
    _mirror(_arch)
