"""`generate_openai_to_records`: a teacher's sampling job sent to an OpenAI-compatible server and
written as the in-process sampler writes it (sampling/records.py): the same records, shards,
stats sidecars and manifest, so every later stage reads either alike.

Each prompt is one request for num_samples responses, `concurrency` requests in flight. Every
answer (or final error) is appended to `<stage>.progress.jsonl` (engines/progress.py) the moment
it arrives, so a killed run loses at most the requests in flight and a rerun requests only the
prompts without an answer, failed ones included. The shards are built from that file once every
prompt has its answer, in input order with the in-process layout (shard k holds prompts
[k * P, (k + 1) * P), P = records_per_shard // num_samples), so nothing is duplicated or dropped.

Each request's seed comes from (sampling seed, teacher, prompt id): an engine that honours seeds
answers a rerun the same. Counts and cost come from the server's usage numbers.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

from persyn_jax import fs
from persyn_jax.config import config_hash, to_dict
from persyn_jax.data import shards
from persyn_jax.engines.openai import (Client, EngineError, OpenAIEngineConfig, public_url,
                                       request_seed)
from persyn_jax.engines.progress import ProgressLog
from persyn_jax.sampling.config import FINISH_REASONS, GenerationResult, SamplingConfig
from persyn_jax.sampling.records import check_job, default_record, prompt_of


class StageError(RuntimeError):
  """Prompts that failed after their retries (`failed`: [(prompt id, error)]), or teachers' jobs
  that failed (`errors`: {stage: message})."""

  def __init__(self, message: str, failed=(), errors=None):
    super().__init__(message)
    self.failed = list(failed)
    self.errors = dict(errors or {})


def _ids_hash(items: Sequence[Mapping[str, Any]]) -> str:
  h = hashlib.sha256()
  for it in items:
    h.update(str(it["id"]).encode("utf-8") + b"\n")
  return h.hexdigest()[:16]


def progress_path(out_dir: str, stage: str) -> str:
  """The stage's append-only progress file; for a gs:// `out_dir` (objects cannot be appended
  to) in this machine's local working directory for it (fs.work_dir)."""
  return os.path.join(fs.work_dir(out_dir), f"{stage}.progress.jsonl")


def _answer(client: Client, i: int, item: Mapping[str, Any], sampling: SamplingConfig,
            seed: int) -> dict:
  """Prompt i's progress entry: its choices and usage, or the error that ended its retries."""
  entry: dict[str, Any] = {"i": i, "id": str(item["id"]), "seed": seed}
  try:
    out = client.chat(prompt_of(item), sampling, seed)
  except (EngineError, TypeError, ValueError) as e:  # a bad prompt fails alone, like a 400
    return {**entry, "ok": False, "error": client.scrub(f"{type(e).__name__}: {e}")}
  return {**entry, "ok": True, **out}


def _results(i: int, entry: dict) -> list[tuple[GenerationResult, int | None]]:
  """(GenerationResult, server's response tokens or None) per sample of an answered prompt."""
  usage = entry["usage"]
  return [(GenerationResult(i, s, c["text"], (), c["finish_reason"], usage["prompt_tokens"],
                            c["tokens"] if c["tokens"] is not None else 0, c["stop"],
                            entry.get("prompt_truncated", False)), c["tokens"])
          for s, c in enumerate(entry["choices"])]


def _stats(entries: Sequence[tuple[Mapping[str, Any], dict | None]]) -> dict:
  """The in-process sidecar counts (sampling.config.summarize), from the server's usage numbers,
  plus the failed prompts' ids and the request usage (cost)."""
  out = {"results": 0, "prompt_tokens": 0, "response_tokens": 0, "truncated": 0,
         "requests": 0, "usage_prompt_tokens": 0, "usage_completion_tokens": 0,
         "failed": 0, "failed_ids": [], "skipped_ids": []}
  out.update({r: 0 for r in FINISH_REASONS})
  for item, entry in entries:
    if entry is None or not entry["ok"]:
      out["failed"] += 1
      out["failed_ids"].append(str(item["id"]))
      continue
    usage, n = entry["usage"], len(entry["choices"])
    out["results"] += n
    out["prompt_tokens"] += usage["prompt_tokens"] * n  # per response, as in-process
    out["response_tokens"] += usage["completion_tokens"]
    out["truncated"] += n * bool(entry.get("prompt_truncated"))
    out["requests"] += 1
    out["usage_prompt_tokens"] += usage["prompt_tokens"]
    out["usage_completion_tokens"] += usage["completion_tokens"]
    for c in entry["choices"]:
      out[c["finish_reason"]] = out.get(c["finish_reason"], 0) + 1
  return out


