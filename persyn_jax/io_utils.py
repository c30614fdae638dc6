"""Atomic file writes (temp file, flush, fsync, rename) and safe path components."""
from __future__ import annotations

import json
import os
import re
import tempfile


def atomic_write_bytes(path: str, data: bytes) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_default) + "\n")


def _default(o):
  import numpy as np
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serializable: {type(o).__name__}")


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, what: str = "name") -> str:
  """A file-name component from a user-given name (teacher, policy): no path traversal."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"{what} must be a non-empty string, got {name!r}")
  s = _SAFE.sub("_", name).strip("._")
  if not s:
    raise ValueError(f"{what} {name!r} has no usable characters for a file name")
  return s[:100]
