"""The teacher study's part of the report: a heatmap of the measured gains (teacher x category)
and a markdown section, from study/study.json (stages/study.py).

    plot_gains(study, path)   the PNG heatmap
    study_markdown(study)     the section: gains, and how well each reward signal predicts them
    load_study(run_dir)       study/study.json, or None when the study did not run
"""
from __future__ import annotations

import json
import math
import os

SIGNALS = (("quality", "quality only"), ("learnability", "learnability only"),
           ("combined", "combined reward"))


def load_study(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, "study", "study.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def plot_gains(study: dict, path: str) -> None:
  """Teachers (rows) x categories (columns), coloured by the accuracy gain over the base student."""
  import matplotlib.pyplot as plt

  from persyn_jax.report.plots import save  # matplotlib with the Agg backend
  teachers, cats = study["teachers"], study["categories"]
  vals = [[_nan(study["gain"][t].get(c)) for c in cats] for t in teachers]
  lim = max([abs(v) for row in vals for v in row if math.isfinite(v)] + [0.01])
  fig, ax = plt.subplots(figsize=(1.1 * len(cats) + 2.6, 0.5 * len(teachers) + 1.6))
  im = ax.imshow(vals, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
  ax.set_xticks(range(len(cats)), cats)
  ax.set_yticks(range(len(teachers)), teachers)
  for i, row in enumerate(vals):
    for j, v in enumerate(row):
      ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8)
  ax.set_title("Accuracy gain over the base student, SFT on one teacher's probe answers",
               fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  save(fig, path)


def _nan(v) -> float:
  """A value of study.json as a float: null (strict JSON's NaN) or missing is NaN."""
  return math.nan if v is None else v


def _f(v: float, sign: bool = False) -> str:
  if v is None or not math.isfinite(v):
    return "n/a"
  return f"{v:+.3f}" if sign else f"{v:.3f}"


def study_markdown(study: dict | None, image: str = "") -> str:
  """The study's section of report.md ("" when the study did not run)."""
  if not study:
    return ""
  teachers, cats = study["teachers"], study["categories"]
  base = study["accuracy"]["base_student"]
  lines = ["## Teacher study: which teacher teaches the student, and does the reward know?", "",
           f"The student fine-tuned on each teacher's probe answers alone "
           f"({', '.join(f'{t} {n}' for t, n in study['probe_examples'].items())} examples), "
           f"evaluated on {study['eval_prompts']} held-out prompts; the gain over the base student "
           f"by {study['category_field'] or 'prompt'}:", "",
           "| teacher | " + " | ".join(cats) + " | all |",
           "| --- | " + " | ".join("---" for _ in cats) + " | --- |",
           "| base student (accuracy) | " + " | ".join(_f(base.get(c)) for c in cats)
           + f" | {_f(base.get('all'))} |"]
  for t in teachers:
    g = study["gain"][t]
    lines.append(f"| {t} | " + " | ".join(_f(g.get(c), True) for c in cats)
                 + f" | {_f(g.get('all'), True)} |")
  lines += ["", "Best teacher per category, by measured gain and by each signal's mean on the "
            "probe set (agreement: the chance the signal's best is the gain's best, ties broken "
            "at random; ρ: Spearman rank correlation across teachers):", "",
            "| category | best by gain | " + " | ".join(
                f"{label} (ρ)" for _, label in SIGNALS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in SIGNALS) + " |"]
  sig = study["signals"]
  for c in cats:
    row = [c, ", ".join(study["best_by_gain"][c])]
    for name, _ in SIGNALS:
      v = sig[name]["by_category"][c]
      row.append(f"{', '.join(v['best'])} ({_f(v['rank_correlation'])})")
    lines.append("| " + " | ".join(row) + " |")
  lines.append("| **agreement / mean ρ** | | " + " | ".join(
      f"{_f(sig[n]['agreement'])} / {_f(sig[n]['rank_correlation'])}" for n, _ in SIGNALS) + " |")
  lines += ["", f"Combined reward: α = {sig['combined']['alpha']}."]
  if image:
    lines += ["", f"![study gains]({image})"]
  return "\n".join(lines) + "\n"
