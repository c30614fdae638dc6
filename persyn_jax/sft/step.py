"""SFT's side of the train step: the loss over flat {path: array} parameter dicts and the
shardings of parameters, optimizer state and batches (the step itself is training.step's).

The model is split once into a graph definition, the trained parameters (all Params, or only the
LoRA factors) and the frozen rest; the loss merges them back inside jit. Flat string-keyed dicts
keep optax, orbax and the sharding maps simple (no nnx metadata in the optimizer state).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.sft.loss import BATCH_KEYS, loss_sums

Array = jax.Array


def _key(path) -> str:
  parts = []
  for p in path:
    name = getattr(p, "key", getattr(p, "name", getattr(p, "idx", None)))
    if isinstance(p, jax.tree_util.GetAttrKey) and name == "value":
      continue  # a Variable's value slot, not part of the parameter's name
    parts.append(str(name))
  return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class ParamTree:
  """Converts an nnx.State to a flat {"model/layers/0/attn/q/w": array} dict and back."""

  treedef: Any
  keys: tuple[str, ...]

  @classmethod
  def of(cls, state: nnx.State) -> "ParamTree":
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    return cls(treedef, tuple(_key(p) for p, _ in leaves))

  def flat(self, state: nnx.State) -> dict[str, Array]:
    return dict(zip(self.keys, jax.tree.leaves(state)))

  def state(self, flat: dict[str, Array]) -> nnx.State:
    return jax.tree.unflatten(self.treedef, [flat[k] for k in self.keys])


def flat_shardings(state: nnx.State, mesh) -> dict[str, jax.sharding.NamedSharding]:
  """The NamedSharding of every variable (from its logical axes), keyed like ParamTree.flat."""
  tree = ParamTree.of(state)
  vars_ = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return dict(zip(tree.keys, (shd.variable_sharding(v, mesh) for v in vars_)))


def opt_shardings(opt_shapes, param_shardings: dict[str, Any], mesh):
  """Shardings of an optimizer state: a leaf under a parameter's key (Adam's mu, nu) shares the
  parameter's sharding; scalars (step counts) are replicated."""
  def pick(path, leaf):
    for p in reversed(path):
      k = getattr(p, "key", None)
      if isinstance(k, str) and k in param_shardings and leaf.ndim:
        return param_shardings[k]
    return shd.replicated(mesh)
  return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def batch_shardings(mesh, shape: tuple[int, ...]) -> dict[str, Any]:
  """[microbatches, rows, seq] arrays: rows over (data, fsdp)."""
  s = shd.named_sharding(mesh, (None, "batch", None), shape)
  return {k: s for k in BATCH_KEYS}


def make_loss(graphdef, trained: ParamTree, frozen: ParamTree, *, z_loss: float,
              chunk: int) -> Callable:
  """loss(params, frozen, batch) -> (objective sum, aux) for one microbatch [rows, seq]; aux holds
  the sums the train step normalizes ("loss": cross-entropy, "z_loss") and their count ("tokens":
  response tokens). Rematerialization is the model's (`set_remat`, per scanned block)."""
  def loss(params, frozen_flat, batch):
    model = nnx.merge(graphdef, trained.state(params), frozen.state(frozen_flat))
    total, aux = loss_sums(model, batch, z_loss=z_loss, chunk=chunk)
    return total, {"loss": aux["ce"], "z_loss": aux["z"], "tokens": aux["count"]}
  return loss
