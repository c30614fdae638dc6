"""The report's statistics (numpy only): each policy's held-out accuracy over its SFT seeds, a
bootstrap 95% interval over held-out problems, and a PAIRED bootstrap interval of its difference
from a baseline policy (strong).

What the intervals cover: the sampling of held-out problems. Each resample draws the problems
with replacement once and scores every policy on that same draw (paired), so the difference of
two policies that fail on the same hard problems is not blurred by which problems were drawn. A
problem's correctness is first averaged over the policy's seeds, so seed noise enters as
per-problem noise; the spread across seeds is reported beside it (seed_sd, seed_ci: a t-interval
of the seed means). A difference is "significant" when its interval excludes 0.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def _t_central(x: float, df: int) -> float:
  """P(|T| <= x) for Student's t with `df` (integer) degrees of freedom: the closed forms of
  Abramowitz & Stegun 26.7.3-4."""
  th = math.atan(x / math.sqrt(df))
  c2, s = math.cos(th) ** 2, math.sin(th)
  if df % 2:  # (2/pi) (theta + sin theta (cos theta + 2/3 cos^3 theta + ...)), up to cos^(df-2)
    term = acc = math.cos(th) if df > 1 else 0.0
    for k in range(3, df - 1, 2):
      term *= c2 * (k - 1) / k
      acc += term
    return 2.0 / math.pi * (th + s * acc)
  term = acc = 1.0  # sin theta (1 + 1/2 cos^2 theta + 1.3/(2.4) cos^4 theta + ...)
  for k in range(2, df - 1, 2):
    term *= c2 * (k - 1) / k
    acc += term
  return s * acc


def t_quantile(df: int, level: float = LEVEL) -> float:
  """The two-sided `level` quantile of Student's t with `df` degrees of freedom (4.3027 for
  df = 2 at 95%), to float precision (bisection on the exact CDF)."""
  lo, hi = 0.0, 1.0
  while _t_central(hi, df) < level:
    hi *= 2.0
  for _ in range(200):
    mid = (lo + hi) / 2.0
    lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
    if hi - lo <= 1e-15 * hi:
      break
  return (lo + hi) / 2.0


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
  """(resamples, n) counts: how often each of n problems is drawn in each bootstrap resample
  (n draws with replacement, the same law as drawing indices)."""
  return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)


def bootstrap_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """The mean of each row of `values` (m, n) under each resample of `counts` (B, n): (m, B).
  Row by row: one row's means never depend on the rows beside it (a matrix product may round a
  row differently by its place in the matrix), so equal rows get equal means."""
  values = np.atleast_2d(np.asarray(values, np.float64))
  counts = np.asarray(counts, np.float64)
  return np.stack([counts @ v for v in values]) / counts.sum(1)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
  """The central `level` percentile interval of bootstrap `samples`."""
  a = (1.0 - level) / 2.0
  lo, hi = np.quantile(samples, [a, 1.0 - a])
  return float(lo), float(hi)


def seed_interval(scores: Sequence[float]) -> tuple[float, float] | None:
  """The 95% t-interval of the mean of per-seed scores (None with fewer than 2 seeds)."""
  x = np.asarray(scores, np.float64)
  if len(x) < 2:
    return None
  half = t_quantile(len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
  return float(x.mean() - half), float(x.mean() + half)


def delta_interval(a: np.ndarray, b: np.ndarray, *, paired: bool = True,
                   resamples: int = RESAMPLES, seed: int = 0,
                   level: float = LEVEL) -> tuple[float, tuple[float, float]]:
  """(mean(a) - mean(b), its bootstrap interval) for per-problem scores `a`, `b` of one problem
  set. Paired: one draw of problems for both; unpaired: each its own draw (what ignoring the
  pairing would give, for comparison)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or not len(a):
    raise ValueError(f"delta_interval: per-problem vectors of one length, got {a.shape}, {b.shape}")
  rng = np.random.default_rng(seed)
  ca = resample_counts(len(a), resamples, rng)
  if paired:  # the mean difference on each draw: exactly 0 where a and b agree on every problem
    d = bootstrap_means((a - b)[None], ca)[0]
  else:
    cb = resample_counts(len(b), resamples, rng)
    d = bootstrap_means(a[None], ca)[0] - bootstrap_means(b[None], cb)[0]
  return float(a.mean() - b.mean()), percentile_interval(d, level)


