"""`generate_to_records`: a large sampling job streamed into ArrayRecord shards, resumable.

Shard k holds the responses to prompts [k * P, (k + 1) * P) (P = records_per_shard // num_samples),
in input order, so which prompts a shard holds does not depend on what ran before. A rerun after a
crash keeps every complete shard (data.shards.complete_shards) and samples only the others. A plan
file (`<stage>-<host>.plan.json`) records the config hash, teacher, prompt ids and shard layout: a
rerun with other inputs refuses to mix them.

Random keys derive from (seed, teacher, prompt id, sample) (our robustness rules): the
prompt's key component is `prompt_key(teacher, id)`, a hash, never its position in the job. The
same prompt therefore gets the same sample whatever else the job asks, in whatever order, batch,
bucket, shard, host or mesh, and a resumed job writes the same records as an uninterrupted one.

With H processes, host h owns the h-th of H contiguous parts of the prompts and writes its shards
(`<stage>-<h>-<k>-of-<n>`); reading the shards in (host, index) order gives the input order back.
Every batch still runs on all devices of all processes; a prompt's keys do not depend on which
host writes it, so the records are those of a one-process run. A rerun must use the same H.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

from persyn_jax import fs
from persyn_jax.config import config_hash, to_dict
from persyn_jax.data import records as rec
from persyn_jax.data import shards
from persyn_jax.sampling.config import GenerationResult, SamplingConfig, summarize
from persyn_jax.sampling.generate import generate

# sampling fields that change how rows are batched, never what is sampled
BATCHING_FIELDS = ("batch_size", "batching", "decode_chunk")
# fields a generation record sets itself; everything else of the prompt record is carried over
GENERATED = ("schema", "teacher", "sample", "response", "finish_reason", "tokens", "provenance")


# How a prompt's random keys are derived; in the plan, so that shards sampled under an older rule
# (keys by position in the job) are never resumed into a job under this one.
KEYS = "seed/teacher/prompt-id/sample"


def prompt_key(teacher: str, prompt_id: Any) -> int:
  """The 32-bit component of a prompt's random keys: a hash of (teacher, prompt id).

  generate() folds it into the seed's key where a prompt number would go, then the sample index:
  the key is (seed, teacher, prompt id, sample). The teacher is part of it so that two teachers
  with the same weights draw different samples. Two ids of one teacher share a key with
  probability 2^-32 per pair; that only makes their (different) prompts' draws use the same noise.
  """
  h = hashlib.sha256(f"{teacher}\x1f{prompt_id}".encode("utf-8")).digest()
  return int.from_bytes(h[:4], "little")


def prompt_of(item: Mapping[str, Any]):
  """What the model is asked: the chat messages when the prompt record has them, else the text."""
  return item["messages"] if item.get("messages") else item["prompt"]


def default_record(item: Mapping[str, Any], result: GenerationResult, *, teacher: str,
                   provenance: Mapping[str, Any]) -> dict:
  """The generation record (docs/DATA.md): the prompt record's fields, plus teacher, sample, response,
  finish_reason, tokens {prompt, response} and provenance."""
  out = {k: v for k, v in item.items() if k not in GENERATED}
  out.update(schema=rec.SCHEMA_VERSION, teacher=teacher, sample=result.sample,
             response=result.text, finish_reason=result.finish_reason,
             tokens={"prompt": result.prompt_tokens, "response": result.response_tokens},
             provenance=dict(provenance))
  if result.truncated:
    out["prompt_truncated"] = True
  return out


def _ids_hash(items: Sequence[Mapping[str, Any]]) -> str:
  h = hashlib.sha256()
  for it in items:
    h.update(str(it["id"]).encode("utf-8") + b"\n")
  return h.hexdigest()[:16]


def _check_plan(out_dir: str, stage: str, host: int, plan: dict) -> None:
  """Writes this host's plan, or checks it against an earlier run's; every process raises when
  any host's plan differs (collective), so none is left waiting for the others."""
  from persyn_jax import distributed as dist
  path = fs.join(out_dir, f"{stage}-{host}.plan.json")
  error = None
  if fs.exists(path):
    with fs.open(path, "rb") as f:
      try:
        old = json.loads(f.read())
        why = None if isinstance(old, dict) else f"a JSON {type(old).__name__}, not an object"
      except ValueError as e:  # not JSON, or not UTF-8
        old, why = {}, f"not JSON: {e}"
    if why:
      error = (f"{path}: the plan of an earlier run of stage {stage!r} is unreadable ({why}): "
               f"whether its shards match these inputs cannot be told (delete {out_dir} to start "
               "over)")
    elif diff := sorted(k for k in plan if old.get(k) != plan[k]):
      hint = (f"rerun with {old.get('hosts')} processes, or " if "hosts" in diff and
              isinstance(old.get("hosts"), int) else "")
      error = (f"{path}: an earlier run of stage {stage!r} used other {', '.join(diff)}; its "
               f"shards cannot be resumed with these inputs ({hint}delete {out_dir} to start over)")
  else:
    fs.makedirs(out_dir)
    shards.atomic_write_json(path, plan)
  dist.raise_if_any(error, shards.ShardError, f"stage {stage!r}")


