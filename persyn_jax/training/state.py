"""The train state: one typed pytree (step, trained parameters, optimizer state) for every trainer.

SFT's parameters are a flat {path: array} dict, the router's an nnx.State: the state does not care,
and neither do jit, the shardings (a TrainState of NamedShardings) or the checkpoints.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
    """Step 0: the optimizer state of `params` (call under jit to place it by out_shardings)."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shapes(param_shapes, tx: optax.GradientTransformation) -> TrainState:
  """ShapeDtypeStructs of the TrainState that `param_shapes` would start."""
  return jax.eval_shape(lambda p: TrainState.create(p, tx), param_shapes)
