"""Writes the default run's results into README.md from docs/toy_run/report.json, and the CPU
speed table from bench/results/ (one column per machine: SPEED_SETS).

    python docs/make_readme_results.py            # rewrite both blocks in README.md
    python docs/make_readme_results.py --check    # exit 1 if a block is out of date

The results block sits between `<!-- results:begin -->` and `<!-- results:end -->`. Every number
in it comes from the committed report, so a new default run (copy its runs/toy/report/ files into
docs/toy_run/, then run this script) updates the README without a number copied by hand. The
speed table sits between `<!-- speed:begin -->` and `<!-- speed:end -->`, every ratio read from
the committed benchmark results. tests/test_docs.py checks that both blocks equal what this script
makes of those files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
REPORT = os.path.join(ROOT, "docs", "toy_run", "report.json")
STUDY = os.path.join(ROOT, "docs", "toy_study", "report.json")  # configs/toy_study.yaml's run
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# the CPU speed table, from the committed benchmark results
BENCH = os.path.join(ROOT, "bench", "results")
SPEED = ("<!-- speed:begin -->", "<!-- speed:end -->")
NAMES = {"base_student": "student before SFT", "oracle": "oracle (the reward's best)"}


def _shares(shares: dict[str, float]) -> str:
  """The teachers a policy used, largest share first (shares under 0.5% left out)."""
  used = sorted(((v, t) for t, v in shares.items() if v >= 0.005), key=lambda x: (-x[0], x[1]))
  return ", ".join(f"{t} {v:.0%}" for v, t in used)


def _ci(ci) -> str:
  return f"{ci[0]:.3f} to {ci[1]:.3f}"


def render(report: dict) -> str:
  """The block's Markdown (without the markers). A report with intervals (its `stats`) gets them,
  the paired difference from strong and its significance; an older report, its plain table."""
  metric = report["eval_metric"]
  ev = report["eval"]
  best = max((p for p in ev if p != "base_student"), key=lambda p: ev[p]["score"])
  n = {e["n"] for e in ev.values()}
  n_text = f"{n.pop()} held-out prompts" if len(n) == 1 else "held-out prompts"
  costs = report["costs"]
  st = (report.get("stats") or {}).get("policies", {})
  lines = [report["summary"], ""] if report.get("summary") else []
  if st:
    seeds = max(t["seeds"] for t in st.values())
    seeds_text = "one SFT seed" if seeds == 1 else f"mean of {seeds} SFT seeds"
    lines += [f"| policy | {metric} ({n_text}, {seeds_text}) | 95% CI | "
              "Δ vs strong (95% CI) | significant? | teachers of its training data | generations "
              "| teacher seconds |", "|" + " --- |" * 8]
  else:
    lines += [f"| policy | {metric} ({n_text}) | teachers of its training data | generations | "
              "teacher seconds |", "| --- | --- | --- | --- | --- |"]
  for p, e in ev.items():
    score = f"{e['score']:.3f}"
    if p == best:
      score = f"**{score}**"
    c = costs["policies"].get(p, {})
    tail = (f"{_shares(report['shares'].get(p, {}))} | {c.get('generations', '')} | "
            f"{c.get('teacher_seconds', '')} |")
    if not st:
      lines.append(f"| {NAMES.get(p, p)} | {score} | {tail}")
      continue
    t = st.get(p, {})
    delta = f"{t['delta']:+.3f} ({t['delta_ci'][0]:+.3f} to {t['delta_ci'][1]:+.3f})" if "delta" in t else ""
    sig = ("yes" if t["significant"] else "no") if "significant" in t else ""
    lines.append(f"| {NAMES.get(p, p)} | {score} | {_ci(t['ci']) if 'ci' in t else ''} | {delta} | "
                 f"{sig} | {tail}")
  if st:
    s = report["stats"]
    lines += ["", f"Intervals: bootstrap over the {s['problems']} held-out problems "
              f"({s['resamples']} resamples); Δ paired against strong on the same resamples; "
              "significant when its interval excludes 0. The oracle (Generate then Select, "
              f"{costs['policies'].get('oracle', {}).get('generations', 'k·N')} generations) keeps "
              "the reward's best response per prompt: the most a router of this reward can "
              "reach, and a test of the reward itself (it is not a bound on accuracy)."]
  r = report.get("router", {})
  lines.append("")
  if r:
    lines.append(f"- Router on {r['held_out_prompts']} held-out probe prompts: Hit@1 {r['hit@1']:.2f} "
                 f"(a random router: {r['random_hit@1']:.2f}), Hit@3 {r['hit@3']:.2f}, pairwise "
                 f"accuracy {r['pairwise_accuracy']:.2f}.")
  lines.append(f"- Route then Generate needed {costs['route_then_generate']['generations']} "
               f"generations (probe {costs['probe_generations']} + routed "
               f"{costs['routed_generations']}); Generate then Select would need "
               f"{costs['generate_then_select']['generations']}.")
  oracle = report["shares"].get("oracle best (probe)")
  if oracle:
    lines.append(f"- Oracle-best teacher per probe prompt: {_shares(oracle)}.")
  for r in (report.get("sweep") or {}).get("rows", []):
    if r.get("done"):
      lines.append(f"- alpha = {r['alpha']:g}" + (" (the run's own)" if r.get("main_run") else "")
                   + ": " + ", ".join(f"{p} {t['accuracy']:.3f} ({_ci(t['ci'])})"
                                      for p, t in r["policies"].items())
                   + (f"; router Hit@1 {r['router']['hit@1']:.2f}" if "hit@1" in r["router"] else "")
                   + ".")
  secs = report.get("stage_seconds")
  if secs:
    lines.append("- Stage seconds on the machine that made this report: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in secs.items() if v >= 0.5) + ".")
  return "\n".join(lines)


def render_study(report: dict | None) -> str:
  """What the committed study run says about the reward: per kind, the teacher whose probe
  answers taught the student most (measured), the teacher each signal prefers, and how often they
  agree; the alpha sweep's PerSyn accuracies. "" without a study report."""
  study = (report or {}).get("study")
  if not study:
    return ""
  sig = study["signals"]
  kinds = study["categories"]
  lines = ["", "The teacher study ([docs/toy_study/report.md](docs/toy_study/report.md), "
           "`configs/toy_study.yaml`): the student fine-tuned on each teacher's probe answers "
           "alone, then evaluated; the teacher that taught it most per kind, against the teacher "
           "each signal ranks first on the probe set:", "",
           "| kind | best by measured gain | quality only | learnability only | "
           f"combined (α = {sig['combined']['alpha']:g}) |", "| --- | --- | --- | --- | --- |"]
  for k in kinds:
    lines.append(f"| {k} | {', '.join(study['best_by_gain'][k])} | " + " | ".join(
        ", ".join(sig[n]["by_category"][k]["best"]) for n in ("quality", "learnability", "combined"))
        + " |")
  lines.append("| agreement (mean ρ) | | " + " | ".join(
      f"{sig[n]['agreement']:.2f} ({sig[n]['rank_correlation']:+.2f})"
      for n in ("quality", "learnability", "combined")) + " |")
  rows = [r for r in (report.get("sweep") or {}).get("rows", []) if r.get("done")]
  if rows:
    lines += ["", "Its alpha sweep (PerSyn's accuracy, mean of its seeds, 95% CI): " + "; ".join(
        f"α = {r['alpha']:g}: " + ", ".join(f"{t['accuracy']:.3f} ({_ci(t['ci'])})"
                                           for t in r["policies"].values()) for r in rows) + "."]
  return "\n".join(lines)


