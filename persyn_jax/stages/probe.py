"""probe: every teacher answers every probe prompt (k·p generations)."""
from __future__ import annotations

import time

from persyn_jax import sharding as shd
from persyn_jax.sampling import generate_to_records
from persyn_jax.run_config import ModelRef
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


def run(ctx: Context) -> dict:
  probe = ctx.prompts()["probe"]
  per_teacher = {}
  for ref in ctx.cfg.teachers:
    ctx.log(f"[probe] {ref.name}: {len(probe)} prompts")
    per_teacher[ref.name] = teacher_answers(ctx, ref, probe, "probe")
  return {"prompts": len(probe), "teachers": per_teacher,
          "skipped_prompts": ctx.prompts()["skipped"]}


STAGE = Stage("probe", run, reads=(),
              config=("teachers", "prompts", "sampling", "records_per_shard", "name"),
              doc=__doc__)
