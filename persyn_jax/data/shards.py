"""Sharded ArrayRecord files: atomic writes, a manifest, verified reads.

A stage writes `<stage>-<host>-<index:05d>-of-<count:05d>.array_record` files; each host writes
only its own. A shard is written under a temporary name, flushed, fsynced and renamed, and a
sidecar `<shard>.meta.json` (records, sha256, bytes) is committed just before the rename, so a
final file name always means a complete shard: a writer killed midway leaves only a temp file,
which the rerun removes and rewrites. `<stage>.manifest.json` lists every shard with its record
count and sha256; readers check it, and refuse a missing, partial or corrupt shard naming the file.

An ArrayRecord file cut short still opens (as fewer records), which is why counts and hashes are
checked rather than trusting the reader.

On gs:// (persyn_jax.fs) a shard is written to a local temp file, its sidecar is put, then the
shard is uploaded in one piece under its final name; readers open a local copy of it.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterable, Iterator, Mapping, Sequence

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from persyn_jax import fs
from persyn_jax import io_utils as io
from persyn_jax.data import records as rec
from persyn_jax.io_utils import atomic_write_bytes, sha256_file  # noqa: F401  (re-exported)

MANIFEST_VERSION = 1
# group_size:1 makes every record randomly accessible (grain reads records by index).
WRITER_OPTIONS = "group_size:1"


class ShardError(RuntimeError):
  """A shard or manifest that is missing, partial or corrupt (the message names the file)."""


def _host(host: int | None) -> int:
  if host is None:
    import jax  # only when asked: writing shards must not need an initialized backend otherwise
    host = jax.process_index()
  if not isinstance(host, int) or host < 0:
    raise ValueError(f"host={host!r}: a non-negative int")
  return host


def shard_name(stage: str, host: int, index: int, count: int) -> str:
  if not 0 <= index < count:
    raise ValueError(f"shard index {index} out of range for count {count}")
  return f"{stage}-{host}-{index:05d}-of-{count:05d}.array_record"


def parse_name(stage: str, name: str) -> tuple[int, int, int] | None:
  """(host, index, count) of a shard file name of `stage`, else None."""
  m = re.fullmatch(re.escape(stage) + r"-(\d+)-(\d+)-of-(\d+)\.array_record",
                   name.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1])
  return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def manifest_path(out_dir: str, stage: str) -> str:
  return fs.join(out_dir, f"{stage}.manifest.json")


def atomic_write_json(path: str, obj: Any) -> None:
  io.atomic_write_json(path, obj, indent=1, sort_keys=True)


def _remove_stale_temps(final: str) -> None:
  if fs.is_remote(final):  # remote shards are never written under a temp name
    return
  d, base = os.path.split(final)
  for tmp in glob.glob(os.path.join(glob.escape(d), "." + glob.escape(base) + ".tmp-*")):
    try:
      os.remove(tmp)
    except FileNotFoundError:
      pass


def write_shard(out_dir: str, stage: str, records: Iterable[Mapping[str, Any]], *, index: int,
                count: int, host: int | None = None, fmt: str = "json",
                options: str = WRITER_OPTIONS) -> dict:
  """Write one shard atomically; return {"file", "records", "sha256", "bytes"}.

  Every record is validated (and encoded with `fmt`) before it is written; an exception midway
  leaves no final file.
  """
  host = _host(host)
  name = shard_name(stage, host, index, count)
  if fs.is_remote(out_dir):
    return _write_remote_shard(out_dir, name, records, host=host, fmt=fmt, options=options)
  os.makedirs(out_dir, exist_ok=True)
  final = os.path.join(out_dir, name)
  _remove_stale_temps(final)
  tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
  writer = ArrayRecordWriter(tmp, options)
  n = 0
  try:
    for r in records:
      writer.write(rec.encode(r, fmt))
      n += 1
    if not writer.ok():
      raise ShardError(f"{tmp}: ArrayRecord writer failed")
    writer.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    meta = {"file": name, "records": n, "sha256": sha256_file(tmp), "bytes": os.path.getsize(tmp)}
    atomic_write_json(final + ".meta.json", meta)
    os.replace(tmp, final)
    io.fsync_dir(out_dir)
  except BaseException as e:
    io.name_error(e, final)
    if writer.is_open():
      writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return meta


def _write_remote_shard(out_dir: str, name: str, records: Iterable[Mapping[str, Any]], *,
                        host: int, fmt: str, options: str) -> dict:
  """write_shard to an object store: the shard is written to a local temp directory, its sidecar
  is put, then the shard is uploaded whole under its final name (an object appears complete or
  not at all; a sidecar without its shard, left by a kill between the two, is not complete)."""
  stage = _stage_of(name)
  index, count = parse_name(stage, name)[1:]
  tmpdir = tempfile.mkdtemp(prefix="persyn_jax-shard-")
  try:
    meta = write_shard(tmpdir, stage, records, index=index, count=count, host=host,
                       fmt=fmt, options=options)
    final = fs.join(out_dir, name)
    atomic_write_json(final + ".meta.json", meta)
    fs.put(os.path.join(tmpdir, name), final)
  except BaseException as e:
    io.name_error(e, fs.join(out_dir, name))
    raise
  finally:
    shutil.rmtree(tmpdir, ignore_errors=True)
  return meta


def _stage_of(name: str) -> str:
  """The stage prefix of a shard file name (`<stage>-<host>-<index>-of-<count>.array_record`)."""
  m = re.fullmatch(r"(.+)-\d+-\d+-of-\d+\.array_record", name)
  assert m, name
  return m.group(1)


def _shard_meta(path: str) -> dict | None:
  """The shard's sidecar; None when it is missing or damaged (not a JSON object): the shard then
  counts as incomplete and is written again."""
  try:
    with fs.open(path + ".meta.json", "rb") as f:
      meta = json.loads(f.read())
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) else None


def shard_is_complete(path: str, check_hash: bool = True) -> bool:
  """The final file exists, its sidecar agrees on size (and sha256), and the reader opens it."""
  meta = _shard_meta(path)
  if meta is None or not fs.exists(path) or fs.getsize(path) != meta.get("bytes"):
    return False
  local = fs.local_copy(path)
  if check_hash and sha256_file(local) != meta.get("sha256"):
    return False
  try:
    reader = ArrayRecordReader(local)
    ok = reader.num_records() == meta.get("records")
    reader.close()
  except Exception:  # a damaged footer: not complete
    return False
  return ok


def complete_shards(out_dir: str, stage: str, count: int, host: int | None = None) -> set[int]:
  """Indices of this host's `count` shards whose final file exists and is valid."""
  host = _host(host)
  done = set()
  for i in range(count):
    if shard_is_complete(fs.join(out_dir, shard_name(stage, host, i, count))):
      done.add(i)
  return done