def _done_shards(out_dir: str, stage: str, counts: Sequence[int]) -> set[tuple[int, int]]:
  """(host, index) of every complete shard. Each host checks its own files; with several
  processes the flags are gathered, so that every process skips the same batches (every batch is
  a collective computation over all of them)."""
  import jax
  import numpy as np
  host = jax.process_index()
  mine = shards.complete_shards(out_dir, stage, counts[host], host)
  if jax.process_count() == 1:
    return {(host, k) for k in mine}
  from jax.experimental import multihost_utils
  flags = np.zeros((max(counts),), np.int32)
  flags[sorted(mine)] = 1
  flags = np.asarray(multihost_utils.process_allgather(flags))  # [hosts, max(counts)]
  return {(int(h), int(k)) for h, k in zip(*np.nonzero(flags))}


def check_job(prompts: Sequence[Mapping[str, Any]], records_per_shard: int) -> None:
  """A generation job's inputs, checked before any work (here and in the serving-engine client):
  every prompt record has an `id` and a `prompt` or `messages`."""
  if records_per_shard < 1:
    raise ValueError(f"records_per_shard={records_per_shard}: must be >= 1")
  for i, it in enumerate(prompts):
    if not isinstance(it, Mapping) or "id" not in it or not (it.get("prompt")
                                                             or it.get("messages")):
      raise ValueError(f"prompt record {i} needs an 'id' and a 'prompt' or 'messages': {it!r:.200}")


