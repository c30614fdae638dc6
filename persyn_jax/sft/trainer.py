"""`train()`: the SFT run read top to bottom — data in order from a resumable source, the
training core's loop with hooks (step log and NaN stop, checkpoints, eval), export of the student
in HF layout."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.checkpoints import CheckpointManager
from persyn_jax.config import to_dict
from persyn_jax.metrics import MetricsWriter, WandbConfig
from persyn_jax.models import CausalLM, save_pretrained
from persyn_jax.models.lora import merge_lora
from persyn_jax.sft.config import SFTConfig
from persyn_jax.sft.log import StepLog, train_flops_per_token
from persyn_jax.sft.loss import BATCH_KEYS
from persyn_jax.sft.session import Session, make_session
from persyn_jax.training import TrainLoop, checkpoint_hook

log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]
BatchesFn = Callable[[int], Iterator[Batch]]

# Keys of the config that fix the data position and the parameter structure of a checkpoint.
RESUME_KEYS = ("batch_size", "grad_accum", "seq_len", "lora")


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
          num_batches: int | None = None, wandb: WandbConfig | None = None,
          run_name: str | None = None, checkpoint_dir: str | None = None) -> TrainResult:
  """Supervised fine-tuning of `model` on the SFT batches of `batches_fn`; resumes from the latest
  checkpoint in `checkpoint_dir` (default `out_dir/checkpoints`) if there is one.

  `checkpoint_dir` may be elsewhere than `out_dir`, e.g. gs://: every process of a multi-host job
  and a machine that replaces a preempted one then see the same checkpoints, while the metrics
  and the exported student (libraries that write local files) go to a local `out_dir`.

  `batches_fn(start)` yields microbatches ([batch_size, seq_len] dicts of the SFT batch contract)
  from microbatch index `start` on; a list of batches or a re-iterable also works. With several
  processes, every process yields the same global batches (data.pipeline.sft_batches does: every
  host packs all records the same way), and each process' devices take their rows, so a run's
  losses do not depend on the number of processes. `num_batches`:
  microbatches per epoch, needed when max_steps = 0 and the source has no len(). `wandb`: also
  log the metrics to Weights & Biases, as the run `run_name`.
  """
  os.makedirs(out_dir, exist_ok=True)
  if eval_batches is not None and iter(eval_batches) is eval_batches:
    eval_batches = list(eval_batches)  # a one-shot iterator: kept for every evaluation
  mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
  source, per_epoch = as_source(batches_fn)
  total = total_steps(config, num_batches or per_epoch)
  session = make_session(model, config, mesh, total)
  ckpts = CheckpointManager(checkpoint_dir or os.path.join(out_dir, "checkpoints"),
                            keep=config.keep_checkpoints, async_save=config.async_checkpoint)
  resumed = ckpts.latest_step()
  with jax.set_mesh(mesh):
    if resumed is not None:
      session.init_params = None  # not needed: free them before the restore allocates
      state, meta, resumed = ckpts.restore(session.abstract_state())
      for step, why in ckpts.skipped:
        log.warning("checkpoint step %d skipped and moved aside: %s; resuming from step %d",
                    step, why, resumed)
      _resume_check(meta, config, total, ckpts.directory)
      start, position = int(meta["step"]), int(meta["position"])
    else:
      state, start, position = session.init_state(), 0, 0
    metrics = MetricsWriter(out_dir, tensorboard=config.tensorboard, resume_step=start,
                            wandb=wandb, wandb_name=run_name)
    try:
      steplog, evals, state, last = _run(session, state, source, position, start, total, config,
                                         ckpts, metrics, eval_batches)
    finally:
      ckpts.close()
      metrics.close()
    final = merge_lora(session.model(state.params))
  export_dir = None
  if config.export:
    export_dir = os.path.join(out_dir, "student")
    export(final, tokenizer, export_dir, dtype=config.export_dtype)
  return TrainResult(final, steplog.losses, evals, last, total, resumed, out_dir, ckpts.directory,
                     metrics.path, export_dir)


def _run(session: Session, state, source: BatchesFn, position: int, start: int, total: int,
         config: SFTConfig, ckpts: CheckpointManager, metrics: MetricsWriter, eval_batches):
  """The loop and its hooks: the step log (every step, one step late), checkpoints every
  checkpoint_every steps and at the end, eval every eval_every steps and at the end."""
  k = config.grad_accum
  step = lambda state, group: session.step(state, session.frozen, session.put_batch(group))
  loop = TrainLoop(step, total)

  def last_checkpoint() -> str:
    last = ckpts.latest_step()
    return f"step {last} in {ckpts.directory}" if last is not None else "none"

  fpt = train_flops_per_token(session.model_config, config)
  steplog = StepLog(config, total=total, start=start, flops_per_token=fpt,
                    devices=session.mesh.size, metrics=metrics, last_checkpoint=last_checkpoint)
  loop.add_hook(steplog, every=1)
  # the data position of step n: microbatches are consumed k per step from `position` on
  meta = lambda n: {"step": n, "position": position + (n - start) * k, "total_steps": total,
                    "config": to_dict(config)}
  # never save a state whose step has not been checked (paused() settles the pending steps first),
  # and keep the save's time out of the logged step time and MFU
  save = checkpoint_hook(ckpts, meta)

  def checkpoint(info):
    with steplog.paused():
      save(info)
  loop.add_hook(checkpoint, every=config.checkpoint_every, at_end=True)
  evals: dict[int, float] = {}
  if eval_batches is not None:
    def run_eval(info):
      with steplog.paused():
        loss = evaluate_loss(session, info.state.params, eval_batches)
      evals[info.step] = loss
      metrics.write(info.step, {"loss": loss}, prefix="eval")
      steplog.bar.write(f"step {info.step}: eval loss {loss:.4f}")
    # eval_every = 0: only at the end
    loop.add_hook(run_eval, every=config.eval_every or total + 1, at_end=True)
  try:
    groups = _groups(iter(source(position)), k, config, position) if start < total else iter(())
    state, n = loop.run(state, groups, start=start)
    steplog.flush()
    if n < total:
      log.warning("the data ran out after step %d of %d", n, total)
  finally:
    steplog.close()
  return steplog, evals, state, n


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
