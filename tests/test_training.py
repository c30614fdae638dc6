"""The training core: the hook schedule, early stopping, parameter groups against AdamW written
out by hand, and the step factory's accumulation and NaN guard on a loss small enough to check."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from persyn_jax.training import (EarlyStopping, ParamGroup, TrainLoop, TrainState, label_by_path,
                                 make_optimizer, make_train_step, matrices)


def counting_loop(total, batches=None):
  """A loop whose step adds the batch to a scalar state (no jax needed to test the schedule)."""
  taken = []

  def step(state, batch):
    taken.append(batch)
    return state + batch, {"loss": float(batch)}
  loop = TrainLoop(step, total)
  return loop, (range(1, 100) if batches is None else batches), taken


def test_hooks_run_every_n_steps_in_order_and_at_end_once():
  loop, batches, taken = counting_loop(10)
  calls = []
  loop.add_hook(lambda i: calls.append(("a", i.step)), every=1)
  loop.add_hook(lambda i: calls.append(("b", i.step, i.state)), every=4, at_end=True)
  loop.add_hook(lambda i: calls.append(("c", i.step, i.metrics)), every=5, at_end=True)
  state, last = loop.run(0, batches)
  assert last == 10 and state == sum(range(1, 11)) and taken == list(range(1, 11))
  assert [c[1] for c in calls if c[0] == "a"] == list(range(1, 11))
  # b: steps 4 and 8 on schedule, then once at the end (10 is not a multiple of 4), no metrics
  assert [c[1:] for c in calls if c[0] == "b"] == [(4, 10), (8, 36), (10, 55)]
  # c landed on the last step: no second call at the end
  assert [c[1:] for c in calls if c[0] == "c"] == [(5, {"loss": 5.0}), (10, {"loss": 10.0})]
  # hooks of one step run in the order they were added
  assert calls.index(("a", 4)) < calls.index(("b", 4, 10))


def test_resumed_loop_counts_from_start_and_stops_when_data_runs_out():
  loop, _, taken = counting_loop(10, batches=[1, 1, 1])
  steps = []
  loop.add_hook(lambda i: steps.append(i.step), every=2, at_end=True)
  state, last = loop.run(0, iter([1, 1, 1]), start=4)
  assert last == 7 and state == 3 and steps == [6, 7]
  # nothing to do: no step, no at-end hook
  loop, _, taken = counting_loop(5)
  loop.add_hook(lambda i: steps.append(("end", i.step)), every=2, at_end=True)
  assert loop.run(0, iter([1]), start=5) == (0, 5) and taken == [] and steps == [6, 7]
  with pytest.raises(ValueError, match="every=0"):
    loop.add_hook(print, every=0)


def test_a_hook_can_stop_the_loop_before_the_next_batch_is_taken():
  loop, batches, taken = counting_loop(100)
  loop.add_hook(lambda i: i.loop.stop() if i.step == 3 else None, every=1)
  _, last = loop.run(0, batches)
  assert last == 3 and taken == [1, 2, 3]


def test_early_stopping_keeps_a_copy_of_the_best_params_and_counts_patience():
  early = EarlyStopping(patience=2, min_delta=0.1)
  p = {"w": jnp.asarray([1.0, 2.0])}
  assert not early.update(1, 1.0, p)
  best = early.best_params
  assert best["w"] is not p["w"] and np.array_equal(best["w"], p["w"])
  p["w"].delete()  # a donating step frees the buffers it was given: the copy survives
  assert not early.update(2, 0.95, {"w": jnp.asarray([9.0, 9.0])})  # not better by min_delta
  assert not early.update(3, 0.5, {"w": jnp.asarray([3.0, 3.0])})  # better: patience resets
  assert not early.update(4, 0.6, {"w": jnp.asarray([4.0, 4.0])})
  assert early.update(5, 0.45, {"w": jnp.asarray([5.0, 5.0])}) and early.stopped
  assert early.best_step == 3 and early.best_loss == 0.5
  np.testing.assert_array_equal(early.best_params["w"], [3.0, 3.0])


def test_early_stopping_in_a_loop_keeps_the_best_evaluated_state():
  """The router's shape: an eval hook every 2 steps feeds EarlyStopping and stops the loop."""
  step = jax.jit(lambda s, b: (TrainState(s.step + 1, s.params + b, s.opt_state), {}))
  held_out = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5, 10: 0.1}  # eval loss by step; 10 is never reached
  early = EarlyStopping(patience=2, min_delta=0.0)
  loop = TrainLoop(step, 20)
  loop.add_hook(lambda i: i.loop.stop() if early.update(i.step, held_out[i.step], i.state.params)
                else None, every=2)
  state = TrainState(jnp.zeros((), jnp.int32), jnp.zeros(()), ())
  state, last = loop.run(state, (jnp.float32(n) for n in range(1, 100)))
  assert last == 8 and early.best_step == 4 and float(state.params) == sum(range(1, 9))
  assert float(early.best_params) == 1 + 2 + 3 + 4


# ---------------------------------------------------------------------------------------------
# parameter groups against AdamW by hand

