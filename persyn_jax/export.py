"""Data out: each policy's synthesized dataset (run_dir/data/<policy>/, ArrayRecord shards of JSON
records) as files the common fine-tuning tools read.

    python -m persyn_jax.export runs/toy                       # the run's `export:` section
    python -m persyn_jax.export runs/toy --formats parquet,jsonl --system "You are helpful."

Every format holds one row per training example, in the dataset's order:
  id, policy, teacher   where the example came from
  messages              [{"role", "content"}, ...]: the system turn (`system`, unless the prompt
                        opens with its own), the prompt (its own turns when the prompt record has
                        `messages`), then the teacher's answer as the assistant turn. TRL's
                        SFTTrainer reads this column as is ("messages" format); LLaMA-Factory reads
                        it as sharegpt with OpenAI-style tags, through the entry this module writes
                        into <dir>/dataset_info.json.
  record                (parquet, hf_dataset) the whole generation record as JSON text: its
                        metadata fields are free-form, so they get no fixed column type.

Each policy's files go to <dir>/<run name>_<policy>/, named as its dataset_info.json entry, so
several runs can share one <dir>: jsonl (messages.jsonl), parquet (data.parquet), hf_dataset
(hf_dataset/, `datasets.load_from_disk`). Each file is written under a temporary name and
renamed; the hf_dataset directory is built aside and swapped in. The temporaries of a writer
killed midway (`<file>.tmp-<pid>`, `hf_dataset.old-<pid>/`) are removed by the next export.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath
import shutil
import sys
import tempfile
from typing import Any, Iterable, Mapping, Sequence

from persyn_jax import fs
from persyn_jax.data import shards
from persyn_jax.data.chat import to_messages
from persyn_jax.io_utils import (atomic_write_json, atomic_write_text, remove_dead_temps,
                                 safe_name)

FORMATS = ("jsonl", "parquet", "hf_dataset")
FILES = {"jsonl": "messages.jsonl", "parquet": "data.parquet", "hf_dataset": "hf_dataset"}


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """The run config's `export:` section (written at the end of the generate stage)."""

  formats: tuple[str, ...] = ("jsonl",)  # of FORMATS; () turns the export off
  dir: str = ""                          # "": <run_dir>/export
  system: str | None = None              # a system turn opening each prompt that has none

  def __post_init__(self):
    bad = [f for f in self.formats if f not in FORMATS]
    if bad:
      raise ValueError(f"export.formats: unknown formats {bad}; known: {list(FORMATS)}")
    if len(set(self.formats)) != len(self.formats):
      raise ValueError(f"export.formats lists a format twice: {list(self.formats)}")


def conversation(record: Mapping[str, Any], system: str | None = None) -> list[dict[str, str]]:
  """The chat messages of one generation record: [system], the prompt's turns, the answer.
  `system` is not added to a prompt whose messages open with their own system turn (data.chat's
  to_messages rule, the sampler's too): a conversation has one system turn, the prompt's."""
  prompt = record["messages"] if record.get("messages") else record["prompt"]
  try:
    msgs = to_messages(prompt, system)
  except (TypeError, ValueError) as e:
    raise ValueError(f"record {record.get('id')!r}: {e}") from None
  return [{"role": str(m["role"]), "content": m["content"]} for m in msgs] + [
      {"role": "assistant", "content": record["response"]}]


def rows_of(records: Iterable[Mapping[str, Any]], policy: str, system: str | None = None
            ) -> list[dict[str, Any]]:
  """The export rows (see the module doc) of a policy's generation records."""
  return [{"id": str(r["id"]), "policy": str(r.get("policy", policy)),
           "teacher": str(r.get("teacher", "")), "messages": conversation(r, system),
           "record": json.dumps(r, ensure_ascii=False, sort_keys=True)} for r in records]


def _arrow_table(rows: Sequence[Mapping[str, Any]]):
  import pyarrow as pa
  message = pa.struct([("role", pa.string()), ("content", pa.string())])
  schema = pa.schema([("id", pa.string()), ("policy", pa.string()), ("teacher", pa.string()),
                      ("messages", pa.list_(message)), ("record", pa.string())])
  return pa.Table.from_pylist(list(rows), schema=schema)


