"""Orbax checkpoints of the SFT state (trained parameters, optimizer state, step) and its data
position, saved asynchronously every K steps and at the end, keeping the newest N."""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpoints:
  """A thin CheckpointManager: `save(step, state, meta)`, `restore(abstract_state)`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Starts saving; device buffers are copied before this returns, so the next (donating)
    step may run while the files are written."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state, step: int | None = None) -> tuple[dict[str, Any], dict, int]:
    """(state placed as `abstract_state`'s shardings say, meta, step) of `step` or the latest."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

