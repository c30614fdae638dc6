"""eval: every student (and the student before SFT) answers the held-out prompts, and the prompts
of each configured benchmark file (eval.benchmarks), exported in the format its tool reads."""
from __future__ import annotations

import time

from persyn_jax import evaluate as ev
from persyn_jax import sharding as shd
from persyn_jax.io_utils import safe_name
from persyn_jax.metrics import progress
from persyn_jax.run_config import ModelRef
from persyn_jax.sampling import generate
from persyn_jax.stages.context import Context
from persyn_jax.stages.graph import Stage


def answers(model, tok, prompts, sampling, mesh, desc: str) -> list[str]:
  """The model's answer to each prompt (the first sample of each), with a progress bar."""
  with progress(len(prompts) * sampling.num_samples, desc, unit="resp") as bar:
    results = generate(model, tok, prompts, sampling, mesh=mesh,
                       progress=lambda rows, _tokens: bar.update(rows))
  return [r.text for r in sorted((r for r in results if r.sample == 0), key=lambda r: r.index)]


def run(ctx: Context) -> dict:
  cfg = ctx.cfg
  c = cfg.eval
  prompts = ctx.prompts()["eval"]
  if not prompts and not c.benchmarks:
    raise ValueError("eval: no held-out prompts (set prompts.eval) and no eval.benchmarks")
  # read before any model is loaded: a bad file fails now, naming it
  benchmarks = {b.name: (b, ev.read_benchmark(b.format, b.path)) for b in c.benchmarks}
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
    model_name = f"{cfg.name}-{name}"
    t0 = time.time()
    out[name] = {"n": 0}  # the report reads n (no held-out prompts: benchmarks only)
    if prompts:
      texts = answers(model, tok, ev.prompts_for_model(prompts), c.sampling, mesh, f"eval/{name}")
      scored = ev.score_generations(prompts, texts, verifier=c.verifier,
                                    reference_field=c.reference_field)
      if ctx.is_writer():
        ev.export(scored["rows"], model_name, ctx.path("eval", safe_name(name)), c.exports)
      out[name] = {k: v for k, v in scored.items() if k != "rows"}
    for bname, (b, items) in benchmarks.items():
      texts = answers(model, tok, [x["prompt"] for x in items], c.sampling, mesh,
                      f"eval/{name}/{bname}")
      rows = [{**x, "response": t} for x, t in zip(items, texts)]
      paths = {}
      if ctx.is_writer():
        paths = ev.export(rows, model_name, ctx.path("eval", safe_name(name), "benchmarks",
                                                     safe_name(bname)), [b.format])
      out[name].setdefault("benchmarks", {})[bname] = {"n": len(rows), "format": b.format,
                                                       "file": paths.get(b.format)}
    out[name]["seconds"] = round(time.time() - t0, 2)
    ctx.log(f"[eval] {name}: {out[name].get('score', float('nan')):.3f}")
    del model
  ctx.write_json(out, "eval", "eval.json")
  return out


# prompts: the held-out split; student: the student before SFT and the dtype of every student
STAGE = Stage("eval", run, reads=("sft",), config=("name", "prompts", "student", "compare", "eval"),
              doc=__doc__)
