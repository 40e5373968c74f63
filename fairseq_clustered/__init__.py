"""fairseq-clustered: clustered attention (Vyas et al., 2020) for fairseq.

``import fairseq_clustered`` always provides the attention ops
(:mod:`fairseq_clustered.ops`). Where fairseq is installed it also registers the
fairseq modules and models (``--user-dir fairseq_clustered`` imports this package)
and makes fairseq checkpoints loadable under torch's ``weights_only=True``
(:mod:`fairseq_clustered.checkpoint`).
"""

import importlib.util

from . import ops

if importlib.util.find_spec("fairseq") is not None:
    # Not wrapped in try/except: a broken fairseq install must fail here, loudly.
    from . import checkpoint, models, modules  # noqa: F401  (registers models and safe globals)

    checkpoint.register_safe_globals()