def list_shards(out_dir: str, stage: str) -> list[str]:
  """Final shard files of `stage` in `out_dir`, in (host, index) order."""
  found = []
  for path in fs.glob(fs.join(glob.escape(out_dir), glob.escape(stage) + "-*.array_record")):
    parsed = parse_name(stage, path)
    if parsed is not None:
      found.append((parsed, path.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]))
  return [name for _, name in sorted(found)]


def write_manifest(out_dir: str, stage: str, extra: Mapping[str, Any] | None = None,
                   verify: bool = False, num_hosts: int | None = None) -> dict:
  """Atomically write `<stage>.manifest.json` over every shard of the stage in `out_dir`.

  Checks that each host's shards are all present (0..count-1, one count) and have a sidecar; with
  verify=True each file's sha256 is recomputed too; with num_hosts, that exactly hosts
  0..num_hosts-1 wrote shards (files of other hosts are left from a run with more processes).
  Call it once all hosts have written (e.g. on process 0 after a barrier). Returns the manifest.
  """
  names = list_shards(out_dir, stage)
  if num_hosts is not None:
    hosts = {parse_name(stage, n)[0] for n in names}
    extra_hosts = sorted(h for h in hosts if h >= num_hosts)
    if extra_hosts:
      files = [n for n in names if parse_name(stage, n)[0] >= num_hosts]
      raise ShardError(f"{out_dir}: stage {stage!r} has shards of hosts {extra_hosts} "
                       f"({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}) but "
                       f"{num_hosts} processes run it: they are left from a run with more "
                       "processes (rerun with that many, or move the directory aside)")
    absent = sorted(set(range(num_hosts)) - hosts)
    if absent:
      raise ShardError(f"{out_dir}: stage {stage!r} has no shards of hosts {absent} "
                       f"(of {num_hosts}); every host writes at least one")
  by_host: dict[int, list[tuple[int, int]]] = {}
  shards = []
  for name in names:
    host, index, count = parse_name(stage, name)
    by_host.setdefault(host, []).append((index, count))
    path = fs.join(out_dir, name)
    meta = _shard_meta(path)
    if meta is None:
      raise ShardError(f"{path}: no readable {name}.meta.json sidecar; the shard was not "
                       "written by write_shard or its write did not finish (delete it and rerun)")
    if fs.getsize(path) != meta["bytes"] or (verify and sha256_file(path) != meta["sha256"]):
      raise ShardError(f"{path}: contents differ from its sidecar (corrupt or partial shard)")
    shards.append({"file": name, "host": host, "index": index, "count": count,
                   "records": meta["records"], "sha256": meta["sha256"], "bytes": meta["bytes"]})
  for host, items in by_host.items():
    counts = {c for _, c in items}
    if len(counts) != 1:
      raise ShardError(f"{out_dir}: stage {stage!r} host {host} has shards of several counts "
                       f"{sorted(counts)} (stale files from an earlier run?)")
    (count,) = counts
    missing = sorted(set(range(count)) - {i for i, _ in items})
    if missing:
      raise ShardError(f"{out_dir}: stage {stage!r} host {host} is missing shards {missing} "
                       f"of {count}")
  manifest = {"manifest_version": MANIFEST_VERSION, "stage": stage,
              "schema": rec.SCHEMA_VERSION, "shards": shards,
              "records": sum(s["records"] for s in shards)}  # no timestamp: same shards, same file
  if extra:
    manifest["extra"] = dict(extra)
  atomic_write_json(manifest_path(out_dir, stage), manifest)
  return manifest


