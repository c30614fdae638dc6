"""Routing policies: which teacher answers which prompt (the paper's baselines).

Pure functions over the probe's score table. Every policy returns {prompt id: teacher name}
for the training prompts; randomness comes from a seeded hash of the prompt id, so a policy is
the same on every host and every rerun.

Robustness rules (ours): a teacher with no usable probe response (every one failed: NaN) is
never a baseline's choice; teachers are compared on the probe prompts every candidate answered,
never by `nanmean` over different subsets; ties (in a prompt's reward, in a mean) go to the
highest seeded hash of (prompt id or policy, teacher), never to the first-listed teacher.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from persyn_jax.rewards import minmax

POLICIES = ("persyn", "strong", "family_strong", "mix", "car", "random", "oracle")

# Scores closer than this (relative to their size, at least absolute) are a tie: rewards are
# normalized to O(1), and a gap at float-rounding level says nothing about the teachers. The
# learnability of one text, scored at two places of a packed float32 batch, differs by up to a few
# 1e-7: two teachers that gave the same answer tie. (The router drops its pairs by the same 1e-6.)
TIE_TOL = 1e-6


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """Baseline settings. Defaults: strong = the usable teacher with the highest mean quality on
  the probe prompts every usable teacher answered; family_strong = the same among the student's
  family; mix's partner (`weak`) = the usable teacher ranked right below strong by that mean
  quality (the one right above if strong ranks last): a weaker-but-reasonable teacher as in Mix
  Distillation, not the worst one. `seed` drives random, mix and every tie-break."""

  strong: str | None = None         # None: the highest mean quality on the probe set
  family_strong: str | None = None  # None: the strongest teacher of the student's family
  weak: str | None = None           # mix's partner; None: the teacher ranked right below strong
  mix_ratio: float = 0.5            # share of prompts that mix gives to the strong teacher (1:1)
  car_beta: float = 1.0             # CAR: mean min-max quality / (1 + beta * mean student NLL)
  seed: int = 0

  def __post_init__(self):
    if not 0.0 <= self.mix_ratio <= 1.0:
      raise ValueError(f"policies.mix_ratio={self.mix_ratio} must be in [0, 1]")
    if not (np.isfinite(self.car_beta) and self.car_beta >= 0):  # NaN: every CAR score NaN
      raise ValueError(f"policies.car_beta={self.car_beta} must be a finite number >= 0")
    if self.seed < 0:
      raise ValueError(f"policies.seed={self.seed}: must be >= 0")
    if self.weak is not None and self.weak == self.strong:
      raise ValueError(f"policies.weak={self.weak!r} is policies.strong too: mix would be one "
                       "teacher; name another teacher as weak")


class Best(NamedTuple):
  """Per-prompt argmax of a reward matrix."""
  assignment: dict[str, str]
  ties: int      # prompts whose top reward several teachers share (broken by the seeded hash)
  unscored: int  # prompts where no teacher has a reward (the hash picks among the usable ones)


@dataclasses.dataclass(frozen=True)
class ScoreTable:
  """Probe scores: rows are prompts, columns teachers (NaN where a teacher has no response)."""

  ids: tuple[str, ...]
  teachers: tuple[str, ...]
  quality: np.ndarray       # raw quality [P, k]
  learnability: np.ndarray  # mean student log-prob [P, k]
  reward: np.ndarray        # combined, normalized per prompt [P, k]

  def best(self, seed: int = 0) -> dict[str, str]:
    """The oracle teacher of each probe prompt: argmax of the combined reward, ties broken by
    the seeded hash of (prompt id, teacher)."""
    return best_teachers(self.ids, self.teachers, self.reward, seed).assignment

  @property
  def ties(self) -> int:
    """Probe prompts whose top reward several teachers share (the same for every seed)."""
    return best_teachers(self.ids, self.teachers, self.reward).ties

  def usable(self, fields: Sequence[str] = ("quality",)) -> tuple[str, ...]:
    """Teachers with at least one probe prompt where every one of `fields` is finite."""
    ok = np.ones(self.reward.shape, bool)
    for f in fields:
      ok &= np.isfinite(getattr(self, f))
    return tuple(t for j, t in enumerate(self.teachers) if ok[:, j].any())

  def mean_quality(self) -> dict[str, float]:
    """Per-teacher mean over the prompts it answered (for display; policies use `ranking`)."""
    return {t: _nanmean(self.quality[:, j]) for j, t in enumerate(self.teachers)}

  def mean_nll(self) -> dict[str, float]:
    return {t: -_nanmean(self.learnability[:, j]) for j, t in enumerate(self.teachers)}


def _nanmean(x: np.ndarray) -> float:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a teacher with no response: NaN
    return float(np.nanmean(x))


def unit_hash(*parts) -> float:
  """A uniform number in [0, 1) from the parts (seeded, host-independent)."""
  h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
  return int.from_bytes(h[:8], "little") / 2.0**64


def within_tie(a: float, b: float) -> bool:
  """Whether two scores tie: within TIE_TOL of each other relative to their size (at least
  absolutely); non-finite ones only when equal. The study's best sets use the same rule."""
  if not (np.isfinite(a) and np.isfinite(b)):
    return a == b
  return abs(a - b) <= TIE_TOL * max(1.0, abs(a), abs(b))


