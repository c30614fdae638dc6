"""Atomic file writes (temp file, flush, fsync, rename; one whole object on gs://, see fs.py) and
safe path components."""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil

from persyn_jax import fs


def sha256_file(path: str) -> str:
  if fs.is_remote(path):
    return fs.sha256(path)
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some filesystems (e.g. FUSE mounts) refuse fsync on a directory
    pass
  finally:
    os.close(fd)


def name_error(e: BaseException, path: str) -> None:
  """A failed write() or fsync() (a full disk) says not which file: name it."""
  if isinstance(e, OSError) and e.filename is None:
    e.filename = path


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Write `data` to `path` via a temp name, flush, fsync and rename (then fsync the directory);
  a remote `path` is one object upload, which readers see whole or not at all."""
  if fs.is_remote(path):
    fs.write_object(path, data)
    return
  d = os.path.dirname(path) or "."
  os.makedirs(d, exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  remove_dead_temps(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    name_error(e, path)
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  fsync_dir(d)


def remove_dead_temps(path: str) -> list[str]:
  """Removes what writers killed midway left beside `path`: `<path>.tmp-<pid>` (a temp file, or
  a directory being built, as export.write_hf_dataset builds one) and `<path>.old-<pid>` (a
  directory swapped out, not yet deleted), when their pid no longer runs here. A path is written
  by one host only, so a live writer's temp is never touched. Returns the removed paths."""
  removed = []
  for tag in (".tmp-", ".old-"):
    for tmp in glob.glob(glob.escape(path) + tag + "*"):
      pid = tmp.rsplit(tag, 1)[1]
      if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
        continue
      try:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
          shutil.rmtree(tmp)
        else:
          os.remove(tmp)
        removed.append(tmp)
      except FileNotFoundError:  # another writer removed it first
        pass
  return removed


def pid_alive(pid: int) -> bool:
  """Whether a process `pid` runs on this host (another user's counts as running)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj, *, indent: int = 2, sort_keys: bool = False) -> None:
  """`obj` as strict JSON (see `dumps`): a NaN or infinity, undefined here (a rank correlation of
  equal values, a held-out loss with no pairs), is written as null."""
  atomic_write_bytes(path, (dumps(obj, indent=indent, sort_keys=sort_keys) + "\n").encode("utf-8"))


def dumps(obj, **kw) -> str:
  """json.dumps that writes strict JSON: json.dumps would write a NaN or infinity as the tokens
  NaN / Infinity, which JSON lacks (jq, JavaScript and most parsers refuse the file); here they are
  null. numpy scalars and arrays are their Python values."""
  return json.dumps(finite(obj), allow_nan=False, **kw)


def finite(obj):
  """`obj` with every non-finite float (Python or numpy) replaced by None, numpy values as Python
  ones, tuples as lists (what json.dumps writes for them)."""
  import numpy as np
  if isinstance(obj, dict):
    return {k: finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return finite(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, what: str = "name") -> str:
  """A file-name component from a user-given name (teacher, policy): no path traversal."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"{what} must be a non-empty string, got {name!r}")
  s = _SAFE.sub("_", name).strip("._")
  if not s:
    raise ValueError(f"{what} {name!r} has no usable characters for a file name")
  return s[:100]
