"""One run at a time per run directory: an fcntl lock on `<run_dir>/.lock`, which also holds a
JSON note of its holder (pid, host, start time) so that a refused run can say who has it.

The kernel drops an fcntl lock when its holder dies, SIGKILL included, so a lock left by a dead
process is never in force: the next run takes it and logs whose note it found. The note alone
never decides anything (a PID may be reused; a host name says nothing about liveness).

A gs:// run directory has no lock: an object store has no fcntl, and the emulator the tests run
against ignores the generation preconditions a lock object would need. There the note alone is
kept (`.lock`, removed when the run ends): a run refuses a note of a live process of its own
host, and otherwise logs whose note it found and goes on. Two launchers on different machines
are not stopped; keeping one launcher per run directory is the user's job (docs/RUN_DIR.md).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from persyn_jax import fs
from persyn_jax.io_utils import atomic_write_bytes, pid_alive
from persyn_jax.stages.context import Log


class RunDirError(ValueError):
  """A run directory this run cannot use: not a directory, not writable, or of an older layout."""


class RunLockedError(RuntimeError):
  """Another live run holds the run directory's lock."""


def prepare_run_dir(path: str) -> None:
  """Creates `path` (and its parents); a file in the way or an unwritable place is a RunDirError
  naming the path and the problem."""
  if fs.is_remote(path):
    if fs.isfile(path):
      raise RunDirError(f"{path}: the run directory is an object, not a directory (use another "
                        f"--run-dir)")
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise RunDirError(f"{path}: the run directory is a file, not a directory (use another "
                      f"--run-dir, or move the file away)")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise RunDirError(f"{path}: cannot create the run directory ({e.strerror}"
                      f"{': ' + e.filename if e.filename and e.filename != path else ''})") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise RunDirError(f"{path}: the run directory is not writable (read-only)")


class RunLock:
  """`with RunLock(run_dir, log):` holds the run directory for this process; refuses with
  RunLockedError naming the holder's PID, host and start time while another run has it."""

  def __init__(self, run_dir: str, log: Log | None = None):
    self.dir = run_dir
    self.path = fs.join(run_dir, ".lock")
    self.remote = fs.is_remote(run_dir)
    self.held = False
    self.log = log or (lambda msg: None)
    self.fd: int | None = None

  def holder(self) -> dict:
    """The note of the last process that took the lock ({} when none or unreadable)."""
    try:
      with fs.open(self.path, "rb") as f:
        note = json.loads(f.read())
      return note if isinstance(note, dict) else {}
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    if self.remote:
      self._acquire_note()
      return
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      what = "read-only" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else e.strerror
      raise RunDirError(f"{self.path}: cannot create the run lock ({what}); the run directory "
                        f"{self.dir} must be writable") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise RunDirError(f"{self.path}: cannot lock the run directory ({e.strerror})") from None
      h = self.holder()
      raise RunLockedError(
          f"{self.dir}: another run is using this run directory (pid {h.get('pid', '?')} on host "
          f"{h.get('host', '?')}, started {h.get('started', '?')}); wait for it to finish, or "
          f"use another --run-dir") from None
    old = self.holder()
    if old.get("pid") not in (None, os.getpid()):
      same_host = old.get("host") == socket.gethostname()
      state = ("no longer running" if same_host and not pid_alive(int(old["pid"])) else
               "its lock was released")
      self.log(f"[run] taking over the lock of an earlier run (pid {old['pid']} on host "
               f"{old.get('host', '?')}, started {old.get('started', '?')}: {state})")
    note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()
    # rewritten in place: the lock belongs to this inode, so no rename-into-place here
    os.ftruncate(fd, 0)
    os.pwrite(fd, note, 0)
    self.fd = fd

  def _acquire_note(self) -> None:
    """The gs:// run directory's note: refused while a live process of this host holds it."""
    old = self.holder()
    if old.get("pid") not in (None, os.getpid()):
      same_host = old.get("host") == socket.gethostname()
      if same_host and pid_alive(int(old["pid"])):
        raise RunLockedError(
            f"{self.dir}: another run is using this run directory (pid {old['pid']} on this host, "
            f"started {old.get('started', '?')}); wait for it to finish, or use another --run-dir")
      state = ("no longer running" if same_host else
               "on another host: whether it still runs cannot be told on gs://; one launcher "
               "per run directory is yours to ensure")
      self.log(f"[run] taking over the lock note of an earlier run (pid {old['pid']} on host "
               f"{old.get('host', '?')}, started {old.get('started', '?')}: {state})")
    atomic_write_bytes(self.path, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
    self.held = True

  def release(self) -> None:
    if self.held:
      self.held = False
      try:
        fs.remove(self.path)
      except FileNotFoundError:
        pass
    if self.fd is not None:
      # the note goes while the lock is held: a note found later is that of a run that died
      os.ftruncate(self.fd, 0)
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
