"""report.md: the report dict as Markdown tables."""
from __future__ import annotations

import os
from typing import Any


def _fmt(x: Any) -> str:
  if x is None:  # a number the run could not define (strict JSON writes NaN as null)
    return "n/a"
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


def _ci(ci) -> str:
  return f"{ci[0]:.3f} to {ci[1]:.3f}" if ci else ""


def _signed_ci(ci) -> str:
  return f"{ci[0]:+.3f} to {ci[1]:+.3f}" if ci else ""


def eval_lines(report: dict) -> list[str]:
  """The students' table: accuracy (mean over seeds) with its 95% interval, the paired difference
  from strong with its interval and significance, the seeds' spread and the costs; then one
  sentence per policy on whether it differs significantly from strong."""
  ev, metric = report["eval"], report["eval_metric"]
  st = (report.get("stats") or {}).get("policies", {})
  costs = report["costs"]["policies"]
  seeds = max((st[p]["seeds"] for p in st), default=1)
  lines = ["## Students on held-out prompts", ""]
  if st:
    s = report["stats"]
    lines += [f"Accuracy is the mean over {seeds} SFT seed(s); the 95% intervals are bootstrap "
              f"intervals over the {s['problems']} held-out problems ({s['resamples']} resamples, "
              f"seed {s['seed']}), the difference from {s['baseline']} paired (the same resample "
              "for both policies; each problem's correctness averaged over seeds). Significant: "
              "the interval of the difference excludes 0.", ""]
  lines += [f"| policy | {metric} | 95% CI | Δ vs strong | 95% CI of Δ | significant? | seed sd | "
            "n | training prompts | generations | teacher seconds |",
            "|" + " --- |" * 11]
  for p, e in ev.items():
    c, t = costs.get(p, {}), st.get(p, {})
    name = {"oracle": "oracle (the reward's best)", "base_student": "base_student (before SFT)"}.get(p, p)
    sig = "" if "significant" not in t else ("yes" if t["significant"] else "no")
    delta = f"{t['delta']:+.3f}" if "delta" in t else ""
    lines.append(f"| {name} | {_fmt(e['score'])} | {_ci(t.get('ci'))} | {delta} | "
                 f"{_signed_ci(t.get('delta_ci'))} | {sig} | "
                 f"{_fmt(t['seed_sd']) if t.get('seeds', 1) > 1 else ''} | {e['n']} | "
                 f"{c.get('prompts', '')} | {c.get('generations', '')} | "
                 f"{_fmt(c.get('teacher_seconds', ''))} |")
  if st:
    lines += [""] + [f"- {s}" for s in significance_sentences(report)]
  return lines


def kind_delta_lines(report: dict) -> list[str]:
  """Each policy's paired difference from strong per prompt kind (* where significant)."""
  bk = (report.get("stats") or {}).get("by_kind") or {}
  kinds = sorted(bk)
  names = [p for p in report["eval"] if any("delta" in bk[k].get(p, {}) for k in kinds)]
  if not names:
    return []
  lines = ["", "Δ vs strong by prompt kind (paired bootstrap within the kind; * the 95% interval "
           "excludes 0):", "", "| policy | " + " | ".join(kinds) + " |",
           "|" + " --- |" * (len(kinds) + 1)]
  for p in names:
    cells = []
    for k in kinds:
      t = bk[k].get(p, {})
      cells.append(f"{t['delta']:+.3f}{'*' if t['significant'] else ''}" if "delta" in t else "")
    lines.append(f"| {p} | " + " | ".join(cells) + " |")
  return lines


def significance_sentences(report: dict) -> list[str]:
  """One sentence per policy: does it differ significantly from strong, and how much."""
  st = (report.get("stats") or {}).get("policies", {})
  costs = report["costs"]["policies"]
  out = []
  for p, t in st.items():
    if "delta" not in t:
      continue
    lo, hi = t["delta_ci"]
    if t["significant"]:
      verdict = f"significantly {'better' if t['delta'] > 0 else 'worse'} than strong"
    else:
      verdict = "not significantly different from strong"
    line = (f"{p}: {verdict} (Δ {t['delta']:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f})")
    if p == "oracle":
      line += (f"; the oracle keeps the reward's best response per prompt (Generate then Select: "
               f"{costs.get(p, {}).get('generations', '?')} teacher generations), the most a "
               "router of this reward can reach, not a bound on accuracy")
    out.append(line + ".")
  return out


def sweep_lines(report: dict) -> list[str]:
  """The alpha sweep: per alpha, each swept policy's accuracy, interval and paired difference from
  the main run's strong student, and the router's held-out Hit@1."""
  sw = report.get("sweep")
  if not sw:
    return []
  lines = ["", "## Alpha sweep", "",
           "Each alpha reuses the probe and its quality and learnability scores, recombines the "
           "reward (Eq. 2: (1 - alpha) quality + alpha learnability), and trains the router and "
           "the students again; Δ is paired against the main run's strong student.", "",
           "| alpha | policy | accuracy | 95% CI | Δ vs strong | 95% CI of Δ | significant? | "
           "router Hit@1 |", "|" + " --- |" * 8]
  for r in sw["rows"]:
    a = f"{r['alpha']:g}" + (" (main run)" if r.get("main_run") else "")
    hit = _fmt(r.get("router", {}).get("hit@1", ""))
    if not r["done"]:
      lines.append(f"| {a} | not run | | | | | | {hit} |")
    for p, t in r["policies"].items():
      sig = "" if "significant" not in t else ("yes" if t["significant"] else "no")
      delta = f"{t['delta']:+.3f}" if "delta" in t else ""
      lines.append(f"| {a} | {p} | {_fmt(t['accuracy'])} | {_ci(t['ci'])} | {delta} | "
                   f"{_signed_ci(t.get('delta_ci'))} | {sig} | {hit} |")
  return lines


def markdown(report: dict) -> str:
  lines = [f"# PerSyn run report: {report['run']}", ""]
  if report.get("summary"):
    lines += [report["summary"], ""]
  ev = report["eval"]
  lines += eval_lines(report)
  kinds = sorted({k for e in ev.values() for k in e.get("by_kind", {})})
  if kinds:
    lines += ["", f"{report['eval_metric'].capitalize()} by prompt kind:", "",
              "| policy | " + " | ".join(kinds) + " |", "|" + " --- |" * (len(kinds) + 1)]
    for p, e in ev.items():
      lines.append(f"| {p} | " + " | ".join(_fmt(e["by_kind"].get(k, float("nan"))) for k in kinds) + " |")
  lines += kind_delta_lines(report)
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
  lines += sweep_lines(report)
  if report.get("study"):
    from persyn_jax.report.study import study_markdown
    lines += [""] + study_markdown(report["study"]).rstrip("\n").split("\n")
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