def generate_openai_to_records(engine_cfg: OpenAIEngineConfig, prompts: Sequence[Mapping[str, Any]],
                               sampling_cfg: SamplingConfig, out_dir: str, stage: str, *,
                               teacher: str, records_per_shard: int = 4096,
                               provenance: Mapping[str, Any] | None = None, fmt: str = "json",
                               max_failures: int = 0, progress: bool = True) -> dict:
  """Samples every prompt record (`id`, `prompt`, optional `messages`, any metadata) on the
  engine; writes `<stage>-0-<k>-of-<n>.array_record` shards, their stats sidecars and
  `<stage>.manifest.json` into out_dir, as `sampling.records.generate_to_records` does. Returns
  the manifest; its extra.counts add requests, the server's usage totals and failed prompts.

  Records are `default_record`'s; provenance adds engine, url, model, the request's seed and the
  server's usage. tokens.response is the server's count for that response (absent when n > 1 and
  the server reports only a total, as the OpenAI API does). A prompt that fails after its
  retries is kept in the progress file with its error; when more than max_failures did, no shard
  is written and StageError lists them (rerun to request them again); otherwise the shards leave
  them out and the manifest lists their ids. One process writes (host 0): on a multi-process run,
  call it on process 0 only.
  """
  check_job(prompts, records_per_shard)
  n = sampling_cfg.num_samples
  per = max(1, records_per_shard // n)
  count = max(1, math.ceil(len(prompts) / per))
  chash = config_hash({k: v for k, v in to_dict(sampling_cfg).items() if k != "batch_size"})
  prov = {"stage": stage, "config_hash": chash, "seed": sampling_cfg.seed, "engine": "openai",
          "url": public_url(engine_cfg.url), "model": engine_cfg.model}
  prov.update(provenance or {})
  # the url is left out: a server that moved still gives this job's answers
  plan = {"stage": stage, "teacher": teacher, "config_hash": chash, "engine": "openai",
          "model": engine_cfg.model, "prompts": len(prompts), "prompt_ids": _ids_hash(prompts),
          "prompts_per_shard": per, "shards": count}
  with ProgressLog(progress_path(out_dir, stage), plan) as log:
    todo = [i for i in range(len(prompts)) if i not in log.done()]
    if todo:
      _request_all(engine_cfg, prompts, sampling_cfg, todo, log, stage, teacher, progress)
    failed = log.failed()
    if len(failed) > max_failures:
      shown = "; ".join(f"{e['id']}: {e['error']}" for e in list(failed.values())[:3])
      raise StageError(
          f"stage {stage!r} teacher {teacher!r}: {len(failed)} of {len(prompts)} prompts failed "
          f"after {engine_cfg.retries} retries (e.g. {shown}); each error is in "
          f"{log.path}; rerun to request them again",
          failed=[(e["id"], e["error"]) for e in failed.values()])
    entries = dict(log.latest)
  for k in range(count):
    _write_shard(out_dir, stage, k, count, range(k * per, min(len(prompts), (k + 1) * per)),
                 prompts, entries, teacher, prov, fmt)
  extra = {"teacher": teacher, "sampling": to_dict(sampling_cfg),
           "engine": {"engine": "openai", **to_dict(engine_cfg), "url": prov["url"]},
           "plan": {**plan, "shards": [count]}, "counts": _totals(out_dir, stage, count)}
  extra["skipped_ids"] = extra["counts"].pop("skipped_ids")
  extra["failed_ids"] = extra["counts"].pop("failed_ids")
  return shards.write_manifest(out_dir, stage, extra, num_hosts=1)


def _request_all(engine_cfg, prompts, sampling_cfg, todo, log, stage, teacher, progress) -> None:
  client = Client(engine_cfg)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="prompt",
               desc=f"{stage}/{teacher}", dynamic_ncols=True)
  t0, tokens = time.perf_counter(), 0
  pool = cf.ThreadPoolExecutor(engine_cfg.concurrency, thread_name_prefix=f"{stage}-openai")
  try:
    futures = [pool.submit(_answer, client, i, prompts[i], sampling_cfg,
                           request_seed(sampling_cfg.seed, teacher, str(prompts[i]["id"])))
               for i in todo]
    for fut in cf.as_completed(futures):
      entry = fut.result()
      log.record(entry)
      if bar is not None:
        tokens += entry.get("usage", {}).get("completion_tokens", 0)
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}",
                        failed=len(log.failed()), refresh=False)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    if bar is not None:
      bar.close()


