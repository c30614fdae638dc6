"""Metrics to JSONL (one line per logged step) and TensorBoard, written by process 0 only.

    with MetricsWriter(run_dir) as mw:
      mw.write(step, {"loss": 1.2, "lr": 3e-5}, prefix="train")

A run resumed from step n drops the lines of steps > n first (`resume_step=n`), so the file reads
as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np


def _scalar(v: Any):
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (int, np.integer)):
    return int(v)
  if isinstance(v, (float, np.floating)) or (hasattr(v, "shape") and np.ndim(v) == 0):
    f = float(v)
    return f if math.isfinite(f) else str(f)  # JSON has no NaN; keep it readable
  return v


class MetricsWriter:
  def __init__(self, out_dir: str, *, filename: str = "metrics.jsonl", tensorboard: bool = True,
               resume_step: int | None = None, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(out_dir, filename)
    self._tb = None
    self._f = None
    if not self.enabled:
      return
    os.makedirs(out_dir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      self._truncate_after(resume_step)
    self._f = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=(
          resume_step + 1 if resume_step is not None else None))

  def _truncate_after(self, step: int) -> None:
    keep = []
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          if json.loads(line).get("step", -1) <= step:
            keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill: drop it
          continue
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str | None = None) -> None:
    if not self.enabled:
      return
    row = {k: _scalar(v) for k, v in metrics.items()}
    record = {"step": int(step), **({"split": prefix} if prefix else {}), **row}
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{prefix}/{k}" if prefix else k, v, int(step))

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

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(path: str, split: str | None = None) -> list[dict]:
  """The records of a metrics.jsonl (of one split, if given)."""
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r.get("split") == split]
