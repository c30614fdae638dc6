"""generate: each teacher answers only the prompts some policy gave it and the probe did not
already cover (every prompt, with the oracle: Generate then Select); then one dataset per policy
is assembled (data/<policy>/).

The oracle takes each prompt's argmax of the reward (averaged over samples), ties broken by the
seeded hash (policies.best_teachers) and counted. With num_samples > 1 each (prompt, teacher)
keeps its best-reward sample (policies.best_sample): probe prompts by the score stage's scores,
generated ones scored here (generate/scored/) as the score stage would."""
from __future__ import annotations

import json

import numpy as np

from persyn_jax import export, fs
from persyn_jax import policies as pol
from persyn_jax.data import shards
from persyn_jax.io_utils import safe_name
from persyn_jax.scoring import reward_matrix
from persyn_jax.stages.context import Context
from persyn_jax.stages.graph import Stage
from persyn_jax.stages.probe import answer_all
from persyn_jax.stages.score import score


def run(ctx: Context) -> dict:
  cfg = ctx.cfg
  p = ctx.prompts()
  with fs.open(ctx.path("route", "assignments.json")) as f:
    assignments: dict[str, dict[str, str]] = json.load(f)
  probe_ids = {x["id"] for x in p["probe"]}
  by_id = {x["id"]: x for x in p["train"]}
  need: dict[str, set[str]] = {t: set() for t in ctx.teachers}
  for a in assignments.values():
    for i, t in a.items():
      if i not in probe_ids:
        need[t].add(i)
  oracle = "oracle" in cfg.compare
  if oracle:  # Generate then Select: every teacher on every prompt
    for t in ctx.teachers:
      need[t] |= {i for i in by_id if i not in probe_ids}
  # served teachers (engine: openai) run all at once, alongside the in-process ones
  per_teacher = answer_all(ctx, "generate", {
      ref.name: [x for x in p["train"] if x["id"] in need[ref.name]] for ref in cfg.teachers})
  generated = [t for t in ctx.teachers if per_teacher[t]["generations"]]
  generated_records = ctx.teacher_records("generate", generated)
  n = cfg.sampling.num_samples
  # the oracle compares every teacher's reward; with several samples, the kept one is the
  # best-reward sample, so the generated responses are scored as the probe's were
  scored_generated = None
  if generated_records and (oracle or n > 1):
    scored_generated, stats = score(ctx, generated_records)
    shards.write_stage_records(ctx.path("generate", "scored"), "scored", scored_generated,
                               records_per_shard=cfg.records_per_shard, extra={"stats": stats})
  # every probe sample, with the scores the score stage gave it
  probe_scored = ctx.records("score")
  counts: dict = {"teachers": per_teacher}
  if oracle:
    scored = [r for r in probe_scored + (scored_generated or []) if r["id"] in by_id]
    ids, teachers, reward = reward_matrix(scored, ctx.teachers, "reward")
    best = pol.best_teachers(ids, teachers, reward, cfg.policies.seed)
    assignments["oracle"] = best.assignment
    ctx.write_json(best.assignment, "generate", "oracle_assignment.json")
    counts["oracle"] = {"prompts": len(ids), "ties": best.ties, "unscored": best.unscored}
    if best.ties:
      ctx.log(f"[generate] oracle: {best.ties} of {len(ids)} prompts tie on the top reward "
              f"(broken by the seeded hash, policies.seed={cfg.policies.seed})")
  responses, counts["samples"] = kept_samples(
      probe_scored + (scored_generated if scored_generated is not None else generated_records),
      n, cfg.policies.seed, ctx.log)
  datasets = {}
  for policy in cfg.compare:
    a = assignments[policy]
    recs = []
    for x in p["train"]:
      r = responses.get((x["id"], a[x["id"]]))
      if r is None:
        raise RuntimeError(f"internal: no response of {a[x['id']]} for prompt {x['id']!r}")
      recs.append({**r, "policy": policy})
    shards.write_stage_records(ctx.path("data", safe_name(policy)), "data", recs,
                               records_per_shard=cfg.records_per_shard)
    datasets[policy] = {"records": len(recs), "teacher_shares": pol.shares(a, ctx.teachers)}
  counts["datasets"] = datasets
  # `export` is not in the stage's config: changing it never reruns generation (rewrite the files
  # of a finished run with `python -m persyn_jax.export RUN_DIR`).
  counts["exports"] = {}
  if cfg.export.formats and ctx.is_writer():
    counts["exports"] = export.export_run(ctx.dir, cfg.compare, cfg.export, name=cfg.name)
    ctx.log(f"[generate] exported {', '.join(cfg.export.formats)} to "
            f"{cfg.export.dir or ctx.path('export')}")
  return counts


def kept_samples(records: list[dict], num_samples: int, seed: int, log
                 ) -> tuple[dict[tuple[str, str], dict], dict]:
  """The one response of each (prompt id, teacher) that goes into a dataset: the best-reward
  sample (policies.best_sample); with no scored sample, the seeded hash picks one. Returns the
  responses and their counts (pairs, pairs with no scored sample)."""
  kept = pol.best_sample(records, seed)
  unscored = sum(_reward(r) is None for r in kept)
  if num_samples > 1 and unscored:
    log(f"[generate] {unscored} of {len(kept)} (prompt, teacher) pairs have no scored sample; "
        f"kept by the seeded hash (policies.seed={seed})")
  return ({(r["id"], r["teacher"]): r for r in kept},
          {"num_samples": num_samples, "pairs": len(kept), "unscored": unscored})


def _reward(r: dict) -> float | None:
  v = (r.get("scores") or {}).get("reward")
  return v if v is not None and np.isfinite(v) else None


# scoring, student: the oracle (and, with num_samples > 1, the choice of the kept sample) scores
# the generated answers as the score stage does; policies: its seed breaks ties
STAGE = Stage("generate", run, reads=("probe", "score", "route"),
              config=("teachers", "student", "prompts", "sampling", "scoring", "policies",
                      "compare", "records_per_shard", "name"), doc=__doc__,
              outputs=("data",))
