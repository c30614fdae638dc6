"""generate: each teacher answers only the prompts some policy gave it and the probe did not
already cover (every prompt, with the oracle: Generate then Select); then one dataset per policy
is assembled (data/<policy>/)."""
from __future__ import annotations

import json

import numpy as np

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
  with open(ctx.path("route", "assignments.json")) as f:
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
  responses: dict[tuple[str, str], dict] = {}
  for r in ctx.teacher_records("probe"):
    if r.get("sample", 0) == 0:
      responses[(r["id"], r["teacher"])] = r
  generated = [t for t in ctx.teachers if per_teacher[t]["generations"]]
  for r in ctx.teacher_records("generate", generated):
    responses[(r["id"], r["teacher"])] = r
  if oracle:
    scored, _ = score(ctx, [r for (i, _), r in responses.items() if i in by_id])
    ids, teachers, reward = reward_matrix(scored, ctx.teachers, "reward")
    best = np.argmax(np.where(np.isnan(reward), -np.inf, reward), axis=1)
    assignments["oracle"] = {i: teachers[j] for i, j in zip(ids, best)}
    ctx.write_json(assignments["oracle"], "generate", "oracle_assignment.json")
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
  return {"teachers": per_teacher, "datasets": datasets}


# scoring, student: the oracle scores every teacher's answer with the student, as the score stage
STAGE = Stage("generate", run, reads=("probe", "route"),
              config=("teachers", "student", "prompts", "sampling", "scoring", "compare",
                      "records_per_shard", "name"), doc=__doc__)