def read_manifest(out_dir: str, stage: str) -> dict:
  path = manifest_path(out_dir, stage)
  try:
    with fs.open(path, "rb") as f:
      manifest = json.loads(f.read())
  except FileNotFoundError:
    raise ShardError(f"{path}: no manifest; stage {stage!r} is incomplete "
                     "(write_manifest runs after every shard is written)") from None
  except ValueError as e:
    raise ShardError(f"{path}: unreadable manifest: {e}") from None
  if not isinstance(manifest, dict):
    raise ShardError(f"{path}: unreadable manifest: a JSON {type(manifest).__name__}, not an "
                     "object")
  if manifest.get("manifest_version") != MANIFEST_VERSION or manifest.get("stage") != stage:
    raise ShardError(f"{path}: manifest_version {manifest.get('manifest_version')!r} / stage "
                     f"{manifest.get('stage')!r}, expected {MANIFEST_VERSION} / {stage!r}")
  return manifest


def verify_shards(out_dir: str, stage: str, check_hash: bool = True) -> list[dict]:
  """The manifest's shard entries, after checking each file's size, sha256 and record count."""
  manifest = read_manifest(out_dir, stage)
  for s in manifest["shards"]:
    path = fs.join(out_dir, s["file"])
    if not fs.exists(path):
      raise ShardError(f"{path}: listed in {stage}.manifest.json but missing")
    size = fs.getsize(path)
    if size != s["bytes"]:
      raise ShardError(f"{path}: {size} bytes, manifest says {s['bytes']} (partial or corrupt shard)")
    local = fs.local_copy(path)
    if check_hash and sha256_file(local) != s["sha256"]:
      raise ShardError(f"{path}: sha256 differs from {stage}.manifest.json (corrupt shard)")
    try:
      reader = ArrayRecordReader(local)
      n = reader.num_records()
      reader.close()
    except Exception as e:
      raise ShardError(f"{path}: not a readable ArrayRecord file: {e}") from None
    if n != s["records"]:
      raise ShardError(f"{path}: {n} records, manifest says {s['records']} (partial shard)")
  return manifest["shards"]


