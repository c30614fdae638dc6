"""`ProgressLog`: an append-only, fsync'd JSON-lines file of per-prompt outcomes, so that a
remote-teacher stage killed at any moment resumes by requesting only the prompts still missing.

Line 1 is the job's plan ({"plan": {...}}); a rerun with another plan is refused (its answers
belong to other inputs). Every later line is one prompt's outcome, {"i", "id", "ok", ...}; the
last line about a prompt wins, so a prompt that failed and later succeeded counts once. A process
killed mid-write leaves a torn last line: it is cut off when the file is opened again, and that
prompt is requested again. Lines are written whole with one write() each under a lock, and an
exclusive flock keeps a second process off the same file.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from typing import Any, Mapping

from persyn_jax import io_utils as io


class ProgressError(RuntimeError):
  """A progress file that belongs to other inputs, is damaged, or is in use (names the file)."""


class ProgressLog:
  """Open (or create) `path` for `plan`; `latest[i]` is the last outcome recorded for prompt i."""

  def __init__(self, path: str, plan: Mapping[str, Any]):
    self.path = path
    self.lock = threading.Lock()
    self.latest: dict[int, dict] = {}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self.f = open(path, "a+b")
    try:
      fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.f.close()
      raise ProgressError(f"{path}: another process is running this stage (the file is "
                          "locked)") from None
    try:
      self._load(dict(plan))
    except BaseException:
      self.close()
      raise

  def _load(self, plan: dict) -> None:
    self.f.seek(0)
    data = self.f.read()
    good = 0  # bytes of whole, parseable lines
    lines = data.split(b"\n")
    for n, line in enumerate(lines[:-1]):  # the part after the last newline is never whole
      try:
        entry = json.loads(line.decode("utf-8"))
      except ValueError:
        if n == len(lines) - 2:  # the last line: torn by a kill during its write
          break
        raise ProgressError(f"{self.path}: line {n + 1} is not JSON; the file is damaged "
                            "(delete it, and the stage's shards, to start over)") from None
      if not isinstance(entry, dict) or (n and not isinstance(entry.get("i"), int)):
        raise ProgressError(f"{self.path}: line {n + 1} is not a progress entry: {line[:100]!r}")
      if n == 0:
        if entry.get("plan") != json.loads(json.dumps(plan)):
          old = entry.get("plan") or {}
          diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
          raise ProgressError(f"{self.path}: an earlier run used other {', '.join(diff)}; its "
                              f"answers cannot be resumed with these inputs (delete "
                              f"{os.path.dirname(self.path)} to start over)")
      else:
        self.latest[entry["i"]] = entry
      good += len(line) + 1
    if good == 0:  # a new file, or only a torn plan line
      self.f.truncate(0)
      self._append({"plan": plan})
      io.fsync_dir(os.path.dirname(self.path) or ".")
    elif good < len(data):
      self.f.truncate(good)
      os.fsync(self.f.fileno())

  def _append(self, entry: Mapping[str, Any]) -> None:
    line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    self.f.seek(0, os.SEEK_END)
    self.f.write(line)
    self.f.flush()
    os.fsync(self.f.fileno())

  def record(self, entry: Mapping[str, Any]) -> None:
    """Appends one prompt's outcome durably (returns once it is on disk)."""
    entry = dict(entry)
    with self.lock:
      self._append(entry)
      self.latest[int(entry["i"])] = entry

  def done(self) -> set[int]:
    return {i for i, e in self.latest.items() if e.get("ok")}

  def failed(self) -> dict[int, dict]:
    return {i: e for i, e in self.latest.items() if not e.get("ok")}

  def close(self) -> None:
    if not self.f.closed:
      fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
      self.f.close()

  def __enter__(self) -> "ProgressLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
