"""Local paths and gs:// URLs behind one small set of file operations.

A path with a scheme (`gs://bucket/dir/file`) goes to fsspec: gcsfs for gs://, an optional
dependency (`pip install persyn-jax[gcs]`); other fsspec protocols are passed through the same
way, untested. Any other path is a local one and keeps the plain os / shutil calls (the tests
patch those to inject faults).

An object store has no rename and no directory: an object write is all-or-nothing (a reader sees
the old object or the new one, never a part), `rename` is a copy then a delete (not atomic),
`makedirs` does nothing, and a "directory" exists while an object lies under it. Writers
therefore write each final object in one piece and commit markers (sidecars, manifests,
DONE.json) after the objects they describe; docs/RUN_DIR.md ("Run directories on gs://").

Libraries that only take local paths (ArrayRecord's writer, safetensors, tokenizers) get a local
copy: `local_copy` (a file) and `local_dir` (a directory) download into a per-machine cache keyed
by the object's path and checksum, so a remote file is fetched once per version.
"""
from __future__ import annotations

import contextlib
import glob as _glob
import hashlib
import os
import posixpath
import shutil
import tempfile
from typing import IO, Iterator

_FS: dict[tuple, object] = {}


def is_remote(path) -> bool:
  """Whether `path` is a URL (`gs://...`) rather than a local path."""
  return "://" in os.fspath(path)


def filesystem(path: str):
  """The fsspec filesystem of a remote `path` (one per process and emulator endpoint: a forked
  child builds its own, as an event loop does not survive fork)."""
  protocol = path.split("://", 1)[0]
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  key = (protocol, os.getpid(), emulator)
  if key not in _FS:
    if protocol in ("gs", "gcs"):
      try:  # the core filesystem: the experimental one probes buckets over gRPC first
        from gcsfs.core import GCSFileSystem
      except ImportError:
        raise ImportError(f"{path}: gs:// paths need gcsfs (pip install "
                          "'persyn-jax[gcs]')") from None
      # listings are never cached: other hosts and earlier runs change the bucket under us
      _FS[key] = GCSFileSystem(token="anon" if emulator else None, cache_timeout=0,
                               skip_instance_cache=True)
    else:
      import fsspec
      _FS[key] = fsspec.filesystem(protocol, skip_instance_cache=True)
  return _FS[key]


