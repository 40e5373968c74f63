"""Clustered-attention options: command-line flags, hydra keys and their validation.

Every fairseq model family of this plugin takes the same ``clustered_*`` options
(``--clustered-attention``, ``--clustered-num-clusters`` ... on the command line, the
same names with underscores in a hydra ``model:`` section). :class:`ClusteredAttentionConfig`
declares them once (name, default, help); :class:`ClusteredAttentionSettings` is the
validated, immutable form that the encoder layers and attention modules receive.
"""

import argparse
from dataclasses import dataclass, field, fields
from typing import Optional, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

ATTENTION_VARIANTS = ("full", "clustered", "improved")
AttentionVariant = ChoiceEnum(list(ATTENTION_VARIANTS))

#: fairseq's default ``--seed``; used for the hash planes when no seed is known.
DEFAULT_SEED = 1

LEAK_MESSAGE = (
    "clustered attention at a decoder site ({site}) would leak future target tokens: a "
    "centroid mixes queries from later positions. Decoder self- and cross-attention stay "
    "exact; use 'full' there (clustering applies to encoder self-attention only)"
)


@dataclass
class ClusteredAttentionConfig(FairseqDataclass):
    """The ``clustered_*`` options shared by every model family (flags and hydra keys)."""

    clustered_attention: AttentionVariant = field(
        default="clustered",
        metadata={"help": "encoder self-attention: 'full' (exact, fairseq's own), 'clustered' "
                          "(queries grouped into clusters, one attention row per centroid) or "
                          "'improved' (clustered plus exact products for each cluster's top-k keys)"},
    )
    clustered_num_clusters: int = field(
        default=100, metadata={"help": "number of query clusters C per (sequence, head); exact when C >= length"}
    )
    clustered_iterations: int = field(
        default=10, metadata={"help": "Lloyd iterations of the Hamming k-means"}
    )
    clustered_bits: int = field(default=63, metadata={"help": "hash bits per query (1..63)"})
    clustered_topk: int = field(
        default=32, metadata={"help": "keys recomputed exactly per cluster ('improved' only)"}
    )
    clustered_min_length: int = field(
        default=0,
        metadata={"help": "sequences shorter than this (padded batch length) use exact attention"},
    )
    clustered_layers: str = field(
        default="all",
        metadata={"help": "encoder layers that cluster: 'all', 'none' or a comma list of "
                          "0-based indices such as '0,1,2'; the others are exact"},
    )
    clustered_decoder_attention: AttentionVariant = field(
        default="full",
        metadata={"help": "decoder self-/cross-attention: only 'full' is allowed (query clustering "
                          "leaks future tokens); other values are refused with an error"},
    )
    clustered_seed: Optional[int] = field(
        default=None,
        metadata={"help": "seed of the hash hyperplanes (plus the layer index); default: --seed"},
    )


