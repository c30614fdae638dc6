"""Bradley-Terry training of the router (the paper's Eq. 3) with a held-out split and early stopping.

One step takes `batch_size` probe prompts and *all* their teacher pairs: the router runs once per
prompt and the loss averages -log sigma(pi_win - pi_lose) over every pair in the batch, which is
the pair-level objective at a k(k-1)/2-times smaller forward cost.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.metrics import progress
from persyn_jax.runtime.buckets import bucket_lengths, pad_rows
from persyn_jax.router import (Router, RouterConfig, bt_loss, bt_loss_np, build_pairs,
                               router_metrics)
from persyn_jax.training import (EarlyStopping, ParamGroup, TrainLoop, TrainState, label_by_path,
                                 make_optimizer, make_train_step, matrices)


def held_out_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) prompt indices: a seeded permutation, the first round(n * fraction) held out
  (at least one when fraction > 0 and n > 1)."""
  perm = np.random.default_rng(seed).permutation(n)
  held = int(round(n * fraction))
  if fraction > 0 and n > 1:
    held = min(max(held, 1), n - 1)
  return np.sort(perm[held:]), np.sort(perm[:held])


def param_groups(config: RouterConfig, total_steps: int) -> list[ParamGroup]:
  """AdamW groups: the head and the backbone at their own rates, each with linear warmup from 0
  then cosine decay to 0; weight decay on matrices only (not on biases and norm scales)."""
  warmup = int(config.warmup_ratio * total_steps)
  sched = lambda peak: optax.warmup_cosine_decay_schedule(0.0 if warmup else peak, peak, warmup,
                                                          max(total_steps, warmup + 1), 0.0)
  return [ParamGroup("head", sched(config.head_lr), config.weight_decay, matrices),
          ParamGroup("backbone", sched(config.lr), config.weight_decay, matrices)]


def optimizer(config: RouterConfig, total_steps: int) -> optax.GradientTransformation:
  """The router's optimizer: global-norm clipping, then AdamW per group (`param_groups`)."""
  return make_optimizer(param_groups(config, total_steps), grad_clip=config.grad_clip,
                        labels=label_by_path({"head": "head"}, "backbone"))


