"""`train()`: the SFT loop — data in order from a resumable source, one jitted step per
optimizer step, checkpoints, eval, metrics, NaN stop, export of the student in HF layout."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.config import to_dict
from persyn_jax.metrics import MetricsWriter
from persyn_jax.models import CausalLM, save_pretrained
from persyn_jax.sft.checkpoint import Checkpoints
from persyn_jax.sft.config import SFTConfig
from persyn_jax.sft.lora import merge_lora
from persyn_jax.sft.loss import BATCH_KEYS
from persyn_jax.sft.session import Session, make_session

log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]
BatchesFn = Callable[[int], Iterator[Batch]]

# Dense bf16 peak FLOP/s per device, by jax device_kind prefix (for MFU).
PEAK_BF16 = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA H800": 989e12,
             "NVIDIA A100": 312e12, "NVIDIA L4": 121e12, "NVIDIA A10": 125e12,
             "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
             "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}
# Keys of the config that fix the data position and the parameter structure of a checkpoint.
RESUME_KEYS = ("batch_size", "grad_accum", "seq_len", "lora")


class NonFiniteError(FloatingPointError):
  """A step produced a NaN/Inf loss or gradient; the run stopped without saving that state."""


@dataclasses.dataclass
class TrainResult:
  model: CausalLM  # the final student, LoRA merged, in the config's compute/param dtypes
  losses: dict[int, float]  # train loss of every step run by this call
  eval_losses: dict[int, float]
  step: int  # the last completed step
  total_steps: int
  resumed_from: int | None
  out_dir: str
  checkpoint_dir: str
  metrics_path: str
  export_dir: str | None


def peak_flops(config: SFTConfig) -> float | None:
  if config.peak_tflops:
    return config.peak_tflops * 1e12
  if config.compute_dtype not in ("bfloat16", "bf16"):
    return None
  kind = jax.devices()[0].device_kind
  for prefix, flops in PEAK_BF16.items():
    if kind.startswith(prefix):
      return flops
  return None


def as_source(batches: BatchesFn | Sequence[Batch] | Iterable[Batch]) -> tuple[BatchesFn, int | None]:
  """(start -> iterator of microbatches from index `start`, batches per epoch if known).

  A callable is the data layer's own resumable reader; a sequence is cycled epoch after epoch; any
  other iterable is re-iterated and skipped ahead on resume (it must yield the same order again).
  """
  if callable(batches) and not isinstance(batches, Sequence):
    n = len(batches) if hasattr(batches, "__len__") else None
    return batches, n
  if isinstance(batches, Sequence):
    seq = batches
    return (lambda start: (seq[i % len(seq)] for i in itertools.count(start))), len(seq)
  return (lambda start: itertools.islice(iter(batches), start, None)), None


def total_steps(config: SFTConfig, per_epoch: int | None) -> int:
  if config.max_steps:
    return config.max_steps
  if per_epoch == 0:
    raise ValueError("the SFT data has no batches (an empty dataset, or every example skipped)")
  if not per_epoch:
    raise ValueError("SFTConfig.max_steps = 0 needs the number of batches per epoch "
                     "(pass num_batches= or a sized source)")
  return max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))


def _check_batch(b: Batch, config: SFTConfig, index: int) -> None:
  missing = [k for k in BATCH_KEYS if k not in b]
  if missing:
    raise KeyError(f"batch {index}: missing {missing} (the SFT batch contract needs {list(BATCH_KEYS)})")
  shape = np.shape(b["input_ids"])
  if shape != (config.batch_size, config.seq_len):
    raise ValueError(f"batch {index}: input_ids has shape {shape}, expected (batch_size, seq_len) "
                     f"= {(config.batch_size, config.seq_len)} (the global batch, the same on "
                     "every process)")
  for k in BATCH_KEYS:
    if np.shape(b[k]) != shape:
      raise ValueError(f"batch {index}: {k} has shape {np.shape(b[k])}, input_ids {shape}")


def _groups(it: Iterator[Batch], k: int, config: SFTConfig, start: int) -> Iterator[list[Batch]]:
  """Consecutive groups of k microbatches; a partial group at the end of the data is dropped."""
  index = start
  while True:
    group = list(itertools.islice(it, k))
    if len(group) < k:
      return
    for b in group:
      _check_batch(b, config, index)
      index += 1
    yield group


def _resume_check(meta: dict, config: SFTConfig, total: int, directory: str) -> None:
  saved = meta.get("config", {})
  now = to_dict(config)
  bad = [k for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
  if bad:
    raise ValueError(f"{directory}: the checkpoint was made with "
                     f"{ {k: saved[k] for k in bad} }, this run has { {k: now[k] for k in bad} }; "
                     "resume needs the same batch geometry and LoRA setup (or a new out_dir)")
  if meta.get("total_steps") != total:
    warnings.warn(f"{directory}: resuming a run planned for {meta.get('total_steps')} steps as "
                  f"{total} steps; the learning-rate schedule changes from here on")


def evaluate_loss(session: Session, params, batches: Iterable[Batch]) -> float:
  """Mean loss over the response tokens of all `batches` (one number, not a mean of means)."""
  total, count = 0.0, 0.0
  for b in batches:
    s, c = session.evaluate(params, session.frozen, session.put_rows(b))
    total, count = total + float(s), count + float(c)
  return total / max(count, 1.0)


def train(model: CausalLM, tokenizer, batches_fn: BatchesFn | Sequence[Batch] | Iterable[Batch],
          config: SFTConfig, *, out_dir: str, mesh=None, eval_batches: Iterable[Batch] | None = None,
          num_batches: int | None = None) -> TrainResult:
  """Supervised fine-tuning of `model` on the SFT batches of `batches_fn`; resumes from the latest
  checkpoint in `out_dir/checkpoints` if there is one.

  `batches_fn(start)` yields microbatches ([batch_size, seq_len] dicts of the SFT batch contract)
  from microbatch index `start` on; a list of batches or a re-iterable also works. With several
  processes, every process yields the same global batches (data.pipeline.sft_batches does: every
  host packs all records the same way), and each process' devices take their rows, so a run's
  losses do not depend on the number of processes. `num_batches`:
  microbatches per epoch, needed when max_steps = 0 and the source has no len().
  """
  os.makedirs(out_dir, exist_ok=True)
  if eval_batches is not None and iter(eval_batches) is eval_batches:
    eval_batches = list(eval_batches)  # a one-shot iterator: kept for every evaluation
  mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
  source, per_epoch = as_source(batches_fn)
  total = total_steps(config, num_batches or per_epoch)
  session = make_session(model, config, mesh, total)
  ckpts = Checkpoints(os.path.join(out_dir, "checkpoints"), keep=config.keep_checkpoints,
                      async_save=config.async_checkpoint)
  resumed = ckpts.latest_step()
  with jax.set_mesh(mesh):
    if resumed is not None:
      session.init_params = None  # not needed: free them before the restore allocates
      state, meta, _ = ckpts.restore(session.abstract_state())
      _resume_check(meta, config, total, ckpts.directory)
      start, position = int(meta["step"]), int(meta["position"])
    else:
      state, start, position = session.init_state(), 0, 0
    metrics = MetricsWriter(out_dir, tensorboard=config.tensorboard, resume_step=start)
    try:
      losses, evals, state, last = _loop(session, state, source, position, start, total, config,
                                         ckpts, metrics, eval_batches)
    finally:
      ckpts.close()
      metrics.close()
    final = merge_lora(session.model(state["params"]))
  export_dir = None
  if config.export:
    export_dir = os.path.join(out_dir, "student")
    export(final, tokenizer, export_dir, dtype=config.export_dtype)
  return TrainResult(final, losses, evals, last, total, resumed, out_dir, ckpts.directory,
                     metrics.path, export_dir)


def _loop(session: Session, state, source: BatchesFn, position: int, start: int, total: int,
          config: SFTConfig, ckpts: Checkpoints, metrics: MetricsWriter, eval_batches):
  from tqdm.auto import tqdm

  k = config.grad_accum
  fpt = session.model_config.flops_per_token(config.seq_len) * (2 if config.lora.enabled else 3)
  peak = peak_flops(config)
  n_dev = session.mesh.size
  losses: dict[int, float] = {}
  evals: dict[int, float] = {}
  saved = start
  window = {"t": None, "tokens": 0, "real": 0, "steps": 0, "timed": 0, "loss": 0.0}
  pending: list[tuple[int, Any, int, int]] = []
  bar = tqdm(total=total, initial=start, desc="sft", dynamic_ncols=True,
             disable=not config.progress or jax.process_index() != 0)

  def settle_one(n, m, positions, real):
    m = jax.device_get(m)
    if not (m["loss_finite"] and m["grad_finite"]):
      bad = [w for w, ok in (("loss", m["loss_finite"]), ("gradient norm", m["grad_finite"])) if not ok]
      which = " and ".join(bad) + (" are" if len(bad) > 1 else " is")
      last = ckpts.latest_step()
      raise NonFiniteError(
          f"step {n}: the {which} not finite (loss={m['loss']}, grad_norm={m['grad_norm']}); "
          f"the run stopped without saving that state; the last good checkpoint is "
          f"{'step ' + str(last) + ' in ' + ckpts.directory if last is not None else 'none'}")
    losses[n] = float(m["loss"])
    now = time.perf_counter()
    if window["t"] is None:  # the first step includes compilation: time from its end
      window["t"] = now
    else:
      window["tokens"] += positions
      window["real"] += real
      window["timed"] += 1
    window["steps"] += 1
    window["loss"] += float(m["loss"])
    bar.update(1)
    if n % config.log_every == 0 or n == total:
      dt = now - window["t"]
      row = {"loss": float(m["loss"]), "loss_avg": window["loss"] / window["steps"],
             "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
             "response_tokens": float(m["tokens"])}
      if config.z_loss:
        row["z_loss"] = float(m["z_loss"])
      if window["timed"] and dt > 0:
        tps = window["tokens"] / dt
        row.update(tokens_per_s=tps, real_tokens_per_s=window["real"] / dt,
                   step_time_s=dt / window["timed"])
        if peak:
          row["mfu"] = fpt * tps / (peak * n_dev)
      metrics.write(n, row, prefix="train")
      bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
      window.update(t=now, tokens=0, real=0, steps=0, timed=0, loss=0.0)

  def settle(keep: int = 0):
    """Checks and logs dispatched steps, all but the newest `keep` (NaN/Inf stops the run)."""
    while len(pending) > keep:
      settle_one(*pending.pop(0))

  def save(n):
    nonlocal saved
    settle()  # never save a state whose step has not been checked
    ckpts.save(n, state, {"step": n, "position": position, "total_steps": total,
                          "config": to_dict(config)})
    saved = n

  def run_eval(n):
    settle()
    loss = evaluate_loss(session, state["params"], eval_batches)
    evals[n] = loss
    metrics.write(n, {"loss": loss}, prefix="eval")
    bar.write(f"step {n}: eval loss {loss:.4f}")

  n = start
  try:
    groups = _groups(iter(source(position)), k, config, position) if start < total else iter(())
    for group in groups:
      if n >= total:
        break
      batch = session.put_batch(group)
      state, m = session.step(state, session.frozen, batch)
      n += 1
      position += k
      positions = k * config.batch_size * config.seq_len
      real = int(sum(int(np.count_nonzero(np.asarray(b["segment_ids"]))) for b in group))
      pending.append((n, m, positions, real))
      settle(keep=1)  # one step of lag: the host does not wait for the step it just queued
      if n % config.checkpoint_every == 0 or n == total:
        save(n)
      if eval_batches is not None and config.eval_every and n % config.eval_every == 0:
        run_eval(n)
    settle()
    if n < total:
      log.warning("the data ran out after step %d of %d", n, total)
    if saved != n:
      save(n)
    if eval_batches is not None and n not in evals and n > start:
      run_eval(n)
  finally:
    bar.close()
  return losses, evals, state, n


def export(model: nnx.Module, tokenizer, path: str, *, dtype: str | None = "bfloat16") -> str:
  """Writes the student (LoRA merged) in HF layout to `path` (replaced whole, via a temp dir)."""
  model = merge_lora(model)
  if jax.process_count() > 1:  # every host holds only its shards: gather them (all hosts take part)
    from jax.experimental import multihost_utils
    state = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True),
                         nnx.state(model))
    model = nnx.merge(nnx.graphdef(model), state)
  if jax.process_index() != 0:
    return path
  tmp = path.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  save_pretrained(model, tokenizer, tmp, dtype=dtype)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)
  return path
