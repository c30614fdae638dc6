"""Minimal safetensors reader/writer on numpy memmaps.

The reader slices a tensor without reading the rest of the file (a host loads only the part of a
weight its devices hold), and handles bf16 through ml_dtypes; the writer streams tensors one by
one. Format: 8-byte little-endian header size, a JSON header, then raw little-endian bytes.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
# The reference implementation's limit: a header is a few hundred bytes per tensor.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsError(ValueError):
  pass


class SafeFile:
  """Read-only view of one .safetensors file: `names()`, `shape(name)`, `read(name, index)`."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes)")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise SafetensorsError(f"{path}: header size {n} is larger than the file ({size} bytes): "
                               "truncated or not a safetensors file")
      if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{path}: header size {n} is over the limit of {MAX_HEADER_BYTES} "
                               "bytes: corrupt or not a safetensors file")
      # ValueError covers an integer of more digits than Python converts; RecursionError, nesting.
      # Strict JSON in strict UTF-8, as the reference reader wants: no byte-order mark, no
      # NaN/Infinity tokens.
      try:
        header = json.loads(f.read(n).decode("utf-8"), parse_constant=_no_constant)
      except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{path}: the safetensors header is a {type(header).__name__}, "
                             "not a JSON object")
    self.metadata = header.pop("__metadata__", {}) or {}
    if not (isinstance(self.metadata, dict)
            and all(isinstance(v, str) for v in self.metadata.values())):
      raise SafetensorsError(f"{path}: __metadata__ {json.dumps(self.metadata)[:200]} is not an "
                             "object of strings: corrupt or not a safetensors file")
    self.base = 8 + n
    self.header = header
    for name, info in header.items():
      _check_entry(path, name, info, size - self.base)
    _check_layout(path, header, size - self.base)
    self._mm = None

  def names(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def array(self, name: str) -> np.ndarray:
    """A memmapped view (nothing read until indexed)."""
    info = self.header[name]
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    start, end = info["data_offsets"]
    raw = self._mm[self.base + start:self.base + end]
    return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def _check_entry(path: str, name: str, info, data_size: int) -> None:
  """One header entry, checked before any of it is used: a string, negative, fractional or huge
  shape, an unknown dtype or offsets outside the data section each name the file and tensor."""
  def bad(problem: str):
    raise SafetensorsError(f"{path}: tensor {name!r} {problem} (header entry "
                           f"{json.dumps(info)[:200]}): corrupt or not a safetensors file")

  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
    bad("has a malformed header entry, which needs dtype, shape and data_offsets")
  dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if not isinstance(dt, str) or dt not in DTYPES:
    raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}")
  if not isinstance(shape, list) or not all(_count(d) for d in shape):
    bad("has a shape that is not a list of non-negative integers")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
          and offsets[0] <= offsets[1]):
    bad("has data_offsets that are not two non-negative integers [start, end]")
  start, end = offsets
  # Python integers: a product of absurd dimensions cannot wrap around to a plausible size.
  want = np.dtype(DTYPES[dt]).itemsize
  for d in shape:
    want *= d
  if end - start != want or end > data_size:
    raise SafetensorsError(
        f"{path}: tensor {name!r} (shape {shape}, {dt}) needs bytes "
        f"[{start}, {end}) of a data section of {data_size} bytes: truncated or corrupt")


def _check_layout(path: str, header: dict, data_size: int) -> None:
  """The tensors tile the data section: in offset order each starts where the one before ends,
  the first at 0 and the last at the end of the file. Like the reference reader, refuses
  overlapping tensors (one write would change another), gaps and trailing bytes."""
  end = 0
  for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
    start, stop = info["data_offsets"]
    if start != end:
      raise SafetensorsError(
          f"{path}: tensor {name!r} starts at byte {start} of the data section, where the tensor "
          f"before it in the file ends at {end}: tensors overlap or leave a gap (corrupt or not a "
          "safetensors file)")
    end = stop
  if end != data_size:
    raise SafetensorsError(f"{path}: the tensors end at byte {end} of a data section of "
                           f"{data_size} bytes: trailing bytes (corrupt or not a safetensors file)")


def _no_constant(token: str):
  raise ValueError(f"{token} is not JSON")


def _count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def save_file(tensors: Iterable[tuple[str, np.ndarray]], path: str, metadata: dict | None = None):
  """Writes (name, array) pairs; arrays may be produced lazily by the iterable."""
  tensors = list(tensors)
  header, offset = {}, 0
  for name, arr in tensors:
    n = arr.size * arr.dtype.itemsize
    header[name] = {"dtype": NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * ((8 - len(blob) % 8) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, arr in tensors:
      f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    f.flush()
    os.fsync(f.fileno())