def adamw_by_hand(params, grads_seq, lrs, *, wd, decay, b1=0.9, b2=0.999, eps=1e-8, clip=None):
  """AdamW (optax's form: decoupled decay added to the Adam direction, then times -lr) over a
  flat dict, with optional clipping of the global norm over all leaves; float64."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, g in enumerate(grads_seq, start=1):
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    if clip is not None:
      norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
      if norm > clip:
        g = {k: x * clip / norm for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      direction = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      if decay[k]:
        direction = direction + wd[k] * p[k]
      p[k] = p[k] - lrs[k](t - 1) * direction
  return p


def test_parameter_groups_get_their_own_learning_rates_and_decay():
  rng = np.random.default_rng(0)
  params = {"head": {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))},
            "backbone": {"embed": rng.normal(size=(4, 3)), "norm": rng.normal(size=(3,))}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), params)
           for _ in range(3)]
  head_lr = optax.linear_schedule(0.0, 0.1, 2)  # a schedule and a constant, both allowed
  tx = make_optimizer([ParamGroup("head", head_lr, weight_decay=0.5, decay_mask=matrices),
                       ParamGroup("backbone", 1e-3, weight_decay=0.01, decay_mask=matrices)],
                      grad_clip=2.0, labels=label_by_path({"head": "head"}, "backbone"))
  p, state = params, tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  flat = lambda t: {f"{a}/{b}": v for a, sub in t.items() for b, v in sub.items()}
  lrs = {k: (head_lr if k.startswith("head") else (lambda _: 1e-3)) for k in flat(params)}
  wd = {k: (0.5 if k.startswith("head") else 0.01) for k in flat(params)}
  decay = {k: np.ndim(v) >= 2 for k, v in flat(params).items()}
  want = adamw_by_hand(flat(params), [flat(g) for g in grads], lrs, wd=wd, decay=decay, clip=2.0)
  got = flat(p)
  # fp32 optax against a float64 reference: Adam's direction m/sqrt(v) carries ~1e-5 relative
  # rounding, times steps of up to ~0.1 (the head's lr), so 5e-6 absolute on values near zero
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=5e-6, err_msg=k)
  # the head moved by ~its lr per step, the backbone by ~1e-3: the groups really differ
  moved = {k: np.abs(np.asarray(got[k]) - np.asarray(flat(params)[k])).max() for k in got}
  assert moved["head/b"] > 0.05 and moved["backbone/norm"] < 1e-2


def test_one_group_is_plain_adamw_and_groups_are_checked():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  mask = lambda p: {"w": True, "b": False}
  ours = make_optimizer([ParamGroup("all", 0.1, weight_decay=0.1, decay_mask=mask)], grad_clip=0)
  ref = optax.adamw(0.1, weight_decay=0.1, mask=mask)
  g = {"w": jnp.full((2, 2), 0.5), "b": jnp.full((2,), -2.0)}
  a, _ = ours.update(g, ours.init(params), params)
  b, _ = ref.update(g, ref.init(params), params)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))
  with pytest.raises(ValueError, match="need a `labels`"):
    make_optimizer([ParamGroup("a", 1.0), ParamGroup("b", 1.0)])
  with pytest.raises(ValueError, match="duplicate"):
    make_optimizer([ParamGroup("a", 1.0), ParamGroup("a", 1.0)], labels=lambda p: p)


# ---------------------------------------------------------------------------------------------
# the step factory

def quadratic(params, frozen, batch):
  """Summed squared error over the rows of a microbatch, with their count."""
  err = batch["x"] * params["w"] - batch["y"]
  total = jnp.sum(err ** 2)
  return total, {"loss": total, "rows": jnp.asarray(batch["x"].shape[0], jnp.float32)}


def test_accumulated_microbatches_equal_one_batch_and_the_mean_gradient():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(6,)).astype(np.float32), rng.normal(size=(6,)).astype(np.float32)
  tx = optax.sgd(0.1)
  step = jax.jit(make_train_step(quadratic, tx, normalize_by="rows"))
  init = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.float32(0.5)}, tx.init({"w": jnp.float32(0.5)}))
  s3, m3 = step(init, None, {"x": x.reshape(3, 2), "y": y.reshape(3, 2)})  # k = 3 microbatches
  s1, m1 = step(init, None, {"x": x.reshape(1, 6), "y": y.reshape(1, 6)})  # k = 1
  grad = np.mean(2 * (x * 0.5 - y) * x)  # d/dw of the mean squared error over all 6 rows
  np.testing.assert_allclose(float(s3.params["w"]), 0.5 - 0.1 * grad, rtol=1e-6)
  np.testing.assert_allclose(float(s1.params["w"]), float(s3.params["w"]), rtol=1e-6)
  np.testing.assert_allclose(float(m3["loss"]), np.mean((x * 0.5 - y) ** 2), rtol=1e-6)
  assert float(m3["rows"]) == 6 and int(s3.step) == 1


def test_a_non_finite_step_keeps_the_old_state_and_says_so():
  tx = optax.adam(0.1)
  step = jax.jit(make_train_step(quadratic, tx, normalize_by="rows"))
  init = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.float32(0.5)}, tx.init({"w": jnp.float32(0.5)}))
  bad = {"x": np.asarray([[1.0, np.nan]], np.float32), "y": np.zeros((1, 2), np.float32)}
  state, m = step(init, None, bad)
  assert not bool(m["loss_finite"]) and not bool(m["grad_finite"])
  assert int(state.step) == 0 and float(state.params["w"]) == 0.5
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.opt_state,
                                   init.opt_state))
  # a mean loss (the router's) takes exactly one microbatch
  mean = jax.jit(make_train_step(lambda p, f, b: (quadratic(p, f, b)[0], {}), tx))
  with pytest.raises(ValueError, match="one microbatch"):
    mean(init, None, {"x": np.ones((2, 1), np.float32), "y": np.ones((2, 1), np.float32)})