def _order(scores: Mapping[str, float], seed: int, key: str) -> list[str]:
  """Teachers from the highest score to the lowest; tied scores in the order of the seeded hash
  of (key, teacher), so the teachers' listing order never decides."""
  by = sorted(scores, key=lambda t: -scores[t])
  out, i = [], 0
  while i < len(by):
    j = i + 1
    while j < len(by) and within_tie(scores[by[i]], scores[by[j]]):
      j += 1
    out += sorted(by[i:j], key=lambda t: -unit_hash(seed, "tie", key, t))
    i = j
  return out


def best_teachers(ids: Sequence[str], teachers: Sequence[str], reward, seed: int = 0) -> Best:
  """Per-prompt argmax of a [prompts, teachers] reward matrix (NaN: no scored response).

  Ties go to the highest seeded hash of (prompt id, teacher) and are counted. A prompt with no
  scored response at all goes the same way to one of the teachers with some scored response."""
  r = np.asarray(reward, np.float64)
  if r.shape != (len(ids), len(teachers)):
    raise ValueError(f"reward matrix of shape {r.shape} for {len(ids)} prompts x "
                     f"{len(teachers)} teachers")
  usable = [t for j, t in enumerate(teachers) if np.isfinite(r[:, j]).any()]
  if len(ids) and not usable:
    raise ValueError(f"no usable teacher: no scored response of any of {list(teachers)}")
  out, ties, unscored = {}, 0, 0
  for i, row in zip(ids, r):
    ok = np.isfinite(row)
    if not ok.any():
      cands, unscored = usable, unscored + 1
    else:
      top = row[ok].max()
      cands = [t for t, v, o in zip(teachers, row, ok) if o and within_tie(v, top)]
      ties += len(cands) > 1
    out[i] = _order({t: 0.0 for t in cands}, seed, i)[0]
  return Best(out, ties, unscored)


def _usable(table: ScoreTable, candidates: Sequence[str], fields: Sequence[str], what: str
            ) -> list[str]:
  ok = set(table.usable(fields))
  usable = [t for t in candidates if t in ok]
  if not usable:
    raise ValueError(f"{what}: no usable teacher among {list(candidates)}: every probe response "
                     f"of each lacks a finite {' / '.join(fields)}")
  return usable


def _shared(table: ScoreTable, candidates: Sequence[str], fields: Sequence[str], what: str
            ) -> tuple[np.ndarray, list[int]]:
  """(mask of the probe prompts every candidate answered with finite `fields`, their columns)."""
  cols = [table.teachers.index(t) for t in candidates]
  ok = np.ones(len(table.ids), bool)
  for f in fields:
    ok &= np.isfinite(getattr(table, f)[:, cols]).all(1)
  if not ok.any():
    counts = {t: int(np.all([np.isfinite(getattr(table, f)[:, j]) for f in fields], 0).sum())
              for t, j in zip(candidates, cols)}
    raise ValueError(f"{what}: no probe prompt was answered by every one of {list(candidates)} "
                     f"(answered prompts: {counts}), so they cannot be compared fairly; name "
                     f"the teacher in the config")
  return ok, cols


def ranking(table: ScoreTable, candidates: Sequence[str] | None = None, seed: int = 0,
            what: str = "strong") -> list[str]:
  """Usable candidates (default: all teachers) from the highest mean quality to the lowest, on
  the probe prompts every usable candidate answered; ties by the seeded hash of (what, teacher)."""
  cands = _usable(table, table.teachers if candidates is None else candidates, ("quality",), what)
  rows, cols = _shared(table, cands, ("quality",), what)
  return _order({t: float(table.quality[rows, j].mean()) for t, j in zip(cands, cols)}, seed, what)


def _configured(name: str, table: ScoreTable, field: str, fields=("quality",)) -> str:
  if name not in table.teachers:
    raise ValueError(f"{field}={name!r} is not a teacher; teachers: {list(table.teachers)}")
  if name not in table.usable(fields):
    raise ValueError(f"{field}={name!r} has no usable probe response (every one failed)")
  return name


def strong_teacher(table: ScoreTable, cfg: PolicyConfig) -> str:
  if cfg.strong is not None:
    return _configured(cfg.strong, table, "policies.strong")
  return ranking(table, seed=cfg.seed, what="strong")[0]


def mix_partner(table: ScoreTable, cfg: PolicyConfig, strong: str | None = None) -> str:
  """Mix's second teacher: `policies.weak`, or the usable teacher ranked right below strong by
  mean quality (right above if strong ranks last; strong itself if it is the only one)."""
  strong = strong or strong_teacher(table, cfg)
  if cfg.weak is not None:
    if cfg.weak == strong:
      raise ValueError(f"policies.weak={cfg.weak!r} is the strong teacher (the highest mean "
                       "probe quality): mix would be one teacher; name another teacher as weak")
    return _configured(cfg.weak, table, "policies.weak")
  rank = ranking(table, seed=cfg.seed, what="strong")
  at = rank.index(strong)
  return rank[at + 1] if at + 1 < len(rank) else rank[max(at - 1, 0)]


