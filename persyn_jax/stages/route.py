"""route: the router assigns every non-probe training prompt; every compared policy gets its
assignment of all training prompts (the oracle's comes in generate)."""
from __future__ import annotations

import numpy as np

from persyn_jax import evaluate as ev
from persyn_jax import policies as pol
from persyn_jax.data import shards
from persyn_jax.metrics import progress
from persyn_jax.router import Router
from persyn_jax.stages.context import Context
from persyn_jax.stages.graph import Stage

ROUTE_CHUNK = 4096


def run(ctx: Context) -> dict:
  cfg = ctx.cfg
  p = ctx.prompts()
  rest = p["rest"]
  router = Router.load(ctx.path("router", "checkpoint"), mesh=ctx.mesh_for(cfg.router.mesh))
  names, parts = [], [np.zeros((0, len(ctx.teachers)), np.float32)]
  # routed a chunk at a time, for the progress bar; each chunk is still batched by length
  with progress(len(rest), "route", unit="prompt") as bar:
    for i in range(0, len(rest), ROUTE_CHUNK):
      chunk = rest[i:i + ROUTE_CHUNK]
      n, s = router.route([ev.prompt_of(x) for x in chunk])
      names += n
      parts.append(s)
      bar.update(len(chunk))
  scores = np.concatenate(parts)
  routes = {x["id"]: t for x, t in zip(rest, names)}
  route_records = [{**x, "route": {"teacher": t, "scores": dict(zip(ctx.teachers, map(float, s)))}}
                   for x, t, s in zip(rest, names, scores)]
  shards.write_stage_records(ctx.path("route"), "route", route_records,
                             records_per_shard=cfg.records_per_shard)
  table = ctx.score_table()
  train_ids = [x["id"] for x in p["train"]]
  families = {t.name: t.family for t in cfg.teachers}
  assignments = {}
  for policy in cfg.compare:
    if policy == "oracle":
      continue  # known only after every teacher answered every prompt (generate stage)
    assignments[policy] = pol.assign(policy, train_ids, table, cfg.policies,
                                     families=families, student_family=cfg.student.family,
                                     routes=routes)
  ctx.write_json(assignments, "route", "assignments.json")
  return {"routed": len(rest), "router_shares": pol.shares(routes, ctx.teachers),
          "policies": {k: pol.shares(v, ctx.teachers) for k, v in assignments.items()}}


STAGE = Stage("route", run, reads=("score", "router"),
              config=("teachers", "student", "prompts", "router", "policies", "compare",
                      "records_per_shard"), doc=__doc__)
