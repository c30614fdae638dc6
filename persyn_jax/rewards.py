"""The combined reward (the paper's Eq. 2): per-prompt normalization across teachers, then
r = (1 - alpha) * norm(quality) + alpha * norm(learnability).

Pure numpy. Arrays are [prompts, teachers]; NaN marks a missing score (a teacher that did not
answer, a pair skipped as over-long) and stays NaN, ignored by the other teachers' normalization.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

NORMALIZERS = ("minmax", "zscore", "rank")


def _rowwise(fn):
  def wrapped(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2:
      raise ValueError(f"expected a [prompts, teachers] array, got shape {x.shape}")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
      return fn(x)
  wrapped.__doc__ = fn.__doc__
  return wrapped


@_rowwise
def minmax(x: np.ndarray) -> np.ndarray:
  """(x - min) / (max - min) per prompt, in [0, 1]; a prompt whose scores are all equal -> 0.5."""
  lo = np.nanmin(x, axis=1, keepdims=True)
  hi = np.nanmax(x, axis=1, keepdims=True)
  span = hi - lo
  flat = ~(span > 0)
  out = (x - lo) / np.where(flat, 1.0, span)
  out = np.where(flat, 0.5, np.clip(out, 0.0, 1.0))
  return np.where(np.isnan(x), np.nan, out)


@_rowwise
def zscore(x: np.ndarray) -> np.ndarray:
  """(x - mean) / std per prompt (population std); all-equal scores -> 0."""
  mean = np.nanmean(x, axis=1, keepdims=True)
  dev = x - mean
  std = np.sqrt(np.nanmean(dev * dev, axis=1, keepdims=True))
  # A spread at rounding level of the mean is no spread: all-equal up to float error.
  flat = ~(std > 1e-12 * np.maximum(np.abs(mean), 1e-300))
  out = np.where(flat, 0.0, dev / np.where(flat, 1.0, std))
  return np.where(np.isnan(x), np.nan, out)


@_rowwise
def rank(x: np.ndarray) -> np.ndarray:
  """Rank per prompt scaled to [0, 1] (lowest 0, highest 1); ties share their average rank; a
  prompt with one score -> 0.5."""
  out = np.full(x.shape, np.nan)
  for i, row in enumerate(x):
    ok = ~np.isnan(row)
    v = row[ok]
    n = v.size
    if n == 0:
      continue
    if n == 1:
      out[i, ok] = 0.5
      continue
    # average rank of ties: (number strictly below) + (number equal - 1) / 2
    below = (v[None, :] < v[:, None]).sum(1)
    equal = (v[None, :] == v[:, None]).sum(1)
    out[i, ok] = (below + (equal - 1) / 2) / (n - 1)
  return out


def normalize(values, method: str = "minmax") -> np.ndarray:
  """Per-prompt normalization of a [prompts, teachers] array across teachers."""
  fns = {"minmax": minmax, "zscore": zscore, "rank": rank}
  if method not in fns:
    raise ValueError(f"normalizer {method!r} is not one of {list(fns)}")
  return fns[method](values)


def combine(quality, learnability, alpha: float = 0.4, normalizer: str = "minmax") -> np.ndarray:
  """Eq. 2: (1 - alpha) * norm(quality) + alpha * norm(learnability), per prompt across teachers.
  A teacher missing either score gets NaN and is left out of both normalizations (its other score
  does not move the other teachers' rewards)."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha}: must be in [0, 1]")
  q, l = np.asarray(quality, np.float64), np.asarray(learnability, np.float64)
  if q.shape != l.shape:
    raise ValueError(f"quality {q.shape} and learnability {l.shape} differ in shape")
  missing = np.isnan(q) | np.isnan(l)
  q, l = np.where(missing, np.nan, q), np.where(missing, np.nan, l)
  return (1.0 - alpha) * normalize(q, normalizer) + alpha * normalize(l, normalizer)


def group_matrix(keys: Sequence, columns: Sequence, values: Sequence[float],
                 column_names: Sequence | None = None) -> tuple[list, list, np.ndarray]:
  """(row keys, column names, [rows, columns] matrix) of per-record values, rows in first-seen
  order; a (row, column) seen several times (several samples of one teacher) holds their mean,
  a cell never seen is NaN."""
  rows = list(dict.fromkeys(keys))
  cols = list(column_names) if column_names is not None else list(dict.fromkeys(columns))
  r_of = {k: i for i, k in enumerate(rows)}
  c_of = {c: j for j, c in enumerate(cols)}
  total = np.zeros((len(rows), len(cols)))
  count = np.zeros((len(rows), len(cols)))
  for k, c, v in zip(keys, columns, values):
    if c not in c_of:
      raise ValueError(f"column {c!r} is not one of {cols}")
    if v is None or np.isnan(v):
      continue
    total[r_of[k], c_of[c]] += v
    count[r_of[k], c_of[c]] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    return rows, cols, np.where(count > 0, total / np.maximum(count, 1), np.nan)


def response_rewards(keys: Sequence, columns: Sequence, quality: Sequence[float],
                     learnability: Sequence[float], alpha: float, normalizer: str) -> np.ndarray:
  """Eq. 2 per response: the reward of each (prompt key, column) response, normalized per prompt
  across all its responses (columns: (teacher, sample)), in the order given; NaN where either
  score is missing. The score stage's rewards, and the sweep's and the study's recombinations."""
  rows, cols, q = group_matrix(keys, columns, quality)
  _, _, l = group_matrix(keys, columns, learnability, cols)
  reward = combine(q, l, alpha, normalizer)
  r_of, c_of = {k: i for i, k in enumerate(rows)}, {c: j for j, c in enumerate(cols)}
  return np.asarray([reward[r_of[k], c_of[c]] for k, c in zip(keys, columns)], np.float64)
