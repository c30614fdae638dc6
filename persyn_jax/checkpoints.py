"""Orbax checkpoints, in one place: a manager for train states and plain parameter trees.

    ckpts = CheckpointManager("run/sft/checkpoints", keep=2)      # train states, every K steps
    ckpts.save(step, state, {"position": p})                     # async: returns once copied
    state, meta, step = ckpts.restore(abstract_state)             # placed by its shardings
    save_tree("run/router/state", params)                         # one parameter tree
    params = restore_tree("run/router/state", abstract(params_shapes, shardings))

A low layer: it knows orbax, jax and sharding, nothing about models or stages. A state is any
pytree (training.TrainState included: orbax stores its fields by name, so a {"step", "params",
"opt_state"} dict and a TrainState of the same leaves read each other's checkpoints).
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from persyn_jax import fs
from persyn_jax.models.checks import CheckpointError


def _damaged(path: str, e: BaseException) -> str:
  return (f"{path}: not a readable orbax checkpoint, damaged or replaced "
          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})")


def abstract(shapes, shardings):
  """The restore target of a tree: ShapeDtypeStructs of `shapes` placed by `shardings` (a tree of
  the same structure). Orbax reads each device's chunks straight into place, casting to the
  target's dtype while it reads."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      shardings)


class CheckpointManager:
  """Train states saved every K steps (asynchronously) with a JSON meta, keeping the newest N."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = fs.abspath(directory)  # a gs:// directory goes to orbax as it is
    if fs.exists(self.directory) and not fs.isdir(self.directory):
      raise CheckpointError(f"{self.directory}: a file where the checkpoint directory should be "
                            f"(damaged or replaced); move it away to train from the start")
    # (step, why) of each damaged step that restore() skipped and moved aside
    self.skipped: list[tuple[int, str]] = []
    # A save killed midway on local disk leaves `<step>.orbax-checkpoint-tmp-*`; orbax removes
    # them here. Left there, a step saved again later would outlive `keep`: orbax deletes a step
    # through its tmp dir when one exists. (On gs:// a step commits in place, by a file.)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=not fs.is_remote(self.directory))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete step; a save that died midway (an orbax tmp dir) is not a step."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Starts saving; device buffers are copied before this returns, so the next (donating)
    step may run while the files are written."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int]:
    """(state placed as `abstract_state`'s shardings say, meta, step) of `step` or the latest.

    Without `step`, a damaged step (its files replaced by junk, cut short) is moved aside as
    `corrupt-<step>-<time>` and the previous step restored instead; `skipped` lists them. Only
    when no step is readable is it a CheckpointError naming the directory. A checkpoint whose
    tree differs from `abstract_state` (another optimizer, another version's state layout) is
    refused with the step directory and orbax's account of the difference."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    for s in steps:
      path = fs.join(self.directory, str(s))
      try:
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except ValueError as e:
        if "do not match" in str(e):
          raise ValueError(
              f"{path}: the saved train state is laid out differently from this run's (another "
              f"persyn_jax version, optimizer or LoRA setup); start from a new directory. "
              f"orbax: {e}") from None
        error = e
      except Exception as e:  # noqa: BLE001 - junk in a step dir fails anywhere inside orbax
        error = e
      else:
        if self.skipped:
          self.manager.reload()  # the steps moved aside are no longer steps
        return out["state"], out["meta"], s
      if step is not None:
        raise CheckpointError(_damaged(path, error)) from None
      self.skipped.append((s, _damaged(path, error)))
      if jax.process_index() == 0:  # kept for inspection, out of orbax's sight (not a number)
        aside, n = fs.join(self.directory, f"corrupt-{s}-{time.strftime('%Y%m%d-%H%M%S')}"), 0
        while fs.exists(aside + (f"-{n}" if n else "")):
          n += 1
        fs.rename(path, aside + (f"-{n}" if n else ""))
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"checkpoints:aside:{s}")
    raise CheckpointError(f"{self.directory}: no readable checkpoint (steps {steps} are damaged, "
                          f"moved aside as corrupt-<step>-*): {self.skipped[0][1]}. Move the "
                          f"directory away to train from the start")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_tree(path: str, tree) -> None:
  """Writes a parameter tree (nested dicts of arrays) to `path`, replacing it; collective over
  processes (each writes its own shards), and finished when this returns."""
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(fs.abspath(path), tree, force=True)
  ckpt.wait_until_finished()


def restore_tree(path: str, abstract_tree):
  """The tree saved at `path`, each leaf placed and typed as `abstract_tree` says (see abstract)."""
  path = fs.abspath(path)
  if not fs.isdir(path):
    raise FileNotFoundError(f"{path}: no saved tree (expected an orbax checkpoint directory)")
  try:
    return ocp.StandardCheckpointer().restore(path, abstract_tree)
  except ValueError as e:
    if "do not match" in str(e):
      raise
    raise CheckpointError(_damaged(path, e)) from None
  except Exception as e:  # noqa: BLE001 - junk in the directory fails anywhere inside orbax
    raise CheckpointError(_damaged(path, e)) from None