def _tmp(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}"


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str) -> str:
  atomic_write_text(path, "".join(json.dumps({k: r[k] for k in ("id", "policy", "teacher",
                                                                 "messages")}, ensure_ascii=False)
                                  + "\n" for r in rows))
  return path


def write_parquet(rows: Sequence[Mapping[str, Any]], path: str) -> str:
  import pyarrow.parquet as pq
  if fs.is_remote(path):  # written locally, then uploaded as one object
    with tempfile.TemporaryDirectory() as d:
      fs.put(write_parquet(rows, os.path.join(d, os.path.basename(path))), path)
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _tmp(path)
  remove_dead_temps(path)  # a killed writer's half parquet
  try:
    pq.write_table(_arrow_table(rows), tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_hf_dataset(rows: Sequence[Mapping[str, Any]], path: str) -> str:
  """`Dataset.save_to_disk` into a directory beside `path`, then swapped in: a reader sees the old
  directory or the new one, never a half-written one (between the two renames, none)."""
  import datasets
  if fs.is_remote(path):  # saved locally, then uploaded (not atomic: see docs/RUN_DIR.md)
    with tempfile.TemporaryDirectory() as d:
      local = write_hf_dataset(rows, os.path.join(d, os.path.basename(path)))
      fs.rmtree(path)
      fs.put(local, path)
    return path
  tmp, old = _tmp(path), f"{path}.old-{os.getpid()}"
  for d in (tmp, old):
    shutil.rmtree(d, ignore_errors=True)
  # killed writers' directories: `datasets.load_dataset(<policy folder>)` would read their arrow
  # files along with the export's
  remove_dead_temps(path)
  quiet = datasets.utils.are_progress_bars_disabled()
  datasets.disable_progress_bars()  # a bar per policy for a sub-second write is noise in the log
  try:
    datasets.Dataset(_arrow_table(rows)).save_to_disk(tmp)
    if os.path.exists(path):
      os.replace(path, old)
    os.replace(tmp, path)
  finally:
    if not quiet:
      datasets.enable_progress_bars()
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
  return path


WRITERS = {"jsonl": write_jsonl, "parquet": write_parquet, "hf_dataset": write_hf_dataset}


def llama_factory_entry(file_name: str) -> dict:
  """A dataset_info.json entry for messages.jsonl: LLaMA-Factory's sharegpt formatting with the
  OpenAI role/content tags (its documented form for {"messages": [...]} data)."""
  return {"file_name": file_name, "formatting": "sharegpt", "columns": {"messages": "messages"},
          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                   "assistant_tag": "assistant", "system_tag": "system"}}


def dataset_name(name: str, policy: str) -> str:
  """`<run name>_<policy>`: the dataset_info.json entry of a run's policy, and the folder of its
  files in the export directory. The run's name is in both: runs sharing a directory (each with
  its own name) keep their files apart instead of overwriting each other's."""
  return f"{safe_name(name, 'run name')}_{safe_name(policy, 'policy')}"


def export_policy(data_dir: str, policy: str, out_dir: str, formats: Sequence[str],
                  system: str | None = None, *, name: str = "run") -> dict[str, str]:
  """Writes the records of one policy's dataset (data_dir: run_dir/data/<policy>/) of run `name`
  in `formats` under out_dir/<name>_<policy>/; returns {format: path}."""
  ExportConfig(formats=tuple(formats))  # validates the names
  rows = rows_of(shards.read_records(data_dir, "data"), policy, system)
  d = fs.join(out_dir, dataset_name(name, policy))
  return {f: WRITERS[f](rows, fs.join(d, FILES[f])) for f in formats}


def read_dataset_info(path: str) -> dict:
  """The entries of an existing LLaMA-Factory dataset_info.json (other runs', other datasets'),
  kept when ours are added; {} when there is none. A file that is not a JSON object is refused,
  naming it: LLaMA-Factory could not read it either."""
  if not fs.exists(path):
    return {}
  try:
    info = json.loads(fs.read_bytes(path))
  except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
    raise ValueError(f"{path}: not valid JSON ({e}); fix or remove it (LLaMA-Factory reads it "
                     "too)") from None
  if not isinstance(info, dict):
    raise ValueError(f"{path}: holds a {type(info).__name__}, not an object of dataset entries "
                     "(LLaMA-Factory's dataset_info.json: dataset name -> entry)")
  return info


