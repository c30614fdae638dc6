"""Bradley-Terry training of the router (PAPER.md Eq. 3) with a held-out split and early stopping.

One step takes `batch_size` probe prompts and *all* their teacher pairs: the router runs once per
prompt and the loss averages -log sigma(pi_win - pi_lose) over every pair in the batch, which is
the pair-level objective at a k(k-1)/2-times smaller forward cost.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.runtime.buckets import bucket_lengths, pad_rows
from persyn_jax.router import (Router, RouterConfig, bt_loss, bt_loss_np, build_pairs,
                               router_metrics)


def split_prompts(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) prompt indices: a seeded permutation, the first round(n * fraction) held out
  (at least one when fraction > 0 and n > 1)."""
  perm = np.random.default_rng(seed).permutation(n)
  held = int(round(n * fraction))
  if fraction > 0 and n > 1:
    held = min(max(held, 1), n - 1)
  return np.sort(perm[held:]), np.sort(perm[:held])


def make_optimizer(config: RouterConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW, linear warmup then cosine decay to 0; the head and the backbone at their own rates;
  weight decay on matrices only (not on biases and norm scales)."""
  warmup = int(config.warmup_ratio * total_steps)
  sched = lambda peak: optax.warmup_cosine_decay_schedule(0.0 if warmup else peak, peak, warmup,
                                                          max(total_steps, warmup + 1), 0.0)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  adamw = lambda peak: optax.adamw(sched(peak), weight_decay=config.weight_decay, mask=decay_mask)
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "head" if any(getattr(k, "key", None) == "head" for k in path) else "backbone",
      params)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.multi_transform({"head": adamw(config.head_lr),
                                            "backbone": adamw(config.lr)}, labels))


def train_router(router: Router, prompts: Sequence, rewards: np.ndarray, *,
                 log: Callable[[dict], None] | None = None) -> tuple[Router, dict]:
  """Fits `router` on the probe prompts' [prompts, teachers] combined rewards (NaN = missing).

  Early stopping on the held-out Bradley-Terry loss: training stops after `patience` evaluations
  without improvement and the best evaluated parameters are kept. Returns (router, report).
  """
  cfg = router.config
  rewards = np.asarray(rewards, np.float64)
  if rewards.shape != (len(prompts), len(router.teachers)):
    raise ValueError(f"rewards have shape {rewards.shape}, expected ({len(prompts)}, "
                     f"{len(router.teachers)}) (prompts, teachers)")
  t0 = time.time()
  wins, counts = build_pairs(rewards, cfg.tie_tolerance)
  ids, truncated = router.encode(prompts)
  train_idx, held_idx = split_prompts(len(prompts), cfg.held_out_fraction, cfg.seed)
  train_idx = train_idx[wins[train_idx].sum((1, 2)) > 0]  # prompts without a pair teach nothing
  if not train_idx.size:
    raise ValueError(f"no training pairs: {counts}")
  steps_per_epoch = math.ceil(train_idx.size / cfg.batch_size)
  total = cfg.epochs * steps_per_epoch
  eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
  tx = make_optimizer(cfg, total)

  trainable_filter = (nnx.All(nnx.Param, nnx.PathContains("head")) if cfg.freeze_backbone
                      else nnx.Param)
  graphdef, trainable, frozen = nnx.split(router.model, trainable_filter, ...)
  mesh = router.mesh
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(trainable)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(trainable, opt_state, frozen, input_ids, segment_ids, wins):
    def loss_fn(tr):
      return bt_loss(nnx.merge(graphdef, tr, frozen)(input_ids, segment_ids), wins)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  rows = -(-cfg.batch_size // router.shards) * router.shards
  buckets = np.asarray(bucket_lengths(cfg.max_len, cfg.min_bucket))
  put = lambda x: jax.device_put(x, shd.batch_sharding(mesh, x.shape))
  held_wins = wins[held_idx]
  held_prompts = [prompts[i] for i in held_idx]

  def evaluate(trainable):
    nnx.update(router.model, trainable)
    return bt_loss_np(router.scores(held_prompts), held_wins) if held_idx.size else None

  rng = np.random.default_rng(cfg.seed + 1)
  history, best, best_loss, best_step, bad, stopped, losses = [], None, math.inf, 0, 0, False, []
  done = 0
  for epoch in range(cfg.epochs):
    order = rng.permutation(train_idx)
    for s in range(steps_per_epoch):
      idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
      seqs = [ids[i] for i in idx]
      length = int(buckets[np.searchsorted(buckets, max(map(len, seqs)))])
      arr = pad_rows(seqs, rows, length, router.pad_id)
      w = np.zeros((rows,) + wins.shape[1:], np.float32)
      w[:idx.size] = wins[idx]
      with jax.set_mesh(mesh):
        trainable, opt_state, loss = step(trainable, opt_state, frozen, put(arr["input_ids"]),
                                          put(arr["segment_ids"]), put(w))
      losses.append(loss)
      done += 1
      if done % eval_every and done != total:
        continue
      held_loss = evaluate(trainable)
      train_loss = float(np.mean(jax.device_get(losses)))
      losses = []
      entry = {"step": done, "epoch": epoch, "train_loss": train_loss, "held_out_loss": held_loss,
               "seconds": time.time() - t0}
      history.append(entry)
      if log is not None:
        log(entry)
      if held_loss is None:
        continue
      if held_loss < best_loss - cfg.min_delta:
        best_loss, best_step, bad = held_loss, done, 0
        best = jax.tree.map(jnp.copy, trainable)
      else:
        bad += 1
        if bad >= cfg.patience:
          stopped = True
          break
    if stopped:
      break
  nnx.update(router.model, best if best is not None else trainable)

  train_prompts = [prompts[i] for i in train_idx]
  report = {
      "pairs": counts, "truncated_prompts": truncated, "train_prompts": int(train_idx.size),
      "held_out_prompts": int(held_idx.size), "steps": done, "total_steps": total,
      "best_step": best_step if best is not None else done, "stopped_early": stopped,
      "history": history, "seconds": time.time() - t0,
      "train": router_metrics(router.scores(train_prompts), rewards[train_idx], router.teachers,
                              cfg.tie_tolerance),
  }
  if held_idx.size:
    held_scores = router.scores(held_prompts)
    report["held_out"] = {**router_metrics(held_scores, rewards[held_idx], router.teachers,
                                           cfg.tie_tolerance),
                          "loss": bt_loss_np(held_scores, held_wins)}
  return router, report


def fit_router(config: RouterConfig, prompts: Sequence, rewards: np.ndarray,
               teachers: Sequence[str], *, mesh=None, log=None) -> tuple[Router, dict]:
  """A new router on `config.backbone`, trained (train_router)."""
  if not config.backbone:
    raise ValueError("router.backbone is empty: set it to a local HF model directory")
  router = Router.from_backbone(config.backbone, teachers, config, mesh=mesh)
  return train_router(router, prompts, rewards, log=log)
