"""Attention kernels behind one function (`attention`); see kernels/attention.py for the impls."""
from __future__ import annotations

from persyn_jax.kernels.attention import (ENV_VAR, IMPLS, attention, attention_mask, choose,
                                          xla_attention)

__all__ = ["ENV_VAR", "IMPLS", "attention", "attention_mask", "choose", "xla_attention"]
