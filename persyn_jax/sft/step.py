"""The jitted train and eval steps, over flat {path: array} parameter dicts.

The model is split once into a graph definition, the trained parameters (all Params, or only the
LoRA factors) and the frozen rest; the step merges them back inside jit. Flat string-keyed dicts
keep optax, orbax and the sharding maps simple (no nnx metadata in the optimizer state).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
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


def _remat(fn, mode: str):
  if mode == "dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return fn


def make_loss(graphdef, trained: ParamTree, frozen: ParamTree, *, z_loss: float, chunk: int,
              remat: str = "none") -> Callable:
  """loss(params, frozen, batch) -> (objective sum, aux) for one microbatch [rows, seq]."""
  def loss(params, frozen_flat, batch):
    model = nnx.merge(graphdef, trained.state(params), frozen.state(frozen_flat))
    return loss_sums(model, batch, z_loss=z_loss, chunk=chunk)
  return _remat(loss, remat)


def make_train_step(loss: Callable, tx: optax.GradientTransformation, schedule) -> Callable:
  """step(state, frozen, batch) -> (state, metrics); batch arrays are [k, rows, seq].

  Gradients of the summed losses are accumulated over the k microbatches (lax.scan) and divided
  once by the global count of response tokens: k·b rows in k microbatches give the same update as
  one batch of k·b rows. A step whose loss or gradient norm is not finite leaves the state as it
  was (and says so in its metrics), so that a NaN never reaches the parameters or a checkpoint.
  """
  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def step(state, frozen, batch):
    params = state["params"]
    k = batch["input_ids"].shape[0]
    if k == 1:
      (_, aux), grads = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], batch))
    else:
      def body(carry, mb):
        g_acc, a_acc = carry
        (_, aux), g = grad_fn(params, frozen, mb)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, a_acc, aux)), None
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      aux0 = {"ce": jnp.zeros(()), "z": jnp.zeros(()), "count": jnp.zeros(())}
      (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), batch)
    n = jnp.maximum(aux["count"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, params)
    loss_val = aux["ce"] / n
    gnorm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    loss_ok, grad_ok = jnp.isfinite(loss_val), jnp.isfinite(gnorm)
    ok = loss_ok & grad_ok
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {"params": keep(new_params, params), "opt_state": keep(opt_state, state["opt_state"]),
                 "step": state["step"] + ok.astype(jnp.int32)}
    metrics = {"loss": loss_val, "z_loss": aux["z"] / n, "grad_norm": gnorm,
               "lr": schedule(state["step"]), "tokens": aux["count"],
               "loss_finite": loss_ok, "grad_finite": grad_ok}
    return new_state, metrics

  return step


def make_eval_step(loss: Callable) -> Callable:
  """eval(params, frozen, batch [rows, seq]) -> (summed token losses, response tokens)."""
  def evaluate(params, frozen, batch):
    _, aux = loss(params, frozen, batch)
    return aux["ce"], aux["count"]
  return evaluate
