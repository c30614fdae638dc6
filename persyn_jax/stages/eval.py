"""eval: every student (each policy's, per seed, and the student before SFT) answers the held-out
prompts, and the prompts of each configured benchmark file (eval.benchmarks), exported in the
format its tool reads. eval.json keeps each student's per-prompt correctness (the report's paired
bootstrap reads it); a student already scored (its result.json) is not evaluated again."""
from __future__ import annotations

import time

from persyn_jax import evaluate as ev
from persyn_jax import fs
from persyn_jax import sharding as shd
from persyn_jax.io_utils import safe_name
from persyn_jax.metrics import progress
from persyn_jax.run_config import ModelRef
from persyn_jax.sampling import generate
from persyn_jax.stages.context import Context
from persyn_jax.stages.sft import seeds, student_dir
from persyn_jax.stages.graph import Stage


def generations(model, tok, prompts, sampling, mesh, desc: str) -> list:
  """The model's generation (GenerationResult) for each prompt, the first sample of each, in
  prompt order, with a progress bar."""
  with progress(len(prompts) * sampling.num_samples, desc, unit="resp") as bar:
    results = generate(model, tok, prompts, sampling, mesh=mesh,
                       progress=lambda rows, _tokens: bar.update(rows))
  return sorted((r for r in results if r.sample == 0), key=lambda r: r.index)


def answers(model, tok, prompts, sampling, mesh, desc: str) -> list[str]:
  """The model's answer to each prompt (the first sample of each), with a progress bar."""
  return [r.text for r in generations(model, tok, prompts, sampling, mesh, desc)]


def run(ctx: Context) -> dict:
  cfg = ctx.cfg
  c = cfg.eval
  prompts = ctx.prompts()["eval"]
  if not prompts and not c.benchmarks:
    raise ValueError("eval: no held-out prompts (set prompts.eval) and no eval.benchmarks")
  # read before any model is loaded: a bad file fails now, naming it
  benchmarks = {b.name: (b, ev.read_benchmark(b.format, b.path)) for b in c.benchmarks}
  # (name, seed, model dir, output dir's parts in the run dir); greedy decoding needs no seed
  # for the base student
  students = []
  if c.base_student:
    students.append(("base_student", None, cfg.student.path, ("eval", "base_student")))
  for policy in cfg.compare:
    for seed in seeds(cfg):
      students.append((policy, seed, fs.join(student_dir(ctx, policy, seed), "student"),
                       ("eval", safe_name(policy), *([] if seed is None else [f"seed{seed}"]))))
  per_student: dict = {}
  for name, seed, path, parts in students:
    out_dir, done = ctx.path(*parts), ctx.path(*parts, "result.json")
    twin = None if name == "base_student" else sft_summary(ctx, name, seed).get("same_as")
    if twin is not None:  # trained on the same examples as twin's (sft): twin's student,
      path = fs.join(student_dir(ctx, twin, seed), "student")  # scored and exported here again
    res = ctx.read_marker(done)
    if res is None:
      res = evaluate_one(ctx, name if seed is None else f"{name}-seed{seed}", path, out_dir,
                         prompts, benchmarks)
      if twin is not None:
        res["same_as"] = twin
      ctx.write_json(res, *parts, "result.json")
    ctx.log(f"[eval] {name}{'' if seed is None else f' seed {seed}'}: "
            f"{res.get('score', float('nan')):.3f}" + (f" (the student of {twin})" if twin else ""))
    per_student.setdefault(name, {})[seed] = res
  out = {name: combine(by_seed) for name, by_seed in per_student.items()}
  ctx.write_json(out, "eval", "eval.json")
  return out


def sft_summary(ctx: Context, policy: str, seed: int | None) -> dict:
  """The sft stage's DONE.json of (`policy`, `seed`); a damaged one is an error naming it."""
  path = fs.join(student_dir(ctx, policy, seed), "DONE.json")
  summary = ctx.read_marker(path)
  if summary is None:
    raise ValueError(f"{path}: missing or unreadable, though the sft stage finished; rerun with "
                     "--redo sft: it trains again only the students without a readable DONE.json "
                     "(from their checkpoints)")
  return summary


def evaluate_one(ctx: Context, name: str, path: str, out_dir: str, prompts, benchmarks) -> dict:
  """One student's score on the held-out prompts ("correct": its per-prompt vector, in prompt
  order) and its answers to the benchmarks, exported under `out_dir`."""
  cfg, c = ctx.cfg, ctx.cfg.eval
  mesh = ctx.mesh_for(c.sampling.mesh)
  # student.dtype: each student is evaluated as it would be served.
  model, tok = ctx.load(ModelRef(name, path, dtype=cfg.student.dtype), mesh, rules=shd.SERVING)
  model_name = f"{cfg.name}-{name}"
  t0 = time.time()
  out: dict = {"n": 0}  # the report reads n (no held-out prompts: benchmarks only)
  if prompts:
    got = generations(model, tok, ev.prompts_for_model(prompts), c.sampling, mesh,
                      f"eval/{name}")
    scored = ev.score_generations(prompts, [r.text for r in got], verifier=c.verifier,
                                  reference_field=c.reference_field)
    for row, r in zip(scored["rows"], got):  # the answer's length (arena_hard's token_len)
      row["token_len"] = ev.token_len(r)
    if ctx.is_writer():
      ev.export(scored["rows"], model_name, out_dir, c.exports)
    out = {k: v for k, v in scored.items() if k != "rows"}  # with "correct", per prompt
  for bname, (b, items) in benchmarks.items():
    got = generations(model, tok, [x["prompt"] for x in items], c.sampling, mesh,
                      f"eval/{name}/{bname}")
    rows = [{**x, "response": r.text, "token_len": ev.token_len(r)} for x, r in zip(items, got)]
    paths = {}
    if ctx.is_writer():
      paths = ev.export(rows, model_name, fs.join(out_dir, "benchmarks", safe_name(bname)),
                        [b.format])
    out.setdefault("benchmarks", {})[bname] = {"n": len(rows), "format": b.format,
                                               "file": paths.get(b.format)}
  out["seconds"] = round(time.time() - t0, 2)
  del model
  return out


def combine(by_seed: dict) -> dict:
  """A policy's eval entry from its students' results by seed (None: the run lists no seeds): the
  score and by_kind averaged over seeds, and each seed's score and per-prompt correctness."""
  if list(by_seed) == [None]:
    return by_seed[None]
  res = list(by_seed.values())
  out = {"n": res[0]["n"], "seconds": round(sum(r["seconds"] for r in res), 2),
         "seeds": {f"seed{k}": r for k, r in by_seed.items()}}
  if "score" in res[0]:
    out["score"] = sum(r["score"] for r in res) / len(res)
    out["by_kind"] = {k: sum(r["by_kind"][k] for r in res) / len(res) for k in res[0]["by_kind"]}
  if "benchmarks" in res[0]:
    out["benchmarks"] = res[0]["benchmarks"]
  return out


# prompts: the held-out split; student: the student before SFT and the dtype of every student
STAGE = Stage("eval", run, reads=("sft",),
              config=("name", "prompts", "student", "compare", "eval", "seeds"), doc=__doc__)
