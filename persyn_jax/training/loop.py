"""The training loop: take a batch, run the step, call the hooks that are due; nothing else.

    loop = TrainLoop(step, total_steps=1000)
    loop.add_hook(log_metrics, every=10)
    loop.add_hook(checkpoint_hook(ckpts, meta), every=500, at_end=True)
    loop.add_hook(early_stopping_hook, every=50)       # may call info.loop.stop()
    state, last = loop.run(state, batches, start=0)

Logging, checkpoints, evaluation and early stopping are hooks; the loop does not know any of them.
A hook with `at_end` also runs once after the last step if its schedule did not land on it (the
final checkpoint, the final evaluation).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from persyn_jax.training.state import TrainState


@dataclasses.dataclass
class StepInfo:
  """What a hook sees: the step just completed (1-based), the state after it, its metrics (device
  arrays) and batch (as the loop took it), both None in an at-end call, and the loop (to stop it)."""

  step: int
  state: TrainState
  metrics: dict[str, Any] | None
  batch: Any
  loop: "TrainLoop"


@dataclasses.dataclass
class _Hook:
  fn: Callable[[StepInfo], None]
  every: int
  at_end: bool
  last: int | None = None


class TrainLoop:
  """Runs `step(state, batch) -> (state, metrics)` up to `total_steps`, calling hooks."""

  def __init__(self, step: Callable[[TrainState, Any], tuple[TrainState, Any]], total_steps: int):
    self.step_fn, self.total_steps = step, total_steps
    self.hooks: list[_Hook] = []
    self.stopped = False

  def add_hook(self, fn: Callable[[StepInfo], None], *, every: int = 1, at_end: bool = False
               ) -> Callable[[StepInfo], None]:
    """Calls fn(info) after every step whose number is a multiple of `every`, in the order the
    hooks were added; returns fn."""
    if every < 1:
      raise ValueError(f"add_hook(every={every}): must be >= 1")
    self.hooks.append(_Hook(fn, every, at_end))
    return fn

  def stop(self) -> None:
    """Ends the run after the current step's hooks (early stopping)."""
    self.stopped = True

  def run(self, state: TrainState, batches: Iterable, *, start: int = 0) -> tuple[TrainState, int]:
    """(final state, last completed step). Runs steps start+1 .. total_steps, fewer when the
    batches run out or a hook stops the loop; no batch is taken that would not be stepped."""
    n, it = start, iter(batches)
    while n < self.total_steps and not self.stopped:
      batch = next(it, None)
      if batch is None:
        break
      state, metrics = self.step_fn(state, batch)
      n += 1
      info = StepInfo(n, state, metrics, batch, self)
      for hook in self.hooks:
        if n % hook.every == 0:
          hook.fn(info)
          hook.last = n
    for hook in self.hooks:
      if hook.at_end and n > start and hook.last != n:
        hook.fn(StepInfo(n, state, None, None, self))
        hook.last = n
    return state, n


def checkpoint_hook(manager, meta: Callable[[int], dict], *,
                    before: Callable[[], None] | None = None) -> Callable[[StepInfo], None]:
  """A hook that saves the state with meta(step) into a checkpoints.CheckpointManager; `before`
  runs first (e.g. checking the pending steps' metrics, so that a bad state is never saved)."""
  def save(info: StepInfo) -> None:
    if before is not None:
      before()
    manager.save(info.step, info.state, meta(info.step))
  return save


class EarlyStopping:
  """Patience on an evaluation loss; keeps a copy of the best parameters.

  update(step, loss, params) -> True when the loop should stop: `patience` evaluations in a row
  without an improvement of more than `min_delta` over the best loss so far.
  """

  def __init__(self, *, patience: int, min_delta: float):
    self.patience, self.min_delta = patience, min_delta
    self.best_loss, self.best_step, self.best_params = math.inf, None, None
    self.bad, self.stopped = 0, False

  def update(self, step: int, loss: float, params) -> bool:
    if loss < self.best_loss - self.min_delta:
      self.best_loss, self.best_step, self.bad = loss, step, 0
      # a copy: the next (donating) step deletes the buffers of `params`
      self.best_params = jax.tree.map(jnp.copy, params)
    else:
      self.bad += 1
      self.stopped = self.bad >= self.patience
    return self.stopped
