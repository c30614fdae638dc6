"""eval: every student (and the student before SFT) answers the held-out prompts."""
from __future__ import annotations

import time

from persyn_jax import evaluate as ev
from persyn_jax import sharding as shd
from persyn_jax.sampling import generate
from persyn_jax.io_utils import safe_name
from persyn_jax.run_config import ModelRef
from persyn_jax.stages.context import Context
from persyn_jax.stages.graph import Stage


def run(ctx: Context) -> dict:
  cfg = ctx.cfg
  c = cfg.eval
  prompts = ctx.prompts()["eval"]
  if not prompts:
    raise ValueError("eval: no held-out prompts (set prompts.eval)")
  mesh = ctx.mesh_for(c.sampling.mesh)
  students = {}
  if c.base_student:
    students["base_student"] = cfg.student.path
  for policy in cfg.compare:
    students[policy] = ctx.path("sft", safe_name(policy), "student")
  out = {}
  for name, path in students.items():
    # student.dtype: each student is evaluated as it would be served.
    model, tok = ctx.load(ModelRef(name, path, dtype=cfg.student.dtype), mesh, rules=shd.SERVING)
    t0 = time.time()
    results = generate(model, tok, ev.prompts_for_model(prompts), c.sampling, mesh=mesh)
    scored = ev.score_generations(prompts, [r.text for r in results], verifier=c.verifier,
                                  reference_field=c.reference_field)
    if ctx.is_writer():
      ev.export(scored["rows"], f"{cfg.name}-{name}", ctx.path("eval", safe_name(name)), c.exports)
    out[name] = {k: v for k, v in scored.items() if k != "rows"}
    out[name]["seconds"] = round(time.time() - t0, 2)
    ctx.log(f"[eval] {name}: {out[name].get('score', float('nan')):.3f}")
    del model
  ctx.write_json(out, "eval", "eval.json")
  return out


# prompts: the held-out split; student: the student before SFT and the dtype of every student
STAGE = Stage("eval", run, reads=("sft",), config=("name", "prompts", "student", "compare", "eval"),
              doc=__doc__)
