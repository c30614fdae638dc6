"""persyn_jax: PerSyn (Route then Generate, arXiv 2510.10925) in JAX."""
import os as _os

# transformers is used here for tokenizers, configs and chat templates only, never its PyTorch
# models; without torch it would print an advisory ("PyTorch was not found. Models won't be
# available...") that means nothing to a user of this toolkit. Its own setting silences only
# such advisories, and a user's explicit value wins.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# on a CPU-only host, before JAX starts: keep XLA:CPU's per-call scratch mapped (host_malloc.py)
from persyn_jax import host_malloc as _host_malloc  # noqa: E402

_host_malloc.apply()

__version__ = "0.1.0"
