"""The run report: report.json, report.md and PNG plots (teacher shares, eval, SFT loss)."""
from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from persyn_jax.io_utils import atomic_write_json, atomic_write_text  # noqa: E402


def plot_shares(shares: dict[str, dict[str, float]], teachers: list[str], path: str) -> None:
  """Stacked bars: each policy's share of prompts per teacher (incl. the oracle's best teacher)."""
  names = list(shares)
  fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 3.6))
  bottom = [0.0] * len(names)
  for t in teachers:
    vals = [shares[p].get(t, 0.0) for p in names]
    ax.bar(names, vals, bottom=bottom, label=t)
    bottom = [b + v for b, v in zip(bottom, vals)]
  ax.set_ylabel("share of training prompts")
  ax.set_ylim(0, 1)
  ax.set_title("Teacher shares per policy")
  ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
  plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_eval(evals: dict[str, float], metric: str, path: str) -> None:
  names = list(evals)
  fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.4))
  bars = ax.bar(names, [evals[n] for n in names], color="tab:blue")
  for b, n in zip(bars, names):
    ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{evals[n]:.3f}", ha="center",
            va="bottom", fontsize=8)
  ax.set_ylabel(metric)
  ax.set_title(f"Student {metric} on held-out prompts")
  plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: str) -> None:
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  for name, pts in curves.items():
    if pts:
      ax.plot([s for s, _ in pts], [l for _, l in pts], label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (response tokens)")
  ax.set_title("Student SFT loss per policy")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(x: Any) -> str:
  if isinstance(x, float):
    return f"{x:.3f}"
  return str(x)


def markdown(report: dict) -> str:
  lines = [f"# PerSyn run report: {report['run']}", ""]
  if report.get("summary"):
    lines += [report["summary"], ""]
  ev = report["eval"]
  lines += ["## Students on held-out prompts", "",
            f"| policy | {report['eval_metric']} | n | training prompts | generations | teacher seconds |",
            "| --- | --- | --- | --- | --- | --- |"]
  for p, e in ev.items():
    c = report["costs"]["policies"].get(p, {})
    lines.append(f"| {p} | {_fmt(e['score'])} | {e['n']} | {c.get('prompts', '')} | "
                 f"{c.get('generations', '')} | {_fmt(c.get('teacher_seconds', ''))} |")
  kinds = sorted({k for e in ev.values() for k in e.get("by_kind", {})})
  if kinds:
    lines += ["", f"{report['eval_metric'].capitalize()} by prompt kind:", "",
              "| policy | " + " | ".join(kinds) + " |", "|" + " --- |" * (len(kinds) + 1)]
    for p, e in ev.items():
      lines.append(f"| {p} | " + " | ".join(_fmt(e["by_kind"].get(k, float("nan"))) for k in kinds) + " |")
  r = report.get("router", {})
  if r:
    lines += ["", "## Router", "", "| metric | value |", "| --- | --- |"]
    for k in ("hit@1", "hit@3", "pairwise_accuracy", "random_hit@1", "pairs", "ties_dropped",
              "held_out_prompts"):
      if k in r:
        lines.append(f"| {k} | {_fmt(r[k])} |")
  teachers = report["teachers"]
  lines += ["", "## Teacher shares", "",
            "| policy | " + " | ".join(teachers) + " |", "|" + " --- |" * (len(teachers) + 1)]
  for p, sh in report["shares"].items():
    lines.append(f"| {p} | " + " | ".join(f"{sh.get(t, 0.0):.2f}" for t in teachers) + " |")
  lines += ["", "## Teachers on the probe set", "",
            "| teacher | family | mean quality | mean learnability | oracle-best share |",
            "| --- | --- | --- | --- | --- |"]
  for t, s in report["probe"]["teachers"].items():
    lines.append(f"| {t} | {s.get('family', '')} | {_fmt(s['mean_quality'])} | "
                 f"{_fmt(s['mean_learnability'])} | {_fmt(s['oracle_share'])} |")
  if report["probe"].get("by_kind"):
    lines += ["", "Oracle-best teacher by prompt kind (share of that kind's probe prompts):", ""]
    for kind, d in report["probe"]["by_kind"].items():
      lines.append(f"- {kind}: " + ", ".join(f"{t} {v:.2f}" for t, v in d.items() if v > 0))
  c = report["costs"]
  lines += ["", "## Cost", "",
            f"- Route then Generate: {c['route_then_generate']['generations']} generations "
            f"(probe {c['probe_generations']} + routed {c['routed_generations']}); "
            f"Generate then Select would need {c['generate_then_select']['generations']}.",
            "", "| teacher | generations | response tokens | seconds |", "| --- | --- | --- | --- |"]
  for t, d in c["teachers"].items():
    lines.append(f"| {t} | {d['generations']} | {d['tokens']} | {_fmt(d['seconds'])} |")
  if report.get("plots"):
    lines += ["", "## Plots", ""] + [f"![{k}]({os.path.basename(v)})" for k, v in report["plots"].items()]
  return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str, loss_curves: dict[str, list[tuple[int, float]]]) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  plots = {"shares": os.path.join(out_dir, "teacher_shares.png"),
           "eval": os.path.join(out_dir, "eval.png"),
           "sft_loss": os.path.join(out_dir, "sft_loss.png")}
  plot_shares(report["shares"], report["teachers"], plots["shares"])
  plot_eval({p: e["score"] for p, e in report["eval"].items()}, report["eval_metric"], plots["eval"])
  plot_losses(loss_curves, plots["sft_loss"])
  report = dict(report, plots=plots)
  atomic_write_json(os.path.join(out_dir, "report.json"), report)
  atomic_write_text(os.path.join(out_dir, "report.md"), markdown(report))
  return report
