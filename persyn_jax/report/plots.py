"""The report's PNG plots: teacher shares per policy, eval per student, SFT loss per policy."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
