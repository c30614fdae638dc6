"""study: the teacher study, ground truth for the reward (optional: `study.enabled`).

The student is fine-tuned on each teacher's probe answers alone (the probe already holds every
teacher's answer to every probe prompt: nothing is generated) and evaluated on held-out prompts;
its accuracy gain over the student before SFT, per prompt category (`study.category_field`, the
toy world's `kind`), is what that teacher actually teaches. The rewards are then checked against
it: per category, does the teacher with the best mean reward equal the teacher with the best
measured gain, and how do the two rank the teachers (Spearman)? For quality alone, learnability
alone and the combined reward (scoring.alpha), so a user sees which signal predicts the gains
before committing to an α and a full run (docs/STUDY.md).
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Mapping, Sequence

import numpy as np

from persyn_jax import distributed as dist
from persyn_jax import evaluate as ev
from persyn_jax import fs
from persyn_jax import policies as pol
from persyn_jax import sharding as shd
from persyn_jax import sft
from persyn_jax.data import shards
from persyn_jax.data.batches import epoch_batches
from persyn_jax.io_utils import safe_name
from persyn_jax.run_config import ModelRef
from persyn_jax.stages.context import Context
from persyn_jax.stages.eval import answers
from persyn_jax.stages.generate import kept_samples
from persyn_jax.stages.graph import Stage

ALL = "all"  # the one category when study.category_field is empty or prompts lack it


# ---- the analysis (pure: tests/test_study.py checks it on made-up numbers) ----------------------

def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (average ranks for ties); NaN when either side is constant or
  has fewer than two finite pairs."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  rx, ry = _ranks(x), _ranks(y)
  return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
  order = np.argsort(v, kind="stable")
  r = np.empty(len(v))
  r[order] = np.arange(len(v), dtype=np.float64)
  for u in np.unique(v):  # ties share their mean rank
    r[v == u] = r[v == u].mean()
  return r


def best_set(values: Mapping[str, float]) -> list[str]:
  """The teachers sharing the highest finite value (all of them when they tie, by the policies'
  rule: within TIE_TOL relative to the values' size, at least absolute)."""
  finite = {t: v for t, v in values.items() if v is not None and np.isfinite(v)}
  if not finite:
    return []
  top = max(finite.values())
  return sorted(t for t, v in finite.items() if pol.within_tie(v, top))


def agreement(signal: Mapping[str, float], gain: Mapping[str, float]) -> float:
  """The chance that the signal's best teacher is the best by measured gain, ties on either
  side broken at random: |S ∩ G| / (|S| |G|) for the two best sets. NaN with no finite value."""
  s, g = best_set(signal), best_set(gain)
  if not s or not g:
    return float("nan")
  return len(set(s) & set(g)) / (len(s) * len(g))


def compare_signal(means: Mapping[str, Mapping[str, float]],
                   gains: Mapping[str, Mapping[str, float]], categories: Sequence[str]) -> dict:
  """A signal's {teacher: {category: mean}} against the measured {teacher: {category: gain}}:
  per category its best teachers, agreement and rank correlation, and their means."""
  teachers = list(gains)
  per = {}
  for c in categories:
    sig = {t: means[t].get(c, float("nan")) for t in teachers}
    gn = {t: gains[t].get(c, float("nan")) for t in teachers}
    per[c] = {"best": best_set(sig), "agreement": agreement(sig, gn),
              "rank_correlation": spearman([sig[t] for t in teachers], [gn[t] for t in teachers])}
  return {"by_category": per, "agreement": _nanmean([v["agreement"] for v in per.values()]),
          "rank_correlation": _nanmean([v["rank_correlation"] for v in per.values()])}


def category_means(matrix: np.ndarray, ids: Sequence[str], teachers: Sequence[str],
                   category: Mapping[str, str]) -> dict[str, dict[str, float]]:
  """{teacher: {category: mean over that category's prompts}} of a [prompts, teachers] matrix."""
  cats = np.asarray([category.get(i, ALL) for i in ids])
  out: dict[str, dict[str, float]] = {t: {} for t in teachers}
  for c in sorted(set(cats.tolist())):
    rows = matrix[cats == c]
    for j, t in enumerate(teachers):
      out[t][c] = _nanmean(rows[:, j])
  return out


def _nanmean(v) -> float:
  v = np.asarray(v, np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if len(v) else float("nan")


def by_category(rows: Sequence[Mapping], category: Mapping[str, str]) -> dict[str, float]:
  """{category: accuracy} of scored eval rows (`id`, `correct`), plus ALL over every row."""
  groups: dict[str, list[float]] = {}
  for r in rows:
    groups.setdefault(category.get(r["id"], ALL), []).append(r["correct"])
  out = {c: float(np.mean(v)) for c, v in sorted(groups.items())}
  out[ALL] = float(np.mean([r["correct"] for r in rows])) if rows else float("nan")
  return out


# ---- the stage ----------------------------------------------------------------------------------

def _categories(items: Sequence[Mapping], field: str) -> dict[str, str]:
  return {x["id"]: str(x[field]) for x in items if field and x.get(field) is not None}


def _evaluate(ctx: Context, path: str, name: str, held: list[dict]) -> list[dict]:
  cfg = ctx.cfg
  mesh = ctx.mesh_for(cfg.eval.sampling.mesh)
  model, tok = ctx.load(ModelRef(name, path, dtype=cfg.student.dtype), mesh, rules=shd.SERVING)
  texts = answers(model, tok, ev.prompts_for_model(held), cfg.eval.sampling, mesh, f"study/{name}")
  del model
  return ev.score_generations(held, texts, verifier=cfg.eval.verifier,
                              reference_field=cfg.eval.reference_field)["rows"]


def _train(ctx: Context, teacher: str, records: list[dict]) -> str:
  """The student fine-tuned (sft config) on `records`; returns its exported directory."""
  cfg = ctx.cfg
  c = cfg.sft if not cfg.study.epochs else dataclasses.replace(cfg.sft, epochs=cfg.study.epochs)
  d = ctx.path("study", "sft", safe_name(teacher))
  data = ctx.path("study", "data", safe_name(teacher))
  shards.write_stage_records(data, "data", records, records_per_shard=cfg.records_per_shard)
  mesh = ctx.mesh_for(c.mesh)
  model, tok = ctx.load(dataclasses.replace(cfg.student, dtype=c.param_dtype), mesh)
  batches, per_epoch = epoch_batches(data, tok, c)
  ctx.log(f"[study] {teacher}: {len(records)} probe answers, {per_epoch} batches per epoch")
  # gs://: checkpoints in the run dir, the rest in a local working dir uploaded when trained
  work = fs.work_dir(d)
  res = sft.train(model, tok, batches, c, out_dir=work, mesh=mesh, num_batches=per_epoch,
                  run_name=f"{cfg.name}-study-{teacher}",
                  checkpoint_dir=None if work == d else fs.join(d, "checkpoints"))
  del model
  gc.collect()
  if work == d:
    return res.export_dir
  if ctx.is_writer():
    fs.put(work, d)
  dist.barrier(f"study:{teacher}:uploaded")
  return fs.join(d, res.export_dir[len(work):].lstrip("/"))


def run(ctx: Context) -> dict:
  cfg, c = ctx.cfg, ctx.cfg.study
  if not c.enabled:
    return {"enabled": False}
  if cfg.eval.verifier is None:
    raise ValueError("study.enabled needs eval.verifier: the gains are measured accuracies")
  unknown = [t for t in c.teachers if t not in ctx.teachers]
  if unknown:
    raise ValueError(f"study.teachers: {unknown} are not teachers of the run ({ctx.teachers})")
  teachers = list(c.teachers) or list(ctx.teachers)
  p = ctx.prompts()
  held = p["eval"][: c.eval] if c.eval else p["eval"]
  if not held:
    raise ValueError("study.enabled needs held-out prompts (prompts.eval > 0)")
  category = _categories(p["probe"] + held, c.category_field)
  done_path = ctx.path("study", "students.json")
  acc = ctx.read_marker(done_path) or {}
  if "base_student" not in acc:
    acc["base_student"] = by_category(_evaluate(ctx, cfg.student.path, "base_student", held),
                                      category)
    ctx.write_json(acc, "study", "students.json")
  # with several samples per (prompt, teacher), the best-reward one, as a dataset would keep it
  # (ties by the run's seed: not policies.seed, so that tuning a policy never reruns the study)
  responses, _ = kept_samples(ctx.records("score"), cfg.sampling.num_samples, cfg.seed, ctx.log)
  probe_order = [x["id"] for x in p["probe"]]
  examples = {}
  for t in teachers:
    recs = [responses[(i, t)] for i in probe_order if (i, t) in responses]
    examples[t] = len(recs)
    if t in acc:
      ctx.log(f"[study] {t}: done earlier")
      continue
    if not recs:
      raise ValueError(f"study: teacher {t!r} has no probe answers to train on")
    acc[t] = by_category(_evaluate(ctx, _train(ctx, t, recs), f"study-{t}", held), category)
    ctx.write_json(acc, "study", "students.json")  # a stopped study resumes from here
    ctx.log(f"[study] {t}: accuracy {acc[t][ALL]:.3f} (base {acc['base_student'][ALL]:.3f})")
  cats = sorted(k for k in acc["base_student"] if k != ALL) or [ALL]
  gains = {t: {k: acc[t][k] - acc["base_student"][k] for k in [*cats, ALL] if k in acc[t]}
           for t in teachers}
  out = {"teachers": teachers, "categories": cats, "category_field": c.category_field,
         "eval_prompts": len(held),
         "eval_per_category": {k: sum(category.get(x["id"], ALL) == k for x in held) for k in cats},
         "probe_examples": examples, "accuracy": acc, "gain": gains,
         "best_by_gain": {k: best_set({t: gains[t][k] for t in teachers}) for k in cats},
         "signals": signals(ctx, teachers, category, gains, cats)}
  ctx.write_json(out, "study", "study.json")
  if ctx.is_writer():
    from persyn_jax.report.study import plot_gains
    plot_gains(out, ctx.path("study", "gain.png"))
  return {"enabled": True, "teachers": len(teachers), "eval_prompts": len(held),
          "agreement": {s: v["agreement"] for s, v in out["signals"].items()}}


def signal_matrix(records: Sequence[Mapping], teachers: Sequence[str], alpha: float,
                  normalizer: str) -> tuple[list, np.ndarray]:
  """(prompt ids, [prompts, teachers] matrix) of score records' reward recombined at `alpha`:
  normalized per response across every teacher's samples of a prompt, as the score stage does,
  then each teacher's samples averaged (the policies' table), the `teachers` kept."""
  from persyn_jax.scoring import reward_matrix
  from persyn_jax.stages.sweep import rescored
  scored = [r for r in rescored(list(records), alpha, normalizer) if r["teacher"] in teachers]
  ids, _, matrix = reward_matrix(scored, teachers, "reward")
  return ids, matrix


def signals(ctx: Context, teachers: Sequence[str], category: Mapping[str, str],
            gains: Mapping[str, Mapping[str, float]], cats: Sequence[str]) -> dict:
  """Quality alone, learnability alone and the combined reward (α = scoring.alpha), each
  normalized per prompt across all teachers as the score stage does, compared with the measured
  gains."""
  sc = ctx.cfg.scoring
  records = ctx.records("score")
  out = {}
  for name, alpha in (("quality", 0.0), ("learnability", 1.0), ("combined", sc.alpha)):
    ids, r = signal_matrix(records, teachers, alpha, sc.normalizer)
    means = category_means(r, ids, teachers, category)
    out[name] = {"alpha": alpha, "mean": means, **compare_signal(means, gains, cats)}
  return out


# probe, score: every teacher's probe answers and their scores; sft: how each student is trained;
# eval: how it is evaluated; prompts: the held-out split and the categories
STAGE = Stage("study", run, reads=("probe", "score"),
              config=("student", "teachers", "prompts", "sampling", "scoring", "sft", "eval",
                      "study", "records_per_shard", "name", "seed"), doc=__doc__)
