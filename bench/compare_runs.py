"""Compares two run directories stage by stage: the records of every shard (provenance aside),
the policies' assignments, the router's report, the eval scores, the report's eval/shares/router
and every student's SFT losses. Prints what differs and ends with ALL EQUAL or DIFFERENCES.

    python bench/compare_runs.py runs/before runs/after

Used to hold a refactor to "the same run gives the same results" on one machine.
"""
from __future__ import annotations

import glob
import json
import os
import sys

from persyn_jax.data import shards


def stage_records(root: str, sub: str) -> dict[str, list[dict]]:
  """{shard stage name: its records, provenance left out (it names the run and config hash)}."""
  d = os.path.join(root, sub)
  out = {}
  for m in sorted(glob.glob(os.path.join(d, "*.manifest.json"))):
    stage = os.path.basename(m)[:-len(".manifest.json")]
    out[stage] = [{k: v for k, v in r.items() if k != "provenance"}
                  for r in shards.read_records(d, stage)]
  return out


def _json(root: str, path: str) -> dict:
  j = json.load(open(os.path.join(root, path)))
  drop = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731 (timings differ)
  if os.path.basename(path) == "eval.json":
    j = {k: drop(v) for k, v in j.items()}
  if path.endswith("router_eval.json"):
    j = drop(j)
    j["history"] = [drop(h) for h in j.get("history", [])]
  return j


def _losses(root: str, policy: str) -> list:
  rows = [json.loads(line) for line in open(os.path.join(root, "sft", policy, "metrics.jsonl"))]
  return [(r.get("step"), r.get("loss")) for r in rows if "loss" in r]


def compare(a: str, b: str) -> bool:
  ok = True
  subs = ["probe", "score", "route", "generate"] + [
      os.path.join("data", p) for p in sorted(os.listdir(os.path.join(a, "data")))]
  for sub in subs:
    ra, rb = stage_records(a, sub), stage_records(b, sub)
    if set(ra) != set(rb):
      print(f"{sub}: shard stages differ: {sorted(ra)} vs {sorted(rb)}")
      ok = False
      continue
    for st in ra:
      xa, xb = ra[st], rb[st]
      if xa == xb:
        print(f"{sub}/{st}: {len(xa)} records equal")
        continue
      ok = False
      diff = [(p, q) for p, q in zip(xa, xb) if p != q]
      keys = sorted(k for k in set(diff[0][0]) | set(diff[0][1])
                    if diff[0][0].get(k) != diff[0][1].get(k)) if diff else []
      print(f"{sub}/{st}: {len(xa)} vs {len(xb)} records, {len(diff)} differ (first in {keys})")
  for path in ("route/assignments.json", "eval/eval.json", "router/router_eval.json"):
    same = _json(a, path) == _json(b, path)
    print(path, "equal" if same else "DIFFER")
    ok &= same
  ja, jb = (json.load(open(os.path.join(r, "report", "report.json"))) for r in (a, b))
  for k in ("eval", "shares", "router"):
    print("report", k, "equal" if ja[k] == jb[k] else f"DIFFER\n  {ja[k]}\n  {jb[k]}")
    ok &= ja[k] == jb[k]
  for policy in ja["policies"]:
    same = _losses(a, policy) == _losses(b, policy)
    print("sft", policy, "losses equal" if same else "losses DIFFER")
    ok &= same
  print("ALL EQUAL" if ok else "DIFFERENCES")
  return ok


if __name__ == "__main__":
  sys.exit(0 if compare(sys.argv[1], sys.argv[2]) else 1)
