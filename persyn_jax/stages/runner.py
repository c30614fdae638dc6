"""The runner: executes the declared stages in order, each into run_dir/<stage>/, skipping those
already done.

When a stage finishes, a `DONE.json` manifest records its key (graph.stage_key: its name, the
keys of the stages it reads, the config it reads) and its counts. A rerun skips a stage whose
key matches; a stage whose inputs or config changed is moved aside (never deleted) and run
again; a stopped stage resumes from its completed shards (and SFT from its last checkpoint).
With several processes each host writes its own shards; only process 0 writes manifests and
the report, and every process takes process 0's decision.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from typing import Sequence

from persyn_jax import config as C
from persyn_jax import distributed as dist
from persyn_jax import fs, preflight
from persyn_jax.data.shards import ShardError
from persyn_jax.io_utils import atomic_write_json
from persyn_jax.models.checks import CheckpointError
from persyn_jax.run_config import STAGES, RunConfig
from persyn_jax.stages import eval as eval_stage
from persyn_jax.stages import generate, probe, route, router, score, sft, study
from persyn_jax.stages.context import ACTIVITY, Context, Log, doing, log_to_stdout
from persyn_jax.stages.graph import Stage, check_graph, stage_key
from persyn_jax.stages.lock import RunDirError, RunLock, RunLockedError, prepare_run_dir

GRAPH: tuple[Stage, ...] = tuple(m.STAGE for m in (probe, score, router, route, generate, sft,
                                                   eval_stage, study))
check_graph(GRAPH, STAGES, [f.name for f in dataclasses.fields(RunConfig)])

# The manifest layout: 2 since stage keys are derived from the stage declarations (graph.py).
FORMAT = 2


__all__ = ["Run", "RunDirError", "RunLockedError", "GRAPH", "FORMAT"]


class Run:
  """One run directory. `run(stages)` executes the stages in order, skipping finished ones."""

  def __init__(self, cfg: RunConfig, *, log: Log = log_to_stdout):
    self.ctx = Context(cfg, log=log)
    self.cfg, self.log, self.dir = cfg, log, self.ctx.dir
    self.keys: dict[str, str] = {}
    self._unreadable: set[str] = set()

  def path(self, *parts: str) -> str:
    return self.ctx.path(*parts)

  def manifest(self, stage: str) -> dict | None:
    """The stage's DONE.json, or None when it has none. A truncated or corrupt one (a disk that
    failed after the atomic write, a hand edit) counts as none: the stage is incomplete and runs
    again, resuming from its complete shards, and the log says so once."""
    p = self.path(stage, "DONE.json")
    if not fs.exists(p):
      return None
    try:
      with fs.open(p, "rb") as f:
        m = json.loads(f.read().decode("utf-8"))
      if not isinstance(m, dict) or not isinstance(m.get("key"), str):
        raise ValueError(f"not a manifest object: {str(m)[:60]!r}")
    except (OSError, ValueError) as e:
      if stage not in self._unreadable:
        self._unreadable.add(stage)
        self.log(f"[{stage}] {p} is unreadable ({type(e).__name__}: {e}); treating {stage} as "
                 f"incomplete: it runs again from its complete shards")
      return None
    return m

  def _check_format(self) -> None:
    """Refuses a run directory whose manifests predate FORMAT: their keys cannot be compared."""
    old = [s for s in STAGES if (m := self.manifest(s)) is not None and m.get("format") != FORMAT]
    old = dist.broadcast_json(old)  # process 0's view: all refuse alike
    if old:
      found = self.manifest(old[0]) or {}
      raise RunDirError(
          f"{self.path(old[0], 'DONE.json')}: a manifest of format {found.get('format', 1)}, "
          f"not {FORMAT} (stages {old}). The stage keys changed in this version of persyn_jax, so "
          f"its finished stages cannot be matched to a config: use a new --run-dir (or remove "
          f"{self.dir}).")

  def done(self, stage: str, counts: dict, seconds: float) -> None:
    if dist.is_writer():
      atomic_write_json(self.path(stage, "DONE.json"), {
          "format": FORMAT, "stage": stage, "key": self.keys[stage], "counts": counts,
          "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})

  def run(self, stages: Sequence[str] = STAGES, *, redo: Sequence[str] = ()) -> dict | None:
    """Runs `stages` (and `redo`) in graph order. A stage in `redo` runs even if it is done: its
    complete shards are checked and kept, the missing or corrupt ones are written again (the
    way to repair a stage whose files were damaged after it finished).

    First, the CLI's preflight checks (persyn_jax.preflight) of these stages: a config that would
    fail one of them later raises ConfigError, listing every problem, before any work.

    Only one run at a time may use a run directory (a lock, see stages/lock.py); with several
    processes, process 0 takes it and every process raises alike when it is refused."""
    bad = [s for s in (*stages, *redo) if s not in STAGES]
    if bad:
      raise ValueError(f"unknown stages {bad}; stages: {', '.join(STAGES)}")
    # The CLI's preflight, for a run started from Python too: nothing starts that would fail later.
    found = preflight.problems(self.cfg, (*stages, *redo))
    if found:
      raise C.ConfigError(preflight.format_problems(found))
    lock, error = RunLock(self.dir, self.log), None
    if dist.is_writer():
      try:
        prepare_run_dir(self.dir)
        lock.acquire()
      except (RunDirError, RunLockedError) as e:
        error = e
    if dist.is_multiprocess():
      dist.raise_if_any(str(error) if error else None, type(error) if error else RunDirError,
                        f"{self.dir}: the run directory")
    elif error:
      raise error
    ACTIVITY.clear()  # what an earlier run in this process left when it failed
    try:
      with doing(run_dir=self.dir):
        return self._run(tuple(stages) + tuple(s for s in redo if s not in stages), set(redo))
    finally:
      lock.release()

  def _run(self, stages: Sequence[str], redo: set[str]) -> dict | None:
    self._check_format()
    if dist.is_writer():
      atomic_write_json(self.path("config.json"), C.to_dict(self.cfg))
    for st in GRAPH:
      stage = st.name
      self.keys[stage] = stage_key(st, self.cfg, self.keys)
      m = dist.broadcast_json(self.manifest(stage))  # process 0's view: all run or skip alike
      if stage not in stages:
        continue
      if stage in redo and m is not None and m.get("key") == self.keys[stage]:
        self.log(f"[{stage}] --redo: checking its shards; the missing or corrupt ones are written "
                 f"again")
        m = None
        if dist.is_writer():
          fs.remove(self.path(stage, "DONE.json"))
      if m is not None and m.get("key") == self.keys[stage]:
        self.log(f"[{stage}] done earlier ({m['seconds']} s); skipped")
        continue
      # The key an unfinished earlier try of the stage ran with (STARTED.json): its complete
      # shards and checkpoints are resumed only under the same key.
      started = dist.broadcast_json(self._started(stage) if m is None else None)
      if m is not None or (started is not None and started != self.keys[stage]):
        # inputs or config changed: keep the old outputs aside, never delete them
        self._set_aside(st, "finished" if m is not None else "unfinished")
      if dist.is_writer():
        atomic_write_json(self.path(stage, "STARTED.json"),
                          {"format": FORMAT, "stage": stage, "key": self.keys[stage]})
      self.log(f"[{stage}] running")
      t0 = time.time()
      with doing(stage=stage):
        counts = self._run_stage(st)
      self.done(stage, counts, time.time() - t0)
      dist.barrier(f"{stage}:done")  # its files exist before the next stage reads them
      self.log(f"[{stage}] done in {time.time() - t0:.1f} s")
      gc.collect()
    if (self.cfg.sweep.alpha and "eval" in stages
        and all(self.manifest(s) is not None for s in STAGES)):
      from persyn_jax.stages.sweep import run_sweep  # the alpha sweep: a run per alpha (sweep.py)
      with doing(stage="sweep"):
        run_sweep(self)
    if dist.is_writer() and all(self.manifest(s) is not None for s in STAGES):
      with doing(stage="report"):
        return self._report()
    return None

  def _started(self, stage: str) -> str | None:
    """The key in the stage's STARTED.json (None: none, or unreadable)."""
    p = self.path(stage, "STARTED.json")
    try:
      with fs.open(p, "rb") as f:
        key = json.loads(f.read().decode("utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
      return None
    return key if isinstance(key, str) else None

  def _set_aside(self, st: Stage, what: str) -> None:
    """Moves the stage's folder and its other outputs (data/ for generate) to
    `<folder>.stale-<time>`: a run with another config never resumes from, nor keeps, them."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for d in (st.name, *st.outputs):
      if not fs.exists(self.path(d)):
        continue
      stale = self.path(f"{d}.stale-{stamp}")
      self.log(f"[{st.name}] config or inputs changed since its {what} run; moving {d} to "
               f"{stale}")
      if dist.is_writer():
        _move_aside(self.path(d), stale)
    dist.barrier(f"{st.name}:stale")

  def _run_stage(self, st: Stage) -> dict:
    """Runs `st`; a damaged shard or checkpoint of a stage that finished earlier is named with
    the way to regenerate it (`--redo <that stage>`)."""
    try:
      return st.run(self.ctx)
    except (ShardError, CheckpointError) as e:
      msg = str(e)
      damaged = next((s for s in STAGES if s != st.name and msg.startswith(self.path(s, ""))
                      and self.manifest(s) is not None), None)
      if damaged is None:
        raise
      err = type(e)(f"{msg}. Stage {damaged!r} finished earlier, so this file was damaged "
                    f"since; to regenerate it, rerun with --redo {damaged}")
      err.redo = damaged
      raise err from None

  def _report(self) -> dict:
    """The run report (report/). On gs:// it is written from a local copy of the run's JSON
    files (the plots need a local file) and its directory uploaded."""
    from persyn_jax.report import write_run_report
    manifests = {s: self.manifest(s) for s in STAGES}
    if not fs.is_remote(self.dir):
      return write_run_report(self.ctx, manifests)
    import copy
    import shutil
    import tempfile
    local = tempfile.mkdtemp(prefix="persyn_jax-report-")
    try:
      fs.download(self.dir, local, suffixes=(".json", ".jsonl"))
      ctx = copy.copy(self.ctx)  # its JSON files and report/ are local; shards are read remotely

      def path(*parts: str) -> str:
        here = os.path.join(local, *parts)
        return here if parts[:1] == ("report",) or os.path.isfile(here) else self.path(*parts)
      ctx.path = path
      report = write_run_report(ctx, manifests)
      for name in ("report.json", "report.md"):  # the plots' paths: where they are uploaded
        p = os.path.join(local, "report", name)
        with open(p, encoding="utf-8") as f:
          text = f.read().replace(local, self.dir)
        with open(p, "w", encoding="utf-8") as f:
          f.write(text)
      report = json.loads(json.dumps(report).replace(local, self.dir))
      fs.rmtree(self.path("report"))
      fs.put(os.path.join(local, "report"), self.path("report"))
    finally:
      shutil.rmtree(local, ignore_errors=True)
    return report


# Files that commit what lies beside them: removed first when a stage is moved aside on an
# object store, so that a move cut short never leaves old shards that look complete.
_MARKERS = ("DONE.json", ".manifest.json", ".meta.json", ".plan.json", ".stats.json")


def _move_aside(src: str, dst: str) -> None:
  """os.replace for a local stage directory. On an object store (no rename) a copy of every
  object, then the deletion of the commit markers, then of the rest: a kill midway leaves a
  stage directory whose old shards are incomplete (rewritten) rather than wrongly complete."""
  if not fs.is_remote(src):
    os.replace(src, dst)
    return
  remote = fs.filesystem(src)
  remote.copy(src, dst, recursive=True)
  files = remote.find(src)
  for p in sorted(files, key=lambda p: not p.endswith(_MARKERS)):
    remote.rm_file(p)
