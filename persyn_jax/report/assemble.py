"""The report dict of a finished run: eval per student, teacher shares per policy, the probe's
teachers, costs (generations and teacher seconds per policy), the router's held-out accuracy and
a summary sentence. Reads the run directory through a stages.Context."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

from persyn_jax import policies as pol
from persyn_jax.io_utils import safe_name
from persyn_jax.run_config import STAGES

if TYPE_CHECKING:
  from persyn_jax.stages.context import Context


def assemble(ctx: "Context", m: dict[str, dict]) -> tuple[dict, dict[str, list[tuple[int, float]]]]:
  """(the report, the SFT loss curve of each policy) from the stages' manifests `m`."""
  cfg, teachers = ctx.cfg, ctx.teachers
  table = ctx.score_table()
  # the seed the policies used: the report's oracle-best teachers are those persyn kept
  best = table.best(cfg.policies.seed)
  with open(ctx.path("route", "assignments.json")) as f:
    assignments = json.load(f)
  oracle_path = ctx.path("generate", "oracle_assignment.json")
  if os.path.exists(oracle_path):
    assignments["oracle"] = json.load(open(oracle_path))
  shares = {p: pol.shares(assignments[p], teachers) for p in cfg.compare}
  shares["oracle best (probe)"] = pol.shares(best, teachers)
  mq, ml = table.mean_quality(), table.mean_nll()
  fam = {t.name: t.family for t in cfg.teachers}
  probe_teachers = {t: {"family": fam[t], "mean_quality": mq[t], "mean_learnability": -ml[t],
                        "oracle_share": shares["oracle best (probe)"][t]} for t in teachers}
  kinds = {x["id"]: x.get("kind") for x in ctx.prompts()["probe"]}
  by_kind: dict[str, dict[str, float]] = {}
  if any(kinds.values()):
    for k in sorted({v for v in kinds.values() if v}):
      ids = [i for i in best if kinds.get(i) == k]
      by_kind[k] = pol.shares({i: best[i] for i in ids}, teachers)
  P = m["probe"]["counts"]["prompts"]
  N = len(ctx.prompts()["train"])
  costs = run_costs(teachers, cfg.compare, assignments, set(best), N,
                    m["probe"]["counts"], m["generate"]["counts"])
  evals = m["eval"]["counts"]
  metric = "accuracy" if cfg.eval.verifier else "n"
  eval_table = {p: {"score": evals[p].get("score", float("nan")), "n": evals[p]["n"],
                    "by_kind": evals[p].get("by_kind", {})} for p in evals}
  with open(ctx.path("router", "router_eval.json")) as f:
    router = router_summary(json.load(f))
  # one loss curve per policy: its first seed's
  first = [] if not cfg.seeds else [f"seed{cfg.seeds[0]}"]
  curves = {p: loss_curve(ctx.path("sft", safe_name(p), *first, "metrics.jsonl"))
            for p in cfg.compare}
  oracle = m["generate"]["counts"].get("oracle", {})
  # prompts whose top reward several teachers share, broken by the seeded hash (policies.py)
  ties = {"probe": {"ties": table.ties, "prompts": len(table.ids)},
          "oracle": ({"ties": oracle["ties"], "prompts": oracle["prompts"]} if oracle else None),
          "seed": cfg.policies.seed}
  report = {"run": cfg.name, "run_dir": ctx.dir, "teachers": teachers,
            "student": cfg.student.name, "policies": list(cfg.compare),
            "eval_metric": metric, "eval": eval_table, "router": router,
            "stats": eval_stats(evals, ctx.prompts()["eval"], cfg.seed),
            "shares": shares, "probe": {"prompts": P, "teachers": probe_teachers,
                                        "by_kind": by_kind},
            "ties": ties, "samples": m["generate"]["counts"].get("samples"),
            "costs": costs, "prompts": {"train": N, "probe": P,
                                        "eval": len(ctx.prompts()["eval"])},
            "stage_seconds": {s: m[s]["seconds"] for s in STAGES}}
  from persyn_jax.stages.sweep import summary as sweep_summary
  report["sweep"] = sweep_summary(ctx, evals, router)
  from persyn_jax.report.study import load_study
  report["study"] = load_study(ctx.dir)
  report["summary"] = summarize(report)
  return report, curves


def correctness(evals: dict) -> dict[str, list[list[int]]]:
  """Each student's per-prompt correctness by seed (eval.json): name -> [seed][prompt]."""
  out = {}
  for name, e in evals.items():
    rows = [e["correct"]] if "correct" in e else [s["correct"] for s in e.get("seeds", {}).values()
                                                  if "correct" in s]
    if rows:
      out[name] = rows
  return out


def eval_stats(evals: dict, prompts: list[dict], seed: int) -> dict | None:
  """The paired bootstrap of every student against strong (report/stats.py), overall and per
  prompt kind; None when the eval has no verifier (no per-prompt correctness)."""
  from persyn_jax.report import stats
  correct = correctness(evals)
  if not correct or not prompts:
    return None
  kinds = [p.get("kind") for p in prompts]
  return stats.compare({n: np.asarray(c, np.float64) for n, c in correct.items()},
                       baseline="strong", seed=seed,
                       kinds=kinds if all(isinstance(k, str) for k in kinds) else None)


