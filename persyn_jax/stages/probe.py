"""probe: every teacher answers every probe prompt (k·p generations).

Teachers with `engine: jax` answer in-process, one after another over the sampling mesh; those
with `engine: openai` are sent to their servers all at once (engines.generate_openai_to_records,
on process 0 only) while the in-process teachers run. Both write the same shards and manifests,
so the later stages read them alike.
"""
from __future__ import annotations

import threading
import time
from typing import Mapping, Sequence

from persyn_jax import distributed as dist
from persyn_jax import sharding as shd
from persyn_jax.engines import StageError, generate_openai_to_records
from persyn_jax.run_config import ModelRef
from persyn_jax.sampling import generate_to_records
from persyn_jax.stages.context import Context, teacher_shards
from persyn_jax.stages.graph import Stage


def teacher_answers(ctx: Context, ref: ModelRef, items: list[dict], stage: str) -> dict:
  """`ref` answers `items` into run_dir/<stage>/ (its shards: teacher_shards(stage, ref.name)) on
  the sampling mesh; returns its counts (generations, response tokens, seconds)."""
  cfg = ctx.cfg
  sampling = cfg.sampling
  mesh = ctx.mesh_for(ref.mesh or sampling.mesh)  # a teacher's own serving layout, if it has one
  # the serving layout: weights over `tensor` only, so decode never gathers FSDP shards
  model, tok = ctx.load(ref, mesh, rules=shd.SERVING)
  t0 = time.time()
  man = generate_to_records(model, tok, items, sampling, ctx.path(stage),
                            teacher_shards(stage, ref.name), teacher=ref.name,
                            records_per_shard=cfg.records_per_shard, mesh=mesh,
                            provenance={"run": cfg.name})
  seconds = time.time() - t0  # every host's shards and the manifest are written: all may read
  del model
  extra = man.get("extra", {}) if man else {}
  counts = extra.get("counts", {})
  return {"generations": int(counts.get("results", len(items) * sampling.num_samples)),
          "tokens": int(counts.get("response_tokens", 0)), "seconds": round(seconds, 2)}


def served_answers(ctx: Context, ref: ModelRef, items: list[dict], stage: str) -> dict:
  """`ref` (engine: openai) answers `items` on its server, written as teacher_answers writes
  them; its counts are the server's token counts (the cost of a served teacher)."""
  cfg = ctx.cfg
  t0 = time.time()
  man = generate_openai_to_records(ref.openai, items, cfg.sampling, ctx.path(stage),
                                   teacher_shards(stage, ref.name), teacher=ref.name,
                                   records_per_shard=cfg.records_per_shard,
                                   provenance={"run": cfg.name})
  counts = man["extra"]["counts"]
  return {"generations": int(counts["results"]), "tokens": int(counts["usage_completion_tokens"]),
          "prompt_tokens": int(counts["usage_prompt_tokens"]), "requests": int(counts["requests"]),
          "engine": "openai", "seconds": round(time.time() - t0, 2)}


def answer_all(ctx: Context, stage: str, items: Mapping[str, Sequence[dict]]) -> dict[str, dict]:
  """Every teacher answers its `items[name]` in `stage`; returns {teacher: counts}, run order.

  Process 0 sends the served teachers' jobs to their servers in background threads (each job
  has its own connections) while every process runs the in-process teachers; then all wait at
  a barrier, so the served shards exist before any process reads them. Every served job runs
  to its end; the failures are raised together (StageError) on every process.
  """
  idle = {"generations": 0, "tokens": 0, "seconds": 0.0}
  out: dict[str, dict] = {}
  served = [r for r in ctx.cfg.teachers if r.served and items.get(r.name)]
  done: dict[str, dict] = {}
  errors: dict[str, str] = {}

  def job(ref: ModelRef) -> None:
    try:
      done[ref.name] = served_answers(ctx, ref, list(items[ref.name]), stage)
    except Exception as e:  # noqa: BLE001  reported below, with the other teachers' failures
      errors[ref.name] = f"{type(e).__name__}: {e}"

  # daemon threads: an in-process teacher's error ends the process without waiting for the
  # served jobs, whose answers so far are in their progress files (a rerun requests the rest)
  threads = []
  if dist.is_writer():
    for ref in served:
      ctx.log(f"[{stage}] {ref.name}: {len(items[ref.name])} prompts on {ref.openai.url}")
      threads.append(threading.Thread(target=job, args=(ref,), daemon=True,
                                      name=f"{stage}-{ref.name}"))
      threads[-1].start()
  for ref in ctx.cfg.teachers:
    todo = list(items.get(ref.name, ()))
    if ref.served or not todo:
      out[ref.name] = dict(idle)
      continue
    ctx.log(f"[{stage}] {ref.name}: {len(todo)} prompts")
    out[ref.name] = teacher_answers(ctx, ref, todo, stage)
  if not served:  # every process took this branch (same config): no collective needed
    return out
  for t in threads:
    t.join()
  out.update(done)
  msg = ("; ".join(f"[{n}] {m}" for n, m in sorted(errors.items()))) if errors else None
  dist.raise_if_any(msg, StageError, f"{stage}: served teachers")
  dist.barrier(f"{stage}-served-teachers")
  # processes other than 0 learn the served teachers' counts from process 0
  counts = dist.broadcast_json({n: out[n] for n in (r.name for r in served)})
  out.update(counts)
  return {r.name: out[r.name] for r in ctx.cfg.teachers}


def run(ctx: Context) -> dict:
  probe = ctx.prompts()["probe"]
  per_teacher = answer_all(ctx, "probe", {ref.name: probe for ref in ctx.cfg.teachers})
  return {"prompts": len(probe), "teachers": per_teacher,
          "skipped_prompts": ctx.prompts()["skipped"]}


STAGE = Stage("probe", run, reads=(),
              config=("teachers", "prompts", "sampling", "records_per_shard", "name"),
              doc=__doc__)