def family_strong_teacher(table: ScoreTable, cfg: PolicyConfig, families: Mapping[str, str],
                          student_family: str | None) -> str:
  if cfg.family_strong is not None:
    return _configured(cfg.family_strong, table, "policies.family_strong")
  same = [t for t in table.teachers if student_family and families.get(t) == student_family]
  if not same:
    raise ValueError(f"family_strong: no teacher of the student's family {student_family!r} "
                     f"(teacher families: {dict(families)}); set policies.family_strong")
  return ranking(table, same, cfg.seed, "family_strong")[0]


def car_scores(table: ScoreTable, cfg: PolicyConfig) -> dict[str, float]:
  """CAR's score of each usable teacher: mean quality / (1 + beta * mean student NLL).

  Quality is min-max normalized per prompt across the candidates first (the normalization of
  Eq. 2), so it lies in [0, 1]: a raw reward-model score is often negative, and dividing a
  negative mean by (1 + beta * NLL) would reward a high NLL. Both means are over the probe
  prompts every usable teacher answered with a quality and a learnability."""
  fields = ("quality", "learnability")
  cands = _usable(table, table.teachers, fields, "car")
  rows, cols = _shared(table, cands, fields, "car")
  q = minmax(table.quality[np.ix_(rows, cols)]).mean(0)
  nll = -table.learnability[np.ix_(rows, cols)].mean(0)
  return {t: float(q[n] / (1.0 + cfg.car_beta * nll[n])) for n, t in enumerate(cands)}


def car_teacher(table: ScoreTable, cfg: PolicyConfig) -> str:
  return _order(car_scores(table, cfg), cfg.seed, "car")[0]


def best_sample(records: Sequence[Mapping[str, Any]], seed: int = 0, field: str = "reward"
                ) -> list[Mapping[str, Any]]:
  """One record per (prompt id, teacher): the sample with the highest `scores[field]` (missing
  or NaN counts lowest), ties broken by the seeded hash of (prompt id, teacher, sample). With
  num_samples > 1 the reward averages the samples; this keeps the one the reward liked best.
  The records are returned as given, in the first-seen order of (prompt id, teacher)."""
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  for r in records:
    groups.setdefault((r["id"], r["teacher"]), []).append(r)

  def value(r) -> float:
    v = (r.get("scores") or {}).get(field)
    return -np.inf if v is None or not np.isfinite(v) else float(v)

  out = []
  for (i, t), rs in groups.items():
    top = max(value(r) for r in rs)
    tied = [r for r in rs if within_tie(value(r), top)]
    out.append(max(tied, key=lambda r: unit_hash(seed, "sample", i, t, r.get("sample", 0))))
  return out


def assign(policy: str, ids: Sequence[str], table: ScoreTable, cfg: PolicyConfig, *,
           families: Mapping[str, str] | None = None, student_family: str | None = None,
           routes: Mapping[str, str] | None = None,
           oracle_best: Mapping[str, str] | None = None) -> dict[str, str]:
  """Teacher per training prompt under `policy`.

  persyn: probe prompts keep their best teacher (argmax r), the rest follow the router (`routes`).
  oracle: Generate-then-Select on every prompt (`oracle_best` holds argmax r over all teachers,
  e.g. `best_teachers` on the full set's rewards).
  random: a uniformly random usable teacher per prompt.
  """
  if policy == "strong":
    t = strong_teacher(table, cfg)
    return {i: t for i in ids}
  if policy == "family_strong":
    t = family_strong_teacher(table, cfg, families or {}, student_family)
    return {i: t for i in ids}
  if policy == "car":
    t = car_teacher(table, cfg)
    return {i: t for i in ids}
  if policy == "mix":
    s = strong_teacher(table, cfg)
    w = mix_partner(table, cfg, s)
    return {i: s if unit_hash(cfg.seed, "mix", i) < cfg.mix_ratio else w for i in ids}
  if policy == "random":
    usable = _usable(table, table.teachers, ("quality",), "random")
    return {i: usable[int(unit_hash(cfg.seed, "random", i) * len(usable))] for i in ids}
  if policy == "persyn":
    best = table.best(cfg.seed)
    missing = [i for i in ids if i not in best and (routes is None or i not in routes)]
    if missing:
      raise ValueError(f"persyn: {len(missing)} prompts have neither a probe score nor a route "
                       f"(first: {missing[0]!r})")
    return {i: best[i] if i in best else routes[i] for i in ids}
  if policy == "oracle":
    if oracle_best is None:
      raise ValueError("oracle needs every teacher's scored response on every prompt")
    return {i: oracle_best[i] for i in ids}
  raise ValueError(f"unknown policy {policy!r}; policies: {', '.join(POLICIES)}")


def shares(assignment: Mapping[str, str], teachers: Sequence[str]) -> dict[str, float]:
  n = max(len(assignment), 1)
  counts = {t: 0 for t in teachers}
  for t in assignment.values():
    counts[t] += 1
  return {t: c / n for t, c in counts.items()}
