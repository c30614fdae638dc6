"""Checks the accelerator targets against the JSON that bench/accelerator.sh wrote.

    python bench/accelerator_summary.py <dir> [--dry]

Writes <dir>/summary.json and prints one line per target: its value, the goal, and whether it
was met; a target whose run failed or was skipped is marked "not measured", never guessed.
With --dry (CPU, tiny presets) the values are plumbing only and no target is judged.
"""
from __future__ import annotations

import argparse
import json
import os

import common as C  # bench/common.py (this directory is on sys.path when run as a script)

# (name, file, how to read the value, goal, what it measures)
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
]


def summarize(out_dir: str, dry: bool) -> dict:
  rows = []
  for name, fname, read, goal, what in TARGETS:
    path = os.path.join(out_dir, fname)
    row = {"target": name, "what": what, "goal": goal, "file": fname}
    try:
      with open(path) as f:
        d = json.load(f)
      value = read(d)
      row["load"] = d.get("load")
    except (OSError, KeyError, IndexError, ValueError) as e:
      value, row["error"] = None, f"{type(e).__name__}: {e}"
    row["value"] = value
    row["measured"] = value is not None
    row["met"] = None if (dry or value is None) else bool(value >= goal)
    rows.append(row)
  return {"dir": os.path.abspath(out_dir), "dry": dry, "targets": rows}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("dir")
  ap.add_argument("--dry", action="store_true")
  args = ap.parse_args(argv)
  s = summarize(args.dir, args.dry)
  for r in s["targets"]:
    val = "not measured" if not r["measured"] else f"{r['value']:.3g}"
    verdict = {True: "met", False: "NOT met", None: "not judged"}[r["met"]]
    print(f"{r['target']:28s} {val:>14s}  goal >= {r['goal']:<5} {verdict:10s} {r['what']}")
  C.write_json(os.path.join(args.dir, "summary.json"), s)
  return s


if __name__ == "__main__":
  main()
