"""The report's PNG plots: teacher shares per policy, eval per student, SFT loss per policy."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from persyn_jax.io_utils import atomic_write_bytes  # noqa: E402


def save(fig, path: str) -> None:
  """`fig` as a PNG at `path`, written atomically (a kill leaves the old plot or the new one,
  never a torn file), then closed."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())


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
  save(fig, path)


def plot_eval(evals: dict[str, float], metric: str, path: str,
              intervals: dict[str, list[float]] | None = None) -> None:
  """Bars of each student's score; error bars: its 95% interval (`intervals`), where given."""
  names = list(evals)
  intervals = intervals or {}
  fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.4))
  vals = [evals[n] for n in names]
  err = [[max(0.0, v - intervals[n][0]) if n in intervals else 0.0 for n, v in zip(names, vals)],
         [max(0.0, intervals[n][1] - v) if n in intervals else 0.0 for n, v in zip(names, vals)]]
  bars = ax.bar(names, vals, color="tab:blue", yerr=err if intervals else None, capsize=4,
                ecolor="black")
  for b, n in zip(bars, names):  # the value above its error bar
    top = intervals[n][1] if n in intervals else evals[n]
    ax.text(b.get_x() + b.get_width() / 2, top + 0.01, f"{evals[n]:.3f}", ha="center",
            va="bottom", fontsize=8)
  if metric == "accuracy":
    ax.set_ylim(0, 1.08)
  ax.set_ylabel(metric)
  ax.set_title(f"Student {metric} on held-out prompts" + (" (95% CI)" if intervals else ""))
  plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
  fig.tight_layout()
  save(fig, path)


def plot_sweep(rows: list[dict], path: str) -> None:
  """The alpha sweep: each policy's accuracy vs alpha with its 95% interval, and the router's
  held-out Hit@1 vs alpha."""
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
  for p in sorted({p for r in rows for p in r["policies"]}):
    pts = [(r["alpha"], r["policies"][p]) for r in rows if p in r["policies"]]
    xs = [a for a, _ in pts]
    ys = [e["accuracy"] for _, e in pts]
    lo = [max(0.0, e["accuracy"] - e["ci"][0]) for _, e in pts]
    hi = [max(0.0, e["ci"][1] - e["accuracy"]) for _, e in pts]
    a1.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label=p)
  a1.set_xlabel("alpha (weight of learnability)")
  a1.set_ylabel("held-out accuracy")
  a1.set_title("Student accuracy vs alpha (95% CI)")
  a1.legend(fontsize=8)
  pts = [(r["alpha"], r["router"]["hit@1"]) for r in rows if "hit@1" in r.get("router", {})]
  a2.plot([a for a, _ in pts], [h for _, h in pts], marker="o")
  a2.set_xlabel("alpha")
  a2.set_ylabel("router Hit@1 (held-out probe)")
  a2.set_ylim(0, 1)
  a2.set_title("Router Hit@1 vs alpha")
  fig.tight_layout()
  save(fig, path)


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
  save(fig, path)
