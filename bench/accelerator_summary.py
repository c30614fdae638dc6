"""Checks the accelerator targets against the JSON that bench/accelerator.sh wrote.

    python bench/accelerator_summary.py <dir> [--dry] [--since ISO-8601]

Writes <dir>/summary.json and prints one line per target: its value, the goal, and whether it
was met; a target whose run failed or was skipped is marked "not measured", never guessed (nor
read from a JSON that an earlier run left in the directory: --since).
With --dry (CPU, tiny presets) the values are plumbing only and those targets are not judged;
the continuous-batching targets (bench/continuous.py, the same small model in either mode) are
judged in both.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import common as C  # bench/common.py (this directory is on sys.path when run as a script)

# (name, file, how to read the value, goal, what it measures); goals are "at least" unless the
# name is in AT_MOST; JUDGED_DRY: judged in a --dry run too (their figures do not hang on presets)
AT_MOST = {"decode_cost_growth_16x_cache"}
JUDGED_DRY = {"continuous_useful_fraction", "decode_cost_growth_16x_cache"}
TARGETS = [
    ("decode_roofline_frac", "sampler_greedy.json",
     lambda d: d["rows"][0].get("decode_roofline_frac_measured"), 0.60,
     "greedy decode at batch 64 / HBM roofline (measured copy bandwidth)"),
    ("decode_vs_generate", "sampler_greedy.json",
     lambda d: d["rows"][0].get("ratio_decode_tok_s"), 3.0,
     "greedy decode tok/s / transformers generate (static cache), batch 64"),
    ("paper_sampling_vs_generate", "sampler_paper_eos.json",
     lambda d: d["rows"][0].get("ratio_e2e_tok_s"), 3.0,
     "top-p with stop tokens, useful tok/s end to end / transformers generate, batch 64"),
    ("sft_mfu", "sft.json", lambda d: d["jax"].get("mfu"), 0.40, "SFT 4x2048 step MFU"),
    ("sft_vs_torch", "sft.json", lambda d: d.get("jax_over_torch_tokens_per_s"), 1.25,
     "SFT tokens/s / torch step (autocast bf16, fused AdamW)"),
    ("scoring_mfu", "scoring.json", lambda d: d["results"]["jax"].get("mfu"), 0.50,
     "learnability scoring MFU"),
    ("continuous_useful_fraction", "continuous.json",
     lambda d: d["useful_fraction"]["continuous"], 0.90,
     "continuous batching: response tokens / slot-steps on a heavy-tailed workload"),
    ("decode_cost_growth_16x_cache", "continuous.json",
     lambda d: d["per_token_growth_max_over_min"], 1.25,
     "decode seconds per token, cache allocated 1x/4x/16x: largest over smallest (flat)"),
]


def summarize(out_dir: str, dry: bool, since: str | None = None) -> dict:
  """since: when the run started (ISO 8601); a step's JSON dated before it is left from an
  earlier run into the same directory (this run's step failed before writing): not measured."""
  rows = []
  start = datetime.datetime.fromisoformat(since) if since else None
  for name, fname, read, goal, what in TARGETS:
    path = os.path.join(out_dir, fname)
    at_most = name in AT_MOST
    row = {"target": name, "what": what, "goal": goal, "at_most": at_most, "file": fname}
    try:
      with open(path) as f:
        d = json.load(f)
      if start and datetime.datetime.fromisoformat(d["date"]) < start:
        raise ValueError(f"{path} is dated {d['date']}, before this run ({since}): stale")
      value = read(d)
      row["load"] = d.get("load")
    except (OSError, KeyError, IndexError, ValueError) as e:
      value, row["error"] = None, f"{type(e).__name__}: {e}"
    row["value"] = value
    row["measured"] = value is not None
    judged = value is not None and (not dry or name in JUDGED_DRY)
    row["met"] = None if not judged else bool(value <= goal if at_most else value >= goal)
    rows.append(row)
  return {"dir": os.path.abspath(out_dir), "dry": dry, "targets": rows}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("dir")
  ap.add_argument("--dry", action="store_true")
  ap.add_argument("--since", default=None,
                  help="ISO 8601 start of the run: step JSON dated before it is stale")
  args = ap.parse_args(argv)
  s = summarize(args.dir, args.dry, args.since)
  for r in s["targets"]:
    val = "not measured" if not r["measured"] else f"{r['value']:.3g}"
    verdict = {True: "met", False: "NOT met", None: "not judged"}[r["met"]]
    sign = "<=" if r["at_most"] else ">="
    print(f"{r['target']:28s} {val:>14s}  goal {sign} {r['goal']:<5} {verdict:10s} {r['what']}")
  C.write_json(os.path.join(args.dir, "summary.json"), s)
  return s


if __name__ == "__main__":
  main()