def add_clustered_attention_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``--clustered-*`` flags without defaults, so architecture functions fill them."""
    gen_parser_from_dataclass(parser, ClusteredAttentionConfig(), delete_default=True)


def _getattr(args, name, default):
    """``getattr`` that also treats a stored ``None`` as missing (hydra and argparse do both)."""
    value = getattr(args, name, None)
    return default if value is None else value


def set_clustered_attention_defaults(args, **overrides) -> None:
    """Fill every missing ``clustered_*`` option of ``args`` in place (architecture functions).

    ``overrides`` are architecture-specific defaults (e.g. ``clustered_attention="improved"``),
    used only where the option is unset.
    """
    for option in fields(ClusteredAttentionConfig):
        default = overrides.get(option.name, option.default)
        setattr(args, option.name, _getattr(args, option.name, default))


def _require_int(flag: str, value, low: int, high: Optional[int] = None) -> int:
    allowed = f">= {low}" if high is None else f"in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{flag} must be an integer {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{flag} must be an integer {allowed}, got {value}")
    return value


def _require_variant(flag: str, value) -> str:
    value = str(value)
    if value not in ATTENTION_VARIANTS:
        raise ValueError(f"{flag} must be one of {', '.join(ATTENTION_VARIANTS)}; got {value!r}")
    return value


def parse_layers(spec: str) -> Optional[Tuple[int, ...]]:
    """``'all'`` -> None (every layer), ``'none'`` -> (), ``'0,2'`` -> (0, 2)."""
    spec = str(spec).strip().lower()
    if spec == "all":
        return None
    if spec in ("none", ""):
        return ()
    try:
        layers = tuple(sorted({int(part) for part in spec.split(",")}))
    except ValueError:
        raise ValueError(
            f"--clustered-layers must be 'all', 'none' or comma-separated layer indices such as "
            f"'0,1,2'; got {spec!r}"
        ) from None
    if any(layer < 0 for layer in layers):
        raise ValueError(f"--clustered-layers indices must be >= 0, got {spec!r}")
    return layers


def variant_for_layer(layers: str, attention: str, layer_index: int, num_layers: int, stack: str) -> str:
    """``attention`` for a layer selected by the ``--clustered-layers`` spec ``layers``, else ``'full'``.

    ``stack`` ('encoder' or 'decoder') only names the stack in the error for a layer
    index past ``num_layers``.
    """
    selected = parse_layers(layers)
    if selected is not None:
        out_of_range = [layer for layer in selected if layer >= num_layers]
        if out_of_range:
            raise ValueError(
                f"--clustered-layers={layers} names layer(s) {out_of_range} but the {stack} "
                f"has {num_layers} layers (0..{num_layers - 1})"
            )
        if layer_index not in selected:
            return "full"
    return attention


@dataclass(frozen=True)
class ClusteredAttentionSettings:
    """Validated clustered-attention options of one model (see :class:`ClusteredAttentionConfig`)."""

    attention: str = "clustered"
    num_clusters: int = 100
    iterations: int = 10
    bits: int = 63
    topk: int = 32
    min_length: int = 0
    layers: str = "all"
    decoder_attention: str = "full"
    seed: int = DEFAULT_SEED

    def __post_init__(self):
        _require_variant("--clustered-attention", self.attention)
        _require_int("--clustered-num-clusters", self.num_clusters, 1)
        _require_int("--clustered-iterations", self.iterations, 0)
        _require_int("--clustered-bits", self.bits, 1, 63)
        _require_int("--clustered-topk", self.topk, 1)
        _require_int("--clustered-min-length", self.min_length, 0)
        _require_int("--clustered-seed", self.seed, 0)
        parse_layers(self.layers)
        if _require_variant("--clustered-decoder-attention", self.decoder_attention) != "full":
            raise ValueError(
                f"--clustered-decoder-attention={self.decoder_attention}: "
                + LEAK_MESSAGE.format(site="decoder self- and cross-attention")
            )

    @classmethod
    def from_args(cls, args) -> "ClusteredAttentionSettings":
        """Read the ``clustered_*`` options (argparse Namespace, DictConfig or config object).

        Missing options take the defaults of :class:`ClusteredAttentionConfig`; the hash
        seed defaults to the run's ``seed`` (fairseq's ``--seed``).
        """
        defaults = ClusteredAttentionConfig()
        seed = _getattr(args, "clustered_seed", _getattr(args, "seed", DEFAULT_SEED))
        return cls(
            attention=str(_getattr(args, "clustered_attention", defaults.clustered_attention)),
            num_clusters=_getattr(args, "clustered_num_clusters", defaults.clustered_num_clusters),
            iterations=_getattr(args, "clustered_iterations", defaults.clustered_iterations),
            bits=_getattr(args, "clustered_bits", defaults.clustered_bits),
            topk=_getattr(args, "clustered_topk", defaults.clustered_topk),
            min_length=_getattr(args, "clustered_min_length", defaults.clustered_min_length),
            layers=str(_getattr(args, "clustered_layers", defaults.clustered_layers)),
            decoder_attention=str(
                _getattr(args, "clustered_decoder_attention", defaults.clustered_decoder_attention)
            ),
            seed=seed,
        )

    def variant_for_layer(self, layer_index: int, num_layers: int) -> str:
        """The attention variant of encoder layer ``layer_index`` (``'full'`` where not selected)."""
        return variant_for_layer(self.layers, self.attention, layer_index, num_layers, "encoder")