def train_router(router: Router, prompts: Sequence, rewards: np.ndarray, *,
                 log: Callable[[dict], None] | None = None) -> tuple[Router, dict]:
  """Fits `router` on the probe prompts' [prompts, teachers] combined rewards (NaN = missing).

  A teacher that no training pair compares (every probe response failed, or tied with the
  others) keeps an untrained score: it is left out of `router.routable`, so route() never picks
  it, and the report names it (`unroutable`).

  Early stopping on the held-out Bradley-Terry loss: training stops after `patience` evaluations
  without improvement and the best evaluated parameters are kept; held-out prompts without a pair
  give no loss (no early stopping). Returns (router, report).
  """
  cfg = router.config
  rewards = np.asarray(rewards, np.float64)
  if rewards.shape != (len(prompts), len(router.teachers)):
    raise ValueError(f"rewards have shape {rewards.shape}, expected ({len(prompts)}, "
                     f"{len(router.teachers)}) (prompts, teachers)")
  t0 = time.time()
  wins, counts = build_pairs(rewards, cfg.tie_tolerance)
  ids, truncated = router.encode(prompts)
  train_idx, held_idx = held_out_split(len(prompts), cfg.held_out_fraction, cfg.seed)
  train_idx = train_idx[wins[train_idx].sum((1, 2)) > 0]  # prompts without a pair teach nothing
  if not train_idx.size:
    raise ValueError(f"no training pairs: {counts}")
  compared = wins[train_idx].sum((0, 2)) + wins[train_idx].sum((0, 1)) > 0
  router.routable = [t for t, c in zip(router.teachers, compared) if c]
  unroutable = [t for t, c in zip(router.teachers, compared) if not c]
  steps_per_epoch = math.ceil(train_idx.size / cfg.batch_size)
  total = cfg.epochs * steps_per_epoch
  # evaluations after the last step of each evals_per_epoch-th of every epoch (every step of an
  # epoch shorter than that), the last step included
  marks = {j * steps_per_epoch // cfg.evals_per_epoch for j in range(1, cfg.evals_per_epoch + 1)}
  eval_steps = {e * steps_per_epoch + m for e in range(cfg.epochs) for m in marks if m}
  tx = optimizer(cfg, total)

  trainable_filter = (nnx.All(nnx.Param, nnx.PathContains("head")) if cfg.freeze_backbone
                      else nnx.Param)
  graphdef, trainable, frozen = nnx.split(router.model, trainable_filter, ...)
  mesh = router.mesh
  with jax.set_mesh(mesh):
    state = TrainState(jnp.zeros((), jnp.int32), trainable, jax.jit(tx.init)(trainable))

  def loss(params, frozen, batch):
    scores = nnx.merge(graphdef, params, frozen)(batch["input_ids"], batch["segment_ids"])
    return bt_loss(scores, batch["wins"]), {}

  # the mean Bradley-Terry loss of one batch (k = 1); no NaN guard: softplus keeps it finite
  step = jax.jit(make_train_step(loss, tx, guard_nonfinite=False), donate_argnums=(0,))
  loop = TrainLoop(lambda state, batch: step(state, frozen, batch), total)

  rows = -(-cfg.batch_size // router.shards) * router.shards
  buckets = np.asarray(bucket_lengths(cfg.max_len, cfg.min_bucket))
  # [1 microbatch, rows, ...]: rows over (data, fsdp)
  put = lambda x: jax.device_put(x[None], shd.named_sharding(
      mesh, (None, "batch") + (None,) * (x.ndim - 1), (1,) + x.shape))
  rng = np.random.default_rng(cfg.seed + 1)

  def batches():
    for _ in range(cfg.epochs):
      order = rng.permutation(train_idx)
      for s in range(steps_per_epoch):
        idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        seqs = [ids[i] for i in idx]
        length = int(buckets[np.searchsorted(buckets, max(map(len, seqs)))])
        arr = pad_rows(seqs, rows, length, router.pad_id)
        w = np.zeros((rows,) + wins.shape[1:], np.float32)
        w[:idx.size] = wins[idx]
        yield {"input_ids": put(arr["input_ids"]), "segment_ids": put(arr["segment_ids"]),
               "wins": put(w)}

  held_wins = wins[held_idx]
  # held-out prompts without a pair (one scored teacher, or ties) give no held-out loss: no early
  # stopping on a constant 0
  held_pairs = bool(held_wins.sum())
  held_prompts = [prompts[i] for i in held_idx]
  history, losses = [], []
  early = EarlyStopping(patience=cfg.patience, min_delta=cfg.min_delta)

  def evaluate(info):
    nnx.update(router.model, info.state.params)
    held_loss = bt_loss_np(router.scores(held_prompts), held_wins) if held_pairs else None
    train_loss = float(np.mean(jax.device_get(losses)))
    losses.clear()
    entry = {"step": info.step, "epoch": (info.step - 1) // steps_per_epoch,
             "train_loss": train_loss, "held_out_loss": held_loss, "seconds": time.time() - t0}
    history.append(entry)
    bar.set_postfix(train_loss=f"{train_loss:.4f}", held_out_loss=(
        "-" if held_loss is None else f"{held_loss:.4f}"), refresh=False)
    if log is not None:
      log(entry)
    if held_loss is not None and early.update(info.step, held_loss, info.state.params):
      info.loop.stop()

  bar = progress(total, "router", unit="step")

  def step_done(info):
    losses.append(info.metrics["loss"])
    bar.update(1)

  loop.add_hook(step_done, every=1)
  loop.add_hook(lambda info: evaluate(info) if info.step in eval_steps else None, every=1)
  with bar, jax.set_mesh(mesh):
    state, done = loop.run(state, batches())
  best = early.best_params
  nnx.update(router.model, best if best is not None else state.params)

  train_prompts = [prompts[i] for i in train_idx]
  report = {
      "pairs": counts, "unroutable": unroutable, "truncated_prompts": truncated,
      "train_prompts": int(train_idx.size),
      "held_out_prompts": int(held_idx.size), "steps": done, "total_steps": total,
      "best_step": early.best_step if best is not None else done, "stopped_early": early.stopped,
      "history": history, "seconds": time.time() - t0,
      "train": router_metrics(router.scores(train_prompts), rewards[train_idx], router.teachers,
                              cfg.tie_tolerance, router.routable),
  }
  if held_idx.size:
    held_scores = router.scores(held_prompts)
    report["held_out"] = {**router_metrics(held_scores, rewards[held_idx], router.teachers,
                                           cfg.tie_tolerance, router.routable),
                          "loss": bt_loss_np(held_scores, held_wins) if held_pairs
                                  else float("nan")}
  return router, report


def fit_router(config: RouterConfig, prompts: Sequence, rewards: np.ndarray,
               teachers: Sequence[str], *, mesh=None, log=None) -> tuple[Router, dict]:
  """A new router on `config.backbone`, trained (train_router)."""
  if not config.backbone:
    raise ValueError("router.backbone is empty: set it to a local HF model directory")
  router = Router.from_backbone(config.backbone, teachers, config, mesh=mesh)
  return train_router(router, prompts, rewards, log=log)