def replace_block(text: str, block: str, where: str = "README.md", markers=(BEGIN, END)) -> str:
  """`text` with the part between the markers replaced by `block`."""
  begin, end = markers
  i, j = text.find(begin), text.find(end)
  if i < 0 or j < i:
    raise ValueError(f"{where}: no {begin} ... {end} block")
  return text[:i + len(begin)] + "\n" + block + "\n" + text[j:]


def current_block(text: str, where: str = "README.md", markers=(BEGIN, END)) -> str:
  begin, end = markers
  i, j = text.find(begin), text.find(end)
  if i < 0 or j < i:
    raise ValueError(f"{where}: no {begin} ... {end} block")
  return text[i + len(begin):j].strip("\n")


# the machines of the speed table: (folder under bench/results/, its column's label)
SPEED_SETS = (("", "VM A"), ("cpu_avx512", "VM B (AVX-512)"))  # both reported as "AMD EPYC"


def _bench(name: str, folder: str = "") -> dict:
  with open(os.path.join(BENCH, folder, name), encoding="utf-8") as f:
    return json.load(f)


def _x(ratios) -> str:
  return " / ".join(f"{r:.2f}×" for r in ratios)


def _speed_column(folder: str) -> dict[str, str]:
  """One machine's cells of the speed table, by row."""
  greedy = _bench("sampler_cpu.json", folder)["rows"]
  paper = _bench("sampler_cpu_paper.json", folder)["rows"]
  scoring = _bench("scoring_cpu.json", folder)["results"]
  sft = _bench("sft_cpu.json", folder)
  ratio = sft["jax_over_torch_tokens_per_s"]
  useful = _bench("continuous_cpu.json", folder)["useful_fraction"]
  slower = lambda r: " (slower)" if r < 1 else ""  # noqa: E731
  packed, padded = (scoring[k]["tokens_per_s"] / scoring["torch"]["tokens_per_s"]
                    for k in ("jax", "jax_padded"))
  return {
      "machine": f"{sft['date'][:10]}, fp32 matmul {sft['peak_flops'] / 1e12:.2f} TFLOP/s",
      "greedy": _x(r["ratio_decode_tok_s"] for r in greedy),
      "prefill": _x(r["ratio_prefill_tok_s"] for r in greedy),
      "paper": _x(r["ratio_decode_tok_s"] for r in paper),
      "scoring": f"{_x([packed, padded])}{slower(max(packed, padded))}",
      "sft": f"**{ratio:.2f}×**{slower(ratio)}",
      "useful": f"{useful['continuous']:.2f} (static: {useful['static']:.2f})"}


