"""router: a Bradley–Terry router on all teacher pairs of the probe prompts (Eq. 3)."""
from __future__ import annotations

from persyn_jax import evaluate as ev
from persyn_jax.router_train import fit_router
from persyn_jax.stages.context import Context
from persyn_jax.stages.graph import Stage


def run(ctx: Context) -> dict:
  table = ctx.score_table()
  by_id = {p["id"]: p for p in ctx.prompts()["probe"]}
  prompts = [ev.prompt_of(by_id[i]) for i in table.ids]
  router, report = fit_router(ctx.cfg.router, prompts, table.reward, ctx.teachers,
                              mesh=ctx.mesh_for(ctx.cfg.router.mesh), log=None)
  if report["unroutable"]:
    ctx.log(f"[router] no probe pair compares {report['unroutable']} (every response failed or "
            f"tied): the router never routes to them")
  router.save(ctx.path("router", "checkpoint"))
  ctx.write_json(report, "router", "router_eval.json")
  return {k: v for k, v in report.items() if not isinstance(v, (dict, list))}


STAGE = Stage("router", run, reads=("score",),
              config=("teachers", "prompts", "router"), doc=__doc__)
