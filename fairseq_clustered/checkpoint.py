"""Let torch's default ``weights_only=True`` load fairseq checkpoints.

torch >= 2.6 loads checkpoints with ``weights_only=True``, which refuses every Python
class it does not know. Besides tensors and plain containers, a fairseq checkpoint
stores its configuration as an ``argparse.Namespace`` (the command-line arguments of
legacy models, kept inside the config dictionary). :func:`register_safe_globals`
allow-lists exactly the classes fairseq checkpoints need, with
:func:`torch.serialization.add_safe_globals`; the check itself stays on for
everything else. ``tests/test_fairseq_cli.py`` loads every checkpoint the CLI runs
write (translation, speech, masked LM, hydra) with plain ``torch.load``.
"""

import argparse

import torch

#: The classes found in fairseq checkpoints beyond tensors and builtin containers.
FAIRSEQ_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def register_safe_globals() -> None:
    """Allow-list :data:`FAIRSEQ_CHECKPOINT_GLOBALS` for ``torch.load(weights_only=True)``."""
    torch.serialization.add_safe_globals(list(FAIRSEQ_CHECKPOINT_GLOBALS))