def generate_to_records(model, tokenizer, prompts: Sequence[Mapping[str, Any]],
                        config: SamplingConfig, out_dir: str, stage: str, *, teacher: str,
                        records_per_shard: int = 4096,
                        make_record: Callable[..., dict] | None = None,
                        provenance: Mapping[str, Any] | None = None, mesh=None,
                        progress: bool = True, fmt: str = "json") -> dict:
  """Samples every prompt record (`id`, `prompt`, optional `messages`, any metadata) and writes
  `<stage>-<host>-<k>-of-<n>.array_record` shards plus `<stage>.manifest.json` into out_dir.

  make_record(item, result, teacher=, provenance=) -> record (default `default_record`).
  Prompts skipped as too long (overlong="skip") get no record; they are counted (and their ids
  listed) in the manifest's `extra.counts` / `extra.skipped_ids` (from a `<shard>.stats.json`
  sidecar per shard). With several processes, every process runs every batch (sharded over all
  devices) and host h writes the shards of the h-th contiguous part of the prompts; process 0
  writes the manifest once all have written. Returns the manifest ({} on other processes).
  """
  import jax
  check_job(prompts, records_per_shard)
  make_record = make_record or default_record
  host, hosts = jax.process_index(), jax.process_count()
  per = max(1, records_per_shard // config.num_samples)
  # host h writes the h-th contiguous part of the prompts as its shards 0..counts[h]-1
  parts, start = [], 0
  for part in shards.split_evenly(prompts, hosts):
    parts.append((start, part, max(1, math.ceil(len(part) / per))))
    start += len(part)
  counts = [c for _, _, c in parts]
  # how rows are batched is left out of the hash (it never changes a response): a job that ran
  # out of memory can resume with a smaller batch, a static one continue continuous
  prov = {"stage": stage, "config_hash": config_hash(
      {k: v for k, v in to_dict(config).items() if k not in BATCHING_FIELDS}),
      "seed": config.seed}
  prov.update(provenance or {})
  first, mine, count = parts[host]
  plan = {"stage": stage, "teacher": teacher, "keys": KEYS, "config_hash": prov["config_hash"],
          "prompts": len(prompts), "prompt_ids": _ids_hash(prompts), "prompts_per_shard": per,
          "hosts": hosts, "host_prompts": [first, first + len(mine)], "shards": count}
  _check_plan(out_dir, stage, host, plan)
  done = _done_shards(out_dir, stage, counts)
  # every process runs every batch, in this order (each batch is sharded over all devices)
  todo = [(h, k, part_h[k * per:(k + 1) * per])
          for h, (_, part_h, count_h) in enumerate(parts) for k in range(count_h)
          if (h, k) not in done]

  bar = None
  rows_total = len(prompts) * config.num_samples
  if progress and host == 0:
    from tqdm.auto import tqdm
    bar = tqdm(total=rows_total, unit="resp", desc=f"{stage}/{teacher}", dynamic_ncols=True)
    bar.update((rows_total - sum(len(chunk) for *_, chunk in todo) * config.num_samples))
  t0, tokens = time.perf_counter(), 0

  def tick(rows: int, new_tokens: int) -> None:
    nonlocal tokens
    tokens += new_tokens
    if bar is not None:
      bar.update(rows)
      dt = max(time.perf_counter() - t0, 1e-9)
      bar.set_postfix(prompts_s=f"{bar.n / config.num_samples / dt:.1f}",
                      tok_s=f"{tokens / dt:.0f}", refresh=False)

  try:
    for h, k, chunk in todo:
      results = generate(model, tokenizer, [prompt_of(it) for it in chunk], config, mesh=mesh,
                         indices=[prompt_key(teacher, it["id"]) for it in chunk], progress=tick)
      if h != host:  # another host's shard: it writes it
        continue
      # results come prompt-major, num_samples per prompt, in the chunk's order
      items = [chunk[j // config.num_samples] for j in range(len(results))]
      out = [make_record(it, r, teacher=teacher, provenance=prov)
             for it, r in zip(items, results) if r.finish_reason != "skipped"]
      # the stats sidecar goes first: a complete shard always has one
      stats = summarize(results)
      stats["skipped_ids"] = sorted({str(it["id"]) for it, r in zip(items, results)
                                     if r.finish_reason == "skipped"})
      shards.atomic_write_json(_stats_path(out_dir, stage, host, k, count), stats)
      shards.write_shard(out_dir, stage, out, index=k, count=count, host=host, fmt=fmt)
  finally:
    if bar is not None:
      bar.close()

  from persyn_jax import distributed as dist
  dist.barrier(f"generate:{stage}:written")
  manifest: dict = {}
  if host == 0:
    manifest = _write_manifest(out_dir, stage, counts, teacher, config, plan)
  dist.barrier(f"generate:{stage}:manifest")
  return manifest


def _write_manifest(out_dir: str, stage: str, counts: Sequence[int], teacher: str,
                    config: SamplingConfig, plan: dict) -> dict:
  totals: dict[str, Any] = {}
  for h, count in enumerate(counts):
    for k in range(count):
      path = _stats_path(out_dir, stage, h, k, count)
      try:
        with fs.open(path, "rb") as f:
          stats = json.loads(f.read())
      except FileNotFoundError:
        raise shards.ShardError(f"{path}: missing; shard {k} of host {h} was not written by "
                                "generate_to_records (delete it and rerun)") from None
      for key, v in stats.items():
        totals[key] = totals.get(key, 0 if key != "skipped_ids" else []) + v
  skipped_ids = totals.pop("skipped_ids", [])
  plan = {k: v for k, v in plan.items() if k not in ("host_prompts", "shards")}
  plan["shards"] = list(counts)
  extra = {"teacher": teacher, "sampling": to_dict(config), "plan": plan, "counts": totals,
           "skipped_ids": skipped_ids}
  return shards.write_manifest(out_dir, stage, extra, num_hosts=len(counts))


def _stats_path(out_dir: str, stage: str, host: int, index: int, count: int) -> str:
  return fs.join(out_dir, shards.shard_name(stage, host, index, count) + ".stats.json")
