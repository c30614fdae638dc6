"""report.md: the report dict as Markdown tables."""
from __future__ import annotations

import os
from typing import Any


def _fmt(x: Any) -> str:
  if isinstance(x, float):
    return f"{x:.3f}"
  return str(x)


def ties_lines(report: dict) -> list[str]:
  """How many prompts' best teacher was a tie, on the probe (persyn) and on the full set (the
  oracle), and which kept sample a prompt's teacher had, when it sampled several."""
  t = report.get("ties")
  if not t:
    return []
  out = ["", f"Ties on the top reward (broken by a hash seeded with policies.seed={t['seed']}): "
         f"probe {t['probe']['ties']} of {t['probe']['prompts']} prompts"]
  out[-1] += (f"; oracle {t['oracle']['ties']} of {t['oracle']['prompts']} prompts."
              if t.get("oracle") else ".")
  s = report.get("samples") or {}
  if s.get("num_samples", 1) > 1:
    out[-1] += (f" Each prompt's teacher sampled {s['num_samples']} responses; the dataset keeps "
                f"the best-reward one ({s['unscored']} of {s['pairs']} pairs had no scored "
                f"sample and kept a hash-chosen one).")
  return out


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
  lines += ties_lines(report)
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