def iter_shard(path: str, check: bool = True, batch: int = 1024) -> Iterator[dict]:
  """Records of one shard file, decoded and validated, in order."""
  try:
    reader = ArrayRecordReader(fs.local_copy(path))
  except Exception as e:
    raise ShardError(f"{path}: not a readable ArrayRecord file: {e}") from None
  try:
    n = reader.num_records()
    for start in range(0, n, batch):
      try:
        chunk = reader.read(start, min(n, start + batch))
      except Exception as e:
        raise ShardError(f"{path}: corrupt shard near record {start}: {e}") from None
      for j, data in enumerate(chunk):
        yield rec.decode(data, where=f"{path}, record {start + j}", check=check)
  finally:
    reader.close()


def read_records(out_dir: str, stage: str, check_hash: bool = True) -> Iterator[dict]:
  """Every record of a stage, in (host, index) shard order, after verifying the manifest."""
  for s in verify_shards(out_dir, stage, check_hash):
    yield from iter_shard(fs.join(out_dir, s["file"]))


def shard_paths(out_dir: str, stage: str, check_hash: bool = True) -> list[str]:
  """Verified shard paths of a stage, in shard order (for grain's ArrayRecordDataSource); local
  copies of the shards of a remote `out_dir`."""
  return [fs.local_copy(fs.join(out_dir, s["file"]))
          for s in verify_shards(out_dir, stage, check_hash)]


def write_stage_records(out_dir: str, stage: str, records: Sequence[Mapping[str, Any]], *,
                        records_per_shard: int, fmt: str = "json",
                        extra: Mapping[str, Any] | None = None) -> dict | None:
  """A whole stage's records, written by every process together (collective: all must call it).

  Every process holds the same `records` (the gathered result of a sharded computation). Host h
  writes the h-th of H contiguous parts as its own shards `<stage>-<h>-<k>-of-<n>` (at most
  records_per_shard records each, at least one shard), so reading the stage in (host, index)
  order gives `records` back in order, whatever H. Once all have written, process 0 writes the
  manifest. A rerun keeps complete shards (see write_records). Returns the manifest on process 0,
  None on the others.
  """
  import jax

  from persyn_jax import distributed as dist
  if records_per_shard < 1:
    raise ValueError(f"records_per_shard={records_per_shard}: must be >= 1")
  host, hosts = jax.process_index(), jax.process_count()
  part = split_evenly(list(records), hosts)[host]
  write_records(out_dir, stage, part, num_shards=max(1, -(-len(part) // records_per_shard)),
                host=host, fmt=fmt, manifest=False)
  dist.barrier(f"shards:{stage}:written")
  manifest = None
  if host == 0:
    manifest = write_manifest(out_dir, stage, extra, num_hosts=hosts)
  dist.barrier(f"shards:{stage}:manifest")
  return manifest


def split_evenly(items: Sequence[Any], count: int) -> list[Sequence[Any]]:
  """`count` contiguous slices whose sizes differ by at most one (order kept)."""
  n = len(items)
  bounds = [i * n // count for i in range(count + 1)]
  return [items[bounds[i]:bounds[i + 1]] for i in range(count)]


def write_records(out_dir: str, stage: str, records: Iterable[Mapping[str, Any]], *,
                  num_shards: int, host: int | None = None, fmt: str = "json",
                  manifest: bool = True, extra: Mapping[str, Any] | None = None,
                  skip_complete: bool = True) -> list[dict]:
  """Write all of this host's `records` as `num_shards` contiguous shards (order kept).

  Complete shards from an earlier run are kept (skip_complete), so a rerun after a crash writes
  only the missing ones; records must therefore come in the same order on a rerun. With
  manifest=True the stage manifest is written afterwards (single-host use; with several hosts,
  call write_manifest once after all have written). Returns the shard entries.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards}: at least 1")
  host = _host(host)
  items = list(records)
  done = complete_shards(out_dir, stage, num_shards, host) if skip_complete else set()
  out = []
  for i, part in enumerate(split_evenly(items, num_shards)):
    path = fs.join(out_dir, shard_name(stage, host, i, num_shards))
    if i in done:
      meta = _shard_meta(path)
      if meta["records"] != len(part):
        raise ShardError(f"{path}: complete shard holds {meta['records']} records but this run "
                         f"would write {len(part)} (inputs changed; delete {out_dir} to redo)")
      out.append(meta)
    else:
      out.append(write_shard(out_dir, stage, part, index=i, count=num_shards, host=host, fmt=fmt))
  if manifest:
    write_manifest(out_dir, stage, extra)
  return out
