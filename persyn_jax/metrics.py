"""Metrics to JSONL (one line per logged step), TensorBoard and, optionally, Weights & Biases,
written by process 0 only; and the progress bars of the long stages.

    with MetricsWriter(run_dir, wandb=WandbConfig(project="persyn")) as mw:
      mw.write(step, {"loss": 1.2, "lr": 3e-5}, prefix="train")

A run resumed from step n drops the lines of steps > n first (`resume_step=n`), so the file reads
as one uninterrupted run; the W&B run it continues is the one whose id `wandb.json` keeps.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

from persyn_jax.config import ConfigError
from persyn_jax.io_utils import atomic_write_text, dumps


def _scalar(v: Any):
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (int, np.integer)):
    return int(v)
  if isinstance(v, (float, np.floating)) or (hasattr(v, "shape") and np.ndim(v) == 0):
    f = float(v)
    return f if math.isfinite(f) else None  # JSON has no NaN: null, as in every JSON file we write
  return v


WANDB_MODES = ("online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """The run config's `wandb:` section (null: no W&B). Needs the optional extra
  `pip install "persyn-jax[wandb]"`; the package is imported only when this is set."""

  project: str = "persyn_jax"
  entity: str | None = None     # None: the logged-in user's default entity
  mode: str = "online"          # online, offline (sync later with `wandb sync`), disabled

  def __post_init__(self):
    if self.mode not in WANDB_MODES:
      raise ValueError(f"wandb.mode={self.mode!r}: one of {list(WANDB_MODES)}")
    if not self.project:
      raise ValueError("wandb.project is empty: name the W&B project (or set wandb: null)")


class MissingExtraError(ConfigError, ImportError):
  """An optional extra the config asks for is not installed: bad input (the CLI prints one line
  and exits 2, as for any ConfigError), and still an ImportError for callers that catch that."""


def import_wandb():
  try:
    import wandb
  except ImportError:
    raise MissingExtraError("the run config sets `wandb:` but the wandb package is not installed: "
                      'install the extra with `pip install "persyn-jax[wandb]"` (or set '
                      "wandb: null)") from None
  return wandb


def _start_wandb(config: WandbConfig, out_dir: str, name: str | None, resume: bool):
  """A W&B run for out_dir: a resumed writer continues the run whose id out_dir/wandb.json keeps."""
  wandb = import_wandb()
  id_path = os.path.join(out_dir, "wandb.json")
  run_id = None
  if resume and os.path.exists(id_path):
    with open(id_path, encoding="utf-8") as f:
      run_id = json.load(f).get("id")
  run = wandb.init(project=config.project, entity=config.entity, mode=config.mode, name=name,
                   dir=out_dir, id=run_id, resume="allow" if run_id else None)
  if not run_id and getattr(run, "id", None):
    from persyn_jax.io_utils import atomic_write_json
    atomic_write_json(id_path, {"id": run.id, "project": config.project})
  return run


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True):
  """A tqdm bar (on stderr) on process 0; on the other processes, or when not enabled, one that
  shows nothing (the same calls work on both)."""
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
              disable=not (enabled and jax.process_index() == 0))


class MetricsWriter:
  def __init__(self, out_dir: str, *, filename: str = "metrics.jsonl", tensorboard: bool = True,
               resume_step: int | None = None, enabled: bool | None = None,
               wandb: WandbConfig | None = None, wandb_name: str | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(out_dir, filename)
    self._tb = None
    self._f = None
    self._wandb = None
    if not self.enabled:
      return
    if wandb is not None:
      import_wandb()  # a missing package fails here, before any file is opened
    os.makedirs(out_dir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      self._truncate_after(resume_step)
    self._f = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      # tensorboardX names its file by the second it opens it, and opens it "wb": a writer
      # resumed within the same second would empty the previous one's. The nanoseconds keep the
      # names apart, sorted in the order written (TensorBoard reads the files in name order).
      self._tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=(
          resume_step + 1 if resume_step is not None else None),
          filename_suffix=f".{time.time_ns()}")
    if wandb is not None:
      self._wandb = _start_wandb(wandb, out_dir, wandb_name, resume=resume_step is not None)

  def _truncate_after(self, step: int) -> None:
    keep = []
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          if json.loads(line).get("step", -1) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")  # cut before its newline
        except json.JSONDecodeError:  # a line cut by a kill: drop it
          continue
    atomic_write_text(self.path, "".join(keep))

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str | None = None) -> None:
    if not self.enabled:
      return
    row = {k: _scalar(v) for k, v in metrics.items()}
    record = {"step": int(step), **({"split": prefix} if prefix else {}), **row}
    self._f.write(dumps(record) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{prefix}/{k}" if prefix else k, v, int(step))
    if self._wandb is not None:
      self._wandb.log({f"{prefix}/{k}" if prefix else k: v for k, v in row.items()
                       if isinstance(v, (int, float))}, step=int(step))

  def flush(self) -> None:
    if self._f:
      self._f.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._f:
      self._f.close()
      self._f = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(path: str, split: str | None = None) -> list[dict]:
  """The records of a metrics.jsonl (of one split, if given)."""
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r.get("split") == split]