def run_costs(teachers: list[str], compare, assignments: dict[str, dict[str, str]],
              probe_ids: set[str], N: int, probe_c: dict, gen_c: dict) -> dict:
  """Generations and teacher seconds: per teacher (probe + generate, measured), Route then
  Generate vs Generate then Select, and per policy."""
  teachers_cost = {}
  for t in teachers:
    a, b = probe_c["teachers"].get(t, {}), gen_c["teachers"].get(t, {})
    teachers_cost[t] = {k: a.get(k, 0) + b.get(k, 0) for k in ("generations", "tokens", "seconds")}
  k, P = len(teachers), probe_c["prompts"]
  # measured seconds per generation of each teacher (probe and generate stages together)
  tsec = {t: c["seconds"] / max(1, c["generations"]) for t, c in teachers_cost.items()}
  probe_secs = sum(probe_c["teachers"][t]["seconds"] for t in teachers)
  costs = {"teachers": teachers_cost, "probe_generations": k * P, "routed_generations": N - P,
           "route_then_generate": {"generations": k * P + (N - P)},
           "generate_then_select": {"generations": k * N,
                                    "teacher_seconds_estimate": round(sum(tsec.values()) * N, 1)},
           "policies": {}}
  for p in compare:
    a = assignments[p]
    if p == "oracle":  # Generate then Select on the full set
      gens, secs = k * N, sum(tsec.values()) * N
    else:  # the probe (needed to score, route, or pick the teacher), then one answer per prompt
      rest = [i for i in a if i not in probe_ids]
      gens, secs = k * P + len(rest), probe_secs + sum(tsec[a[i]] for i in rest)
    costs["policies"][p] = {"prompts": len(a), "generations": gens, "teacher_seconds": round(secs, 2)}
  return costs


def router_summary(router_eval: dict) -> dict:
  """The router's held-out numbers (router/router_eval.json) that the report shows."""
  held = router_eval.get("held_out", {})
  out = {k: held[k] for k in ("hit@1", "hit@3", "pairwise_accuracy", "random_hit@1") if k in held}
  out.update(held_out_prompts=router_eval.get("held_out_prompts"),
             pairs=router_eval.get("pairs", {}).get("pairs"),
             ties_dropped=router_eval.get("pairs", {}).get("ties"))
  return out


def loss_curve(path: str) -> list[tuple[int, float]]:
  """(step, train loss) of an SFT metrics.jsonl; unreadable lines (a killed writer's) skipped."""
  pts = []
  if os.path.exists(path):
    for line in open(path):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "loss" in row and "step" in row and row.get("split", "train") == "train":
        loss = row["loss"]  # null: a step whose loss was not finite
        pts.append((int(row["step"]), float("nan") if loss is None else float(loss)))
  return pts


def summarize(report: dict) -> str:
  """Plain words on what the run showed: who won, and whether the oracle needs several teachers."""
  ev_ = {p: e["score"] for p, e in report["eval"].items() if p != "base_student"}
  if not ev_:
    return ""
  best = max(ev_, key=ev_.get)
  oracle_shares = report["shares"]["oracle best (probe)"]
  top_t = max(oracle_shares, key=oracle_shares.get)
  lines = [f"Best student: **{best}** ({report['eval_metric']} {ev_[best]:.3f}); "
           + ", ".join(f"{p} {v:.3f}" for p, v in sorted(ev_.items(), key=lambda x: -x[1]) if p != best)
           + (f"; the student before SFT: {report['eval']['base_student']['score']:.3f}."
              if "base_student" in report["eval"] else ".")]
  lines.append(f"The oracle's per-prompt best teacher is {top_t} for {oracle_shares[top_t]:.0%} of "
               f"probe prompts; " + ("no single teacher is best everywhere." if oracle_shares[top_t] < 0.9
                                     else "one teacher is best almost everywhere."))
  if "persyn" in ev_ and "strong" in ev_:
    d = ev_["persyn"] - ev_["strong"]
    st = ((report.get("stats") or {}).get("policies") or {}).get("persyn", {})
    if "delta_ci" in st:
      lo, hi = st["delta_ci"]
      lines.append(f"PerSyn vs the strongest teacher: {d:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}: "
                   + ("significant)." if st["significant"] else "not significant)."))
    else:
      lines.append(f"PerSyn vs the strongest teacher: {d:+.3f}.")
  r = report.get("router", {})
  if r.get("hit@1") is not None:  # null in router_eval.json: no held-out prompt to route
    rand = r.get("random_hit@1")
    lines.append(f"Router Hit@1 {r['hit@1']:.2f} (random "
                 f"{'n/a' if rand is None else f'{rand:.2f}'}).")
  return " ".join(lines)
