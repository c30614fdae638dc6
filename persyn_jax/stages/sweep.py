"""The alpha sweep (run config `sweep`): PerSyn's reward (Eq. 2) at each alpha, the rest fixed.

Each alpha is a run of its own under run_dir/sweep/alpha=<alpha>/, with scoring.alpha = alpha and
compare = sweep.policies, driven by the same runner (its stages' DONE keys, its resume). What
does not depend on alpha is not redone: the child starts with the parent's probe (linked) and
with a score stage whose quality and learnability are the parent's, only the reward recombined;
the runner then sees both as done and runs router, route, generate, sft and eval. The alpha of
the main run itself is not rerun: its row is the main run's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from persyn_jax import distributed as dist
from persyn_jax import fs
from persyn_jax.data import shards
from persyn_jax.io_utils import atomic_write_json
from persyn_jax.rewards import response_rewards
from persyn_jax.run_config import RunConfig, SweepConfig

if TYPE_CHECKING:
  from persyn_jax.stages.runner import Run


def child_dir(run_dir: str, alpha: float) -> str:
  return fs.join(run_dir, "sweep", f"alpha={alpha:g}")


def child_config(cfg: RunConfig, alpha: float) -> RunConfig:
  """The run of one alpha: the parent's config with scoring.alpha = alpha, only the swept
  policies, no base student (the parent evaluated it), no teacher study (its students learn from
  single teachers' probe answers, whatever alpha: the parent's study holds) and no sweep of its
  own."""
  return dataclasses.replace(
      cfg, run_dir=child_dir(cfg.out_dir, alpha), compare=cfg.sweep.policies,
      scoring=dataclasses.replace(cfg.scoring, alpha=alpha),
      eval=dataclasses.replace(cfg.eval, base_student=False),
      study=dataclasses.replace(cfg.study, enabled=False), sweep=SweepConfig())


def rescored(records: list[dict], alpha: float, normalizer: str) -> list[dict]:
  """Score records with their reward recombined at `alpha` from their own quality and
  learnability (per prompt across its responses, as the score stage does)."""
  nan = lambda v: np.nan if v is None else v  # noqa: E731
  reward = response_rewards([r["id"] for r in records],
                            [(r["teacher"], r.get("sample", 0)) for r in records],
                            [nan(r["scores"]["quality"]) for r in records],
                            [nan(r["scores"]["learnability"]) for r in records], alpha, normalizer)
  return [{**rec, "scores": {**rec["scores"], "reward": float(v) if np.isfinite(v) else None}}
          for rec, v in zip(records, reward)]


def seed_child(parent: "Run", child: "Run") -> None:
  """The child's probe (hard links to the parent's files) and score (the parent's scores with the
  reward recombined), each with the manifest the child's runner expects, unless already there."""
  from persyn_jax.stages.graph import stage_key
  from persyn_jax.stages.runner import FORMAT, GRAPH
  keys: dict[str, str] = {}
  for st in GRAPH[:2]:
    keys[st.name] = stage_key(st, child.cfg, keys)
  # process 0 decides and writes the shared files (all processes write their score shards)
  redo = dist.broadcast_json([(child.manifest(s) or {}).get("key") != keys[s]
                              for s in ("probe", "score")])
  if redo[0] and dist.is_writer():
    fs.makedirs(child.dir)
    fs.rmtree(child.path("probe"))
    fs.copytree(parent.path("probe"), child.path("probe"))
  dist.barrier("sweep:probe")
  if redo[1]:
    t0 = time.time()
    if dist.is_writer():
      fs.rmtree(child.path("score"))
    dist.barrier("sweep:score:clear")
    recs = rescored(parent.ctx.records("score"), child.cfg.scoring.alpha,
                    child.cfg.scoring.normalizer)
    counts = dict(parent.manifest("score")["counts"], reused_from=parent.path("score"))
    shards.write_stage_records(child.path("score"), "score", recs,
                               records_per_shard=child.cfg.records_per_shard,
                               extra={"stats": counts})
    if dist.is_writer():
      atomic_write_json(child.path("score", "DONE.json"), {
          "format": FORMAT, "stage": "score", "key": keys["score"], "counts": counts,
          "seconds": round(time.time() - t0, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    dist.barrier("sweep:score")


def run_sweep(parent: "Run") -> None:
  """Runs (or resumes) every alpha of the parent's sweep but the parent's own."""
  from persyn_jax.stages.runner import Run
  cfg = parent.cfg
  for alpha in cfg.sweep.alpha:
    if alpha == cfg.scoring.alpha:
      continue
    parent.log(f"[sweep] alpha={alpha:g}: {', '.join(cfg.sweep.policies)}")
    child = Run(child_config(cfg, alpha), log=lambda m, a=alpha: parent.log(f"[alpha={a:g}] {m}"))
    seed_child(parent, child)
    child.run()


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def summary(ctx, evals: dict, router: dict) -> dict | None:
  """The report's sweep: per alpha, each swept policy's accuracy with its interval and its paired
  difference from the main run's strong student, and the router's held-out numbers. `evals`,
  `router`: the main run's eval counts and router summary (its own alpha's row)."""
  from persyn_jax.report import stats
  from persyn_jax.report.assemble import correctness, router_summary
  cfg = ctx.cfg
  if not cfg.sweep.alpha:
    return None
  main = correctness(evals)
  rows = []
  for alpha in cfg.sweep.alpha:
    if alpha == cfg.scoring.alpha:
      ev, rt, done = evals, router, True
    else:
      d = child_dir(cfg.out_dir, alpha)
      m = _read(os.path.join(d, "eval", "DONE.json"))
      ev = (m or {}).get("counts", {})
      r = _read(os.path.join(d, "router", "router_eval.json"))
      rt, done = (router_summary(r) if r else {}), m is not None
    corr = correctness(ev)
    pols = [p for p in cfg.sweep.policies if p in corr]
    if not done or not pols:
      rows.append({"alpha": alpha, "done": False, "policies": {}, "router": rt})
      continue
    table = {p: np.asarray(corr[p], np.float64) for p in pols}
    if "strong" in main:
      table["strong"] = np.asarray(main["strong"], np.float64)
    st = stats.compare(table, baseline="strong", seed=cfg.seed)["policies"]
    rows.append({"alpha": alpha, "done": True, "main_run": alpha == cfg.scoring.alpha,
                 "policies": {p: st[p] for p in pols}, "router": rt})
  return {"rows": rows, "policies": list(cfg.sweep.policies)}
