"""One optimizer factory: global-norm clipping, then AdamW per parameter group.

A group names its learning-rate schedule, weight decay and decay mask. One group is plain
`clip -> adamw` (SFT: one schedule, no decay on norms and biases); several are routed by a label
function through optax.multi_transform (the router: its coefficient head learns at its own rate,
faster than the backbone it sits on).

    tx = make_optimizer([ParamGroup("head", head_sched, 0.01, matrices),
                         ParamGroup("backbone", body_sched, 0.01, matrices)],
                        grad_clip=1.0, labels=label_by_path({"head": "head"}, "backbone"))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import optax

Mask = Callable[[Any], Any]  # params -> a tree of bools: True where weight decay applies


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """AdamW settings of the parameters labelled `name`."""

  name: str
  lr: optax.ScalarOrSchedule
  weight_decay: float = 0.0
  decay_mask: Mask | None = None  # None: decay every parameter of the group
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def adamw(self) -> optax.GradientTransformation:
    return optax.adamw(self.lr, b1=self.b1, b2=self.b2, eps=self.eps,
                       weight_decay=self.weight_decay, mask=self.decay_mask)


# Leaf names (last path key) of the models' norm scales and biases (models/layers.py: RMSNorm.scale,
# Bias.b; the router's head bias is `b` too), never decayed whatever their rank: the decoder's
# blocks are stacked, so their norm scales are [layers, dim] and their biases [layers, ...].
NO_DECAY_LEAVES = ("scale", "b")


def _leaf_name(path) -> str | None:
  """The parameter's name: the last dict key of its path (an nnx Variable adds `.value` after it;
  a flat {"a/b/scale": x} dict names it after the last slash)."""
  for k in reversed(path):
    if isinstance(k, jax.tree_util.DictKey):
      return str(k.key).rsplit("/", 1)[-1]
  return None


def matrices(params) -> Any:
  """Weight decay on weight matrices only: parameters of rank >= 2 that are not a norm scale or a
  bias (a stacked layer's [layers, dim] norm scale is no matrix)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and _leaf_name(path) not in NO_DECAY_LEAVES, params)


def label_by_path(names: Mapping[str, str], default: str) -> Callable[[Any], Any]:
  """params -> group label per leaf: `names[key]` for the first path key found in `names` (dict
  keys and attribute names of the tree), else `default`."""
  def labels(params):
    def label(path, _):
      for k in path:
        key = getattr(k, "key", getattr(k, "name", None))
        if key in names:
          return names[key]
      return default
    return jax.tree_util.tree_map_with_path(label, params)
  return labels


def make_optimizer(groups: Sequence[ParamGroup], *, grad_clip: float = 0.0,
                   labels: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) (0 = off) over all parameters, then each group's AdamW."""
  if not groups:
    raise ValueError("make_optimizer: no parameter groups")
  names = [g.name for g in groups]
  if len(set(names)) != len(names):
    raise ValueError(f"make_optimizer: duplicate parameter group names {names}")
  if len(groups) > 1 and labels is None:
    raise ValueError(f"make_optimizer: groups {names} need a `labels` function")
  if grad_clip < 0:
    raise ValueError(f"grad_clip={grad_clip}: must be >= 0 (0 = off)")
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  if len(groups) == 1:
    parts.append(groups[0].adamw())
  else:
    parts.append(optax.multi_transform({g.name: g.adamw() for g in groups}, labels))
  return optax.chain(*parts)