def make_speed_block() -> str:
  """The README's CPU speed table, every figure read from the committed bench/results/ files:
  one column per machine (SPEED_SETS)."""
  greedy = _bench("sampler_cpu.json")["rows"]
  paper = _bench("sampler_cpu_paper.json")["rows"]
  batches = " / ".join(str(r["batch"]) for r in greedy)
  cols = [_speed_column(folder) for folder, _ in SPEED_SETS]
  rows = [("machine (2 cores, idle; date, measured peak)", "machine"),
          (f"greedy decode, batch {batches} (`bench/sampler.py --preset cpu-small`)", "greedy"),
          (f"prefill, batch {batches}", "prefill"),
          (f"paper sampling (T 0.7, top-p 0.95) decode, batch "
           f"{' / '.join(str(r['batch']) for r in paper)}", "paper"),
          ("learnability scoring, packed / padded (`bench/scoring.py --preset cpu`)", "scoring"),
          ("SFT step (`bench/sft.py --preset cpu`; docs/PERFORMANCE.md)", "sft"),
          ("continuous batching: useful-token fraction on a heavy-tailed workload", "useful")]
  head = "| path | " + " | ".join(f"ours / torch, {label}" for _, label in SPEED_SETS) + " |"
  lines = [head, "| --- |" + " --- |" * len(cols)]
  lines += [f"| {name} | " + " | ".join(c[key] for c in cols) + " |" for name, key in rows]
  return "\n".join(lines)


def make_block(report_path: str = REPORT, study_path: str = STUDY) -> str:
  """The whole block: the default run's results, then the study's (when its report exists)."""
  with open(report_path, encoding="utf-8") as f:
    block = render(json.load(f))
  if os.path.exists(study_path):
    with open(study_path, encoding="utf-8") as f:
      study = render_study(json.load(f))
    block += "\n" + study if study else ""
  return block


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--check", action="store_true", help="exit 1 if README.md's block is out of date")
  ap.add_argument("--report", default=REPORT)
  ap.add_argument("--study", default=STUDY, help="the study run's report.json (if it exists)")
  args = ap.parse_args(argv)
  blocks = [(make_block(args.report, args.study), (BEGIN, END), "results"),
            (make_speed_block(), SPEED, "speed")]
  with open(README, encoding="utf-8") as f:
    text = f.read()
  if args.check:
    stale = [name for block, markers, name in blocks
             if current_block(text, markers=markers) != block]
    for name in stale:
      print(f"README.md: the {name} block is out of date: run python docs/make_readme_results.py",
            file=sys.stderr)
    return 1 if stale else 0
  for block, markers, _ in blocks:
    text = replace_block(text, block, markers=markers)
  with open(README, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"updated {README}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
