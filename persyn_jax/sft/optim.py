"""SFT's optimizer settings: warmup + cosine/linear decay and a weight-decay mask, as one parameter
group of training.make_optimizer (global-norm clipping, then AdamW)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from persyn_jax.sft.config import SFTConfig
from persyn_jax.training.optim import ParamGroup

# Leaf names (last path element) of parameters that are never decayed: norm scales and biases.
NO_DECAY_LEAVES = ("scale", "b")


def warmup_steps(config: SFTConfig, total_steps: int) -> int:
  if config.warmup_steps:
    return min(config.warmup_steps, total_steps)
  return int(math.ceil(config.warmup_ratio * total_steps))


def lr_schedule(config: SFTConfig, total_steps: int) -> optax.Schedule:
  """The learning rate of update number `count` (0-based).

  Warmup rises linearly to lr over the first `warm` updates, starting at lr/warm (not 0: a first
  update at lr 0 wastes a batch); then cosine or linear decay towards lr·min_lr_ratio, which the
  update after the last would reach (so the last update is not wasted either).
  """
  total = max(total_steps, 1)
  warm = warmup_steps(config, total)
  peak, end = config.lr, config.lr * config.min_lr_ratio
  if config.schedule not in ("cosine", "linear", "constant"):
    raise ValueError(f"schedule={config.schedule!r}: expected cosine, linear or constant")

  def sched(count):
    count = jnp.asarray(count, jnp.float32)
    progress = jnp.clip((count - warm + 1) / (total - warm + 1), 0.0, 1.0)
    if config.schedule == "cosine":
      lr = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif config.schedule == "linear":
      lr = peak + (end - peak) * progress
    else:
      lr = jnp.full_like(progress, peak)
    if warm:
      lr = jnp.where(count < warm, peak * (count + 1) / warm, lr)
    return lr

  return sched


def decay_mask(params: dict[str, jax.Array]) -> dict[str, bool]:
  """True where weight decay applies: matrices, not norm scales, biases or other 1-D parameters."""
  return {k: (v.ndim >= 2 and k.rsplit("/", 1)[-1] not in NO_DECAY_LEAVES)
          for k, v in params.items()}


def param_group(config: SFTConfig, schedule: optax.Schedule) -> ParamGroup:
  """SFT's one parameter group: AdamW at `schedule` over a flat {path: array} parameter dict,
  decayed as decay_mask says (training.make_optimizer adds the clipping)."""
  return ParamGroup("params", schedule, weight_decay=config.weight_decay, decay_mask=decay_mask,
                    b1=config.b1, b2=config.b2, eps=config.eps)