def _write_shard(out_dir, stage, k, count, rows, prompts, entries, teacher, prov, fmt) -> None:
  """Shard k from the progress entries; kept when an earlier build wrote the same one."""
  stats = _stats([(prompts[i], entries.get(i)) for i in rows])
  name = shards.shard_name(stage, 0, k, count)
  stats_path = fs.join(out_dir, name + ".stats.json")
  try:
    with fs.open(stats_path, "rb") as f:
      same = json.loads(f.read()) == stats
  except (OSError, ValueError):
    same = False
  if same and shards.shard_is_complete(fs.join(out_dir, name)):
    return
  out = []
  for i in rows:
    entry = entries.get(i)
    if entry is None or not entry["ok"]:
      continue
    p = {**prov, "request_seed": entry["seed"], "usage": entry["usage"]}
    for result, tokens in _results(i, entry):
      r = default_record(prompts[i], result, teacher=teacher, provenance=p)
      if tokens is None:
        del r["tokens"]["response"]
      out.append(r)
  shards.atomic_write_json(stats_path, stats)  # first: a complete shard always has one
  shards.write_shard(out_dir, stage, out, index=k, count=count, host=0, fmt=fmt)


def _totals(out_dir: str, stage: str, count: int) -> dict:
  totals: dict[str, Any] = {}
  for k in range(count):
    stats = fs.join(out_dir, shards.shard_name(stage, 0, k, count) + ".stats.json")
    with fs.open(stats, "rb") as f:
      for key, v in json.loads(f.read()).items():
        totals[key] = totals.get(key, [] if isinstance(v, list) else 0) + v
  return totals


@dataclasses.dataclass(frozen=True)
class TeacherJob:
  """One teacher's generate_openai_to_records call (its arguments, by name)."""

  engine: OpenAIEngineConfig
  prompts: Sequence[Mapping[str, Any]]
  sampling: SamplingConfig
  out_dir: str
  stage: str
  teacher: str
  records_per_shard: int = 4096
  provenance: Mapping[str, Any] | None = None
  max_failures: int = 0


def run_teachers(jobs: Sequence[TeacherJob], *, progress: bool = True) -> dict[str, dict]:
  """Runs several teachers' jobs at once (one process, each with its own connections); returns
  {stage: manifest}. Every job runs to its end; then StageError names each job that failed."""
  stages = [j.stage for j in jobs]
  if len(set(stages)) != len(stages):
    raise ValueError(f"run_teachers: stages must differ (each has its own files): {stages}")
  manifests, errors = {}, {}
  with cf.ThreadPoolExecutor(max(1, len(jobs)), thread_name_prefix="teacher") as pool:
    futures = {pool.submit(generate_openai_to_records, j.engine, j.prompts, j.sampling, j.out_dir,
                           j.stage, teacher=j.teacher, records_per_shard=j.records_per_shard,
                           provenance=j.provenance, max_failures=j.max_failures,
                           progress=progress): j.stage for j in jobs}
    for fut in cf.as_completed(futures):
      try:
        manifests[futures[fut]] = fut.result()
      except Exception as e:  # noqa: BLE001  the others still finish; all are reported below
        errors[futures[fut]] = f"{type(e).__name__}: {e}"
  if errors:
    raise StageError(f"{len(errors)} of {len(jobs)} teachers failed: " +
                     "; ".join(f"[{s}] {m}" for s, m in sorted(errors.items())), errors=errors)
  return manifests
