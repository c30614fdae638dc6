"""One train-step factory for every trainer: a loss and an optimizer in, a pure step out.

    step = make_train_step(loss, tx, normalize_by="tokens", schedule=sched)
    state, metrics = jax.jit(step, donate_argnums=0)(state, frozen, batch)

`loss(params, frozen, microbatch) -> (objective, aux)`; a batch is a dict of [k, ...] arrays, k
microbatches. With `normalize_by`, the objective and aux are *sums* and aux[normalize_by] their
count (response tokens): gradients of the summed losses are accumulated over the k microbatches and
divided once by the global count, so k microbatches of b rows give exactly the update of one batch
of k·b rows (a mean of per-microbatch means would weight short microbatches more). Without it the
objective is already a mean and k must be 1 (the router's Bradley-Terry loss).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from persyn_jax.training.state import TrainState

Loss = Callable  # (params, frozen, microbatch) -> (objective, aux dict)


def _grads_and_aux(grad_fn, params, frozen, batch):
  """(objective, aux, gradients) of a batch of k microbatches; for k > 1 the aux and gradients are
  summed over them and the objective is None (a summed loss reports itself through aux)."""
  k = jax.tree.leaves(batch)[0].shape[0]
  if k == 1:
    (obj, aux), grads = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], batch))
    return obj, aux, grads

  def body(carry, mb):
    g_acc, a_acc = carry
    (_, aux), g = grad_fn(params, frozen, mb)
    return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, a_acc, aux)), None

  first = jax.tree.map(lambda x: x[0], batch)
  aux_shape = jax.eval_shape(lambda: grad_fn(params, frozen, first)[0][1])
  # fp32 accumulators whatever the parameters' dtype: k small gradients must not round away
  g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  a0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
  (grads, aux), _ = jax.lax.scan(body, (g0, a0), batch)
  return None, aux, grads


def make_train_step(loss: Loss, tx: optax.GradientTransformation, *,
                    normalize_by: str | None = None, schedule: optax.Schedule | None = None,
                    guard_nonfinite: bool = True) -> Callable:
  """step(state, frozen, batch) -> (state, metrics).

  metrics: the aux values, divided by the count when normalizing (the count itself as is; a
  summed loss must report aux["loss"]), "loss" (the objective of a mean loss), "grad_norm",
  "lr" (schedule(step), when given). With `guard_nonfinite`, a step whose loss or gradient norm is
  not finite leaves the state as it was and says so ("loss_finite", "grad_finite"), so that a NaN
  never reaches the parameters or a checkpoint. When normalizing, a step whose count is 0 (an
  all-padding batch: nothing to learn from) also leaves the state as it was: AdamW would otherwise
  move the weights by its momentum and weight decay at a zero gradient, and advance the schedule.
  """
  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def step(state: TrainState, frozen, batch):
    params = state.params
    obj, aux, grads = _grads_and_aux(grad_fn, params, frozen, batch)
    if normalize_by is not None:
      n = jnp.maximum(aux[normalize_by], 1.0)
      grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, params)
      if "loss" not in aux:
        raise KeyError(f"a summed loss reports aux['loss'] (and aux[{normalize_by!r}]); got "
                       f"{sorted(aux)}")
      metrics = {k: (v if k == normalize_by else v / n) for k, v in aux.items()}
    else:
      if jax.tree.leaves(batch)[0].shape[0] != 1:
        raise ValueError("a mean loss (normalize_by=None) takes one microbatch per step")
      metrics = {**aux, "loss": obj}
    gnorm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = gnorm
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    if not guard_nonfinite and normalize_by is None:
      return TrainState(state.step + 1, new_params, opt_state), metrics
    ok = jnp.asarray(True)
    if guard_nonfinite:
      loss_ok, grad_ok = jnp.isfinite(metrics["loss"]), jnp.isfinite(gnorm)
      metrics.update(loss_finite=loss_ok, grad_finite=grad_ok)
      ok = loss_ok & grad_ok
    if normalize_by is not None:
      ok = ok & (aux[normalize_by] > 0)  # no response token: nothing to update
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(state.step + ok.astype(jnp.int32), keep(new_params, params),
                           keep(opt_state, state.opt_state))
    return new_state, metrics

  return step


def make_eval_step(loss: Loss, *, normalize_by: str = "tokens") -> Callable:
  """eval(params, frozen, batch [rows, ...]) -> (aux["loss"], aux[normalize_by]): one batch's
  summed loss and its count, so that a caller sums both over batches and divides once."""
  def evaluate(params, frozen, batch):
    _, aux = loss(params, frozen, batch)
    return aux["loss"], aux[normalize_by]
  return evaluate
