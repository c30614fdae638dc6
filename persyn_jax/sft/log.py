"""The SFT loop's per-step hook: checks every step for NaN/Inf, keeps its loss, and logs throughput
(tokens/s, MFU), one step late so that the host never waits for the step it just queued."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import jax
import numpy as np

from persyn_jax.device_peaks import peak_bf16_flops
from persyn_jax.metrics import MetricsWriter
from persyn_jax.sft.config import SFTConfig
from persyn_jax.training import StepInfo


class NonFiniteError(FloatingPointError):
  """A step produced a NaN/Inf loss or gradient; the run stopped without saving that state."""


def peak_flops(config: SFTConfig, kind: str | None = None) -> float | None:
  """Peak FLOP/s of one device for MFU: config.peak_tflops, else the dense bf16 spec peak of the
  device kind (default: this machine's; persyn_jax/device_peaks.py) for a bf16 run, else None."""
  if config.peak_tflops:
    return config.peak_tflops * 1e12
  if config.compute_dtype not in ("bfloat16", "bf16"):
    return None
  return peak_bf16_flops(kind if kind is not None else jax.devices()[0].device_kind)


def train_flops_per_token(model_config, config: SFTConfig) -> float:
  """Model FLOPs per trained position, for MFU: forward + backward (2x the forward). With LoRA
  the frozen weights need no weight gradient, one of the backward's two matmuls per weight, but
  attention has no weights: its backward (dQ, dK, dV) is still 2x its forward."""
  fwd = model_config.flops_per_token(config.seq_len)
  if not config.lora.enabled:
    return 3 * fwd
  return 2 * fwd + model_config.attention_flops_per_token(config.seq_len)


class StepLog:
  """A hook for every step (add_hook(log, every=1)); `flush()` settles the steps still pending
  (before a checkpoint or an eval, and at the end). `losses` holds every settled step's loss."""

  def __init__(self, config: SFTConfig, *, total: int, start: int, flops_per_token: float,
               devices: int, metrics: MetricsWriter, last_checkpoint: Callable[[], str]):
    from tqdm.auto import tqdm
    self.config, self.total, self.metrics = config, total, metrics
    self.last_checkpoint = last_checkpoint
    self.fpt, self.peak, self.devices = flops_per_token, peak_flops(config), devices
    self.losses: dict[int, float] = {}
    self.pending: list[tuple[int, Any, int, int]] = []
    # loss and trained: the summed loss of the steps with response tokens, and their number
    self.window = {"t": None, "tokens": 0, "real": 0, "timed": 0, "loss": 0.0, "trained": 0}
    self.bar = tqdm(total=total, initial=start, desc="sft", dynamic_ncols=True,
                    disable=not config.progress or jax.process_index() != 0)

  def __call__(self, info: StepInfo) -> None:
    group = info.batch
    positions = len(group) * self.config.batch_size * self.config.seq_len
    real = int(sum(int(np.count_nonzero(np.asarray(b["segment_ids"]))) for b in group))
    self.pending.append((info.step, info.metrics, positions, real))
    self.flush(keep=1)

  @contextlib.contextmanager
  def paused(self):
    """Settles the pending steps, then leaves the time spent inside (a checkpoint, an eval) out
    of the throughput window: tokens/s, step time and MFU stay the training steps' own."""
    self.flush()
    t = time.perf_counter()
    try:
      yield
    finally:
      if self.window["t"] is not None:
        self.window["t"] += time.perf_counter() - t

  def flush(self, keep: int = 0) -> None:
    """Checks and logs dispatched steps, all but the newest `keep` (NaN/Inf stops the run)."""
    while len(self.pending) > keep:
      self._settle(*self.pending.pop(0))

  def _settle(self, n: int, m, positions: int, real: int) -> None:
    m = jax.device_get(m)
    if not (m["loss_finite"] and m["grad_finite"]):
      bad = [w for w, ok in (("loss", m["loss_finite"]), ("gradient norm", m["grad_finite"])) if not ok]
      which = " and ".join(bad) + (" are" if len(bad) > 1 else " is")
      raise NonFiniteError(
          f"step {n}: the {which} not finite (loss={m['loss']}, grad_norm={m['grad_norm']}); "
          f"the run stopped without saving that state; the last good checkpoint is "
          f"{self.last_checkpoint()}")
    self.losses[n] = float(m["loss"])
    w, now = self.window, time.perf_counter()
    if w["t"] is None:  # the first step includes compilation: time from its end
      w["t"] = now
    else:
      w["tokens"] += positions
      w["real"] += real
      w["timed"] += 1
    if m["tokens"] > 0:  # an all-padding step changed nothing and has no loss to average
      w["trained"] += 1
      w["loss"] += float(m["loss"])
    self.bar.update(1)
    if n % self.config.log_every == 0 or n == self.total:
      self._write(n, m, now)

  def _write(self, n: int, m, now: float) -> None:
    w = self.window
    dt = now - w["t"]
    row = {"loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
           "response_tokens": float(m["tokens"])}
    if w["trained"]:
      row["loss_avg"] = w["loss"] / w["trained"]
    if self.config.z_loss:
      row["z_loss"] = float(m["z_loss"])
    if w["timed"] and dt > 0:
      tps = w["tokens"] / dt
      row.update(tokens_per_s=tps, real_tokens_per_s=w["real"] / dt, step_time_s=dt / w["timed"])
      if self.peak:
        row["mfu"] = self.fpt * tps / (self.peak * self.devices)
    self.metrics.write(n, row, prefix="train")
    self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
    w.update(t=now, tokens=0, real=0, timed=0, loss=0.0, trained=0)

  def close(self) -> None:
    self.bar.close()