def export_run(run_dir: str, policies: Sequence[str], config: ExportConfig, *, name: str = "run"
               ) -> dict[str, dict[str, str]]:
  """Exports every policy's dataset of a run (see the module doc) to <dir>/<name>_<policy>/; with
  jsonl, also merges one entry per policy (`<name>_<policy>`) into <dir>/dataset_info.json,
  keeping the other entries there. Returns {policy: paths}."""
  out_dir = config.dir or fs.join(run_dir, "export")
  info_path = fs.join(out_dir, "dataset_info.json")
  llama_factory = "jsonl" in config.formats and bool(policies)
  info = read_dataset_info(info_path) if llama_factory else {}  # checked before writing anything
  out = {}
  for policy in policies:
    out[policy] = export_policy(fs.join(run_dir, "data", safe_name(policy, "policy")), policy,
                                out_dir, config.formats, config.system, name=name)
  if llama_factory:
    for policy in policies:
      rel = (posixpath if fs.is_remote(out_dir) else os.path).relpath(out[policy]["jsonl"], out_dir)
      info[dataset_name(name, policy)] = llama_factory_entry(rel)
    atomic_write_json(info_path, info)
  return out


def run_policies(run_dir: str) -> list[str]:
  """The policies whose datasets a run directory holds (data/<policy>/data.manifest.json)."""
  d = fs.join(run_dir, "data")
  if not fs.isdir(d):
    raise FileNotFoundError(f"{d}: no datasets (has the generate stage run in {run_dir}?)")
  return sorted(p for p in fs.listdir(d) if fs.exists(shards.manifest_path(fs.join(d, p), "data")))


def _folder(policy: str) -> str | None:
  """The folder name of a policy's dataset under data/ (None: no usable name)."""
  try:
    return safe_name(policy, "policy")
  except ValueError:
    return None


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m persyn_jax.export", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("run_dir", help="a run directory whose generate stage has finished")
  ap.add_argument("--formats", help=f"comma-separated, of {','.join(FORMATS)} (default: the run "
                  "config's export.formats, else jsonl)")
  ap.add_argument("--dir", help="output directory (default: the run's export.dir, else "
                  "RUN_DIR/export)")
  ap.add_argument("--system", help="system prompt opening every conversation whose prompt has "
                  "no system turn of its own")
  ap.add_argument("--policies", help="comma-separated (default: every dataset in RUN_DIR/data)")
  args = ap.parse_args(argv)
  saved: dict = {}
  cfg_path = fs.join(args.run_dir, "config.json")
  if fs.exists(cfg_path):
    saved = json.loads(fs.read_bytes(cfg_path))
  sec = dict(saved.get("export") or {})
  formats = args.formats.split(",") if args.formats else sec.get("formats") or ["jsonl"]
  try:
    config = ExportConfig(formats=tuple(f.strip() for f in formats if f.strip()),
                          dir=args.dir if args.dir is not None else sec.get("dir", ""),
                          system=args.system if args.system is not None else sec.get("system"))
  except ValueError as e:  # bad input: one line, exit 2, as persyn_jax.train's handler
    print(f"error: {e}", file=sys.stderr)
    return 2
  known = run_policies(args.run_dir)
  policies = ([p.strip() for p in args.policies.split(",") if p.strip()] if args.policies
              else known)
  unknown = [p for p in policies if _folder(p) not in known]
  if unknown:
    print(f"error: --policies: no dataset of {unknown} in {fs.join(args.run_dir, 'data')}; "
          f"known: {known}", file=sys.stderr)
    return 2
  if not policies:
    print(f"{args.run_dir}: no datasets under data/", file=sys.stderr)
    return 1
  paths = export_run(args.run_dir, policies, config, name=saved.get("name", "run"))
  for policy, by_format in paths.items():
    for f, p in by_format.items():
      print(f"{policy:>10} {f:>10}  {p}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