def _block(per_problem: Mapping[str, np.ndarray], baseline: str | None, counts: np.ndarray,
           level: float) -> dict[str, dict]:
  """Mean, interval and (vs `baseline`) paired difference of each policy on one problem set."""
  names = list(per_problem)
  m = bootstrap_means(np.stack([per_problem[p] for p in names]), counts)
  out = {}
  for i, p in enumerate(names):
    lo, hi = percentile_interval(m[i], level)
    e = {"accuracy": float(per_problem[p].mean()), "ci": [lo, hi]}
    if baseline in per_problem and p != baseline:
      # the mean difference on each draw (not m[i] - m[j]): exactly 0 for a policy whose every
      # answer is strong's (eval's same_as twin), so its interval is [0, 0], never significant
      d = bootstrap_means((per_problem[p] - per_problem[baseline])[None], counts)[0]
      dlo, dhi = percentile_interval(d, level)
      e.update(delta=float(per_problem[p].mean() - per_problem[baseline].mean()),
               delta_ci=[dlo, dhi], significant=bool(dlo > 0 or dhi < 0))
    out[p] = e
  return out


def compare(correct: Mapping[str, np.ndarray], *, baseline: str | None = "strong",
            kinds: Sequence[str] | None = None, resamples: int = RESAMPLES, seed: int = 0,
            level: float = LEVEL) -> dict:
  """The statistics of every policy from `correct`: policy -> (seeds, problems) correctness (0/1
  or a score in [0, 1]), the same problems in the same order for every policy.

  Returns {"policies": {p: {accuracy (mean over seeds), ci, seeds, seed_scores, seed_sd,
  seed_ci, and vs baseline: delta, delta_ci, significant}}, "by_kind": {kind: {p: {accuracy, ci,
  delta, delta_ci, significant}}} (when `kinds` gives each problem's kind), "baseline",
  "resamples", "level", "seed", "problems"}. Seeded: the same inputs give the same intervals."""
  if not correct:
    raise ValueError("stats.compare: no policies")
  mats = {p: np.atleast_2d(np.asarray(v, np.float64)) for p, v in correct.items()}
  n = {m.shape[1] for m in mats.values()}
  if len(n) != 1 or 0 in n:
    raise ValueError(f"stats.compare: every policy needs the same non-zero number of problems, "
                     f"got { {p: m.shape[1] for p, m in mats.items()} }")
  n = n.pop()
  if resamples < 1:
    raise ValueError(f"stats.compare: resamples={resamples}: must be >= 1")
  per_problem = {p: m.mean(0) for p, m in mats.items()}
  rng = np.random.default_rng(seed)
  policies = _block(per_problem, baseline, resample_counts(n, resamples, rng), level)
  for p, m in mats.items():
    scores = m.mean(1)
    ci = seed_interval(scores)
    policies[p].update(seeds=int(m.shape[0]), seed_scores=[float(s) for s in scores],
                       seed_sd=float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                       seed_ci=list(ci) if ci else None)
  out = {"policies": policies, "baseline": baseline if baseline in mats else None,
         "resamples": resamples, "level": level, "seed": seed, "problems": n}
  if kinds is not None:
    if len(kinds) != n:
      raise ValueError(f"stats.compare: {len(kinds)} kinds for {n} problems")
    kinds = np.asarray(kinds, dtype=object)
    out["by_kind"] = {}
    for i, k in enumerate(sorted(set(kinds.tolist()))):
      sel = kinds == k
      krng = np.random.default_rng([seed, i + 1])  # its own stream: one kind's resample alone
      out["by_kind"][k] = _block({p: v[sel] for p, v in per_problem.items()}, baseline,
                                 resample_counts(int(sel.sum()), resamples, krng), level)
  return out
