"""Registering ``clustered_<arch>`` twins of fairseq's own architectures."""

from fairseq.models import register_model_architecture

from ..modules import set_clustered_attention_defaults


def register_clustered_twin(model_name: str, fairseq_arch: str, fairseq_arch_fn) -> None:
    """Register ``clustered_<fairseq_arch>`` for ``model_name``: the clustered-attention
    defaults first, then fairseq's own architecture function for the sizes."""

    def architecture(args):
        set_clustered_attention_defaults(args)
        fairseq_arch_fn(args)

    architecture.__name__ = f"clustered_{fairseq_arch}"
    architecture.__doc__ = f"fairseq's ``{fairseq_arch}`` sizes with clustered encoder self-attention."
    register_model_architecture(model_name, f"clustered_{fairseq_arch}")(architecture)