def _url(fs, path: str) -> str:
  """A listing's bare `bucket/key` as the full URL again."""
  return path if "://" in path else fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
  return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def abspath(path: str) -> str:
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return filesystem(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return filesystem(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return filesystem(path).isfile(path) if is_remote(path) else os.path.isfile(path)


def getsize(path: str) -> int:
  if not is_remote(path):
    return os.path.getsize(path)
  try:
    return int(filesystem(path).info(path)["size"])
  except FileNotFoundError:
    raise FileNotFoundError(2, "No such file or directory", path) from None


def listdir(path: str) -> list[str]:
  """Names (not paths) in a directory, sorted; a missing directory raises FileNotFoundError."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  fs = filesystem(path)
  if not fs.isdir(path):
    raise FileNotFoundError(2, "No such directory", path)
  return sorted({posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)})


def glob(pattern: str) -> list[str]:
  """Paths matching `pattern` (glob syntax; escape literal parts with glob.escape)."""
  if not is_remote(pattern):
    return sorted(_glob.glob(pattern, recursive=True))
  fs = filesystem(pattern)
  return sorted(_url(fs, p) for p in fs.glob(pattern))


def makedirs(path: str) -> None:
  """A directory and its parents (nothing to do on an object store)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Deletes a file; FileNotFoundError when there is none."""
  if not is_remote(path):
    os.remove(path)
    return
  fs = filesystem(path)
  if not fs.isfile(path):
    raise FileNotFoundError(2, "No such file", path)
  fs.rm_file(path)


def rmtree(path: str) -> None:
  """Deletes a directory and everything under it (no error when there is none)."""
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs = filesystem(path)
  if fs.exists(path):
    fs.rm(path, recursive=True)


def rename(src: str, dst: str) -> None:
  """os.replace for local paths; on an object store a copy then a delete of every object under
  `src` (not atomic: a reader may see both for a while, so callers never rely on it to commit)."""
  if not is_remote(src):
    os.replace(src, dst)
    return
  fs = filesystem(src)
  recursive = fs.isdir(src)
  # copy + delete, spelled out: gcsfs's mv first tries a move API that emulators lack
  fs.copy(src, dst, recursive=recursive)
  fs.rm(src, recursive=recursive)


def copytree(src: str, dst: str) -> None:
  """A copy of directory `src` at `dst` (which must not exist): hard links between local paths
  (the copy costs no space; the files are never written in place), an object copy on a store."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copytree(src, dst, copy_function=os.link)
    return
  if is_remote(src) != is_remote(dst):
    raise ValueError(f"copytree {src} -> {dst}: both local or both remote")
  filesystem(src).copy(src.rstrip("/") + "/", dst.rstrip("/"), recursive=True)


def open(path: str, mode: str = "r", **kw) -> IO:  # noqa: A001  (the builtin, for any path)
  if not is_remote(path):
    import builtins
    return builtins.open(path, mode, **kw)
  return filesystem(path).open(path, mode, **kw)


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_object(path: str, data: bytes) -> None:
  """One remote object, written whole (a single upload: readers never see a part of it)."""
  filesystem(path).pipe_file(path, data)


def put(local: str, remote: str) -> None:
  """Uploads a local file or directory (recursively) to `remote`."""
  fs = filesystem(remote)
  if os.path.isdir(local):
    fs.put(local.rstrip("/") + "/", remote.rstrip("/"), recursive=True)
  else:
    fs.put_file(local, remote)


def sha256(path: str) -> str:
  """The sha256 of a file's bytes (streamed)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def cache_dir() -> str:
  """This machine's cache of remote files: $PERSYN_JAX_LOCAL_CACHE, else <tmp>/persyn_jax-remote."""
  return os.environ.get("PERSYN_JAX_LOCAL_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                   "persyn_jax-remote")


def _cache_path(url: str, version: str) -> str:
  key = hashlib.sha256(f"{url}\n{version}".encode()).hexdigest()[:24]
  return os.path.join(cache_dir(), key, posixpath.basename(url.rstrip("/")) or "root")


def local_copy(path: str) -> str:
  """`path` itself when local; for a remote file a local copy of its current version (fetched
  once per version into cache_dir(), under a temp name then renamed, so a copy is always whole)."""
  if not is_remote(path):
    return path
  fs = filesystem(path)
  try:
    info = fs.info(path)
  except FileNotFoundError:
    raise FileNotFoundError(2, "No such file", path) from None
  version = str(info.get("generation") or info.get("md5Hash") or info.get("etag") or "")
  local = _cache_path(path, f"{version}:{info.get('size')}")
  if not os.path.exists(local):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    fs.get_file(path, tmp)
    os.replace(tmp, local)
  return local


def local_dir(path: str) -> str:
  """`path` itself when local; for a remote directory (a model, a tokenizer) a local read-only
  copy of every file under it, refreshed when any file's version changed."""
  if not is_remote(path):
    return path
  fs = filesystem(path)
  base = path.rstrip("/")
  files = {p: i for p, i in fs.find(base, detail=True).items() if i.get("type") == "file"}
  if not files:
    raise FileNotFoundError(2, "No such directory, or an empty one", path)
  version = hashlib.sha256("\n".join(
      f"{p}:{i.get('generation') or i.get('md5Hash')}:{i.get('size')}"
      for p, i in sorted(files.items())).encode()).hexdigest()
  local = _cache_path(path, version)
  if not os.path.isdir(local):
    tmp = f"{local}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    root = base.split("://", 1)[1]
    for p in files:
      dest = os.path.join(tmp, *posixpath.relpath(p, root).split("/"))
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      fs.get_file(_url(fs, p), dest)
    try:
      os.replace(tmp, local)
    except OSError:  # another process of this machine put the same version in place first
      shutil.rmtree(tmp, ignore_errors=True)
  return local


def work_dir(path: str) -> str:
  """`path` itself when local; for a remote directory a local working directory of this machine
  for it (kept across runs, so that a rerun on the same machine finds what an earlier one left)."""
  if not is_remote(path):
    return path
  local = os.path.join(cache_dir(), "work", hashlib.sha256(path.encode()).hexdigest()[:24])
  os.makedirs(local, exist_ok=True)
  return local


@contextlib.contextmanager
def staged_dir(path: str) -> Iterator[str]:
  """`with staged_dir(path) as d:` write a directory with libraries that need a local one: for a
  remote `path`, `d` is a fresh local directory that replaces `path` (uploaded by process 0)
  when the block ends without an error; for a local `path`, `d` is `path`."""
  if not is_remote(path):
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="persyn_jax-stage-")
  try:
    yield tmp
    import jax
    if jax.process_index() == 0:
      rmtree(path)
      put(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def download(path: str, local: str, suffixes: tuple[str, ...] = ()) -> None:
  """Copies every file under a remote directory `path` (those ending with one of `suffixes`, if
  given) into the local directory `local`, keeping their relative paths."""
  fs = filesystem(path)
  root = path.rstrip("/").split("://", 1)[1]
  for p in fs.find(root):
    if suffixes and not p.endswith(suffixes):
      continue
    dest = os.path.join(local, *posixpath.relpath(p, root).split("/"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fs.get_file(_url(fs, p), dest)
