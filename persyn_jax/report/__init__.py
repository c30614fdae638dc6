"""The run report: report.json, report.md and PNG plots (teacher shares, eval, SFT loss).

    assemble.py  the report dict from a finished run: eval table, shares, costs, router, summary
    stats.py     bootstrap intervals: accuracy over seeds, paired difference from strong
    plots.py     the PNG plots
    markdown.py  report.md
    study.py     the teacher study's section and heatmap (study/study.json)
"""
from __future__ import annotations

import os

from persyn_jax.io_utils import atomic_write_json, atomic_write_text


def write_report(report: dict, out_dir: str, loss_curves: dict[str, list[tuple[int, float]]]) -> dict:
  """Writes the plots, report.json and report.md of `report` into `out_dir`; returns the report
  with the plots' paths."""
  from persyn_jax.report.markdown import markdown
  from persyn_jax.report.plots import plot_eval, plot_losses, plot_shares  # matplotlib: only here
  os.makedirs(out_dir, exist_ok=True)
  plots = {"shares": os.path.join(out_dir, "teacher_shares.png"),
           "eval": os.path.join(out_dir, "eval.png"),
           "sft_loss": os.path.join(out_dir, "sft_loss.png")}
  plot_shares(report["shares"], report["teachers"], plots["shares"])
  st = (report.get("stats") or {}).get("policies", {})
  plot_eval({p: e["score"] for p, e in report["eval"].items()}, report["eval_metric"], plots["eval"],
            {p: st[p]["ci"] for p in st})
  plot_losses(loss_curves, plots["sft_loss"])
  if report.get("sweep"):
    from persyn_jax.report.plots import plot_sweep
    plots["sweep"] = os.path.join(out_dir, "sweep_alpha.png")
    plot_sweep(report["sweep"]["rows"], plots["sweep"])
  if report.get("study"):
    from persyn_jax.report.study import plot_gains
    plots["study"] = os.path.join(out_dir, "study_gain.png")
    plot_gains(report["study"], plots["study"])
  report = dict(report, plots=plots)
  atomic_write_json(os.path.join(out_dir, "report.json"), report)
  atomic_write_text(os.path.join(out_dir, "report.md"), markdown(report))
  return report


def write_run_report(ctx, manifests: dict[str, dict]) -> dict:
  """The report of the finished run of `ctx` (a stages.Context), written to run_dir/report/."""
  from persyn_jax.report.assemble import assemble
  report, curves = assemble(ctx, manifests)
  return write_report(report, ctx.path("report"), curves)
