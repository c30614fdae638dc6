"""Routing policies: which teacher answers which prompt (PAPER.md, "Baselines").

Pure functions over the probe's score table. Every policy returns {prompt id: teacher name}
for the training prompts; randomness comes from a seeded hash of the prompt id, so a policy is
the same on every host and every rerun.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Sequence

import numpy as np

POLICIES = ("persyn", "strong", "family_strong", "mix", "car", "random", "oracle")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  strong: str | None = None         # None: the teacher with the highest mean quality on the probe set
  family_strong: str | None = None  # None: the strongest teacher of the student's family
  weak: str | None = None           # mix's weak teacher; None: the lowest mean quality
  mix_ratio: float = 0.5            # share of prompts that mix gives to the strong teacher (1:1)
  car_beta: float = 1.0             # CAR: mean quality / (1 + beta * mean student NLL)
  seed: int = 0

  def __post_init__(self):
    if not 0.0 <= self.mix_ratio <= 1.0:
      raise ValueError(f"policies.mix_ratio={self.mix_ratio} must be in [0, 1]")
    if self.car_beta < 0:
      raise ValueError(f"policies.car_beta={self.car_beta} must be >= 0")


@dataclasses.dataclass(frozen=True)
class ScoreTable:
  """Probe scores: rows are prompts, columns teachers (NaN where a teacher has no response)."""

  ids: tuple[str, ...]
  teachers: tuple[str, ...]
  quality: np.ndarray       # raw quality [P, k]
  learnability: np.ndarray  # mean student log-prob [P, k]
  reward: np.ndarray        # combined, normalized per prompt [P, k]

  def best(self) -> dict[str, str]:
    """The oracle teacher of each prompt: argmax of the combined reward (first on ties)."""
    r = np.where(np.isnan(self.reward), -np.inf, self.reward)
    return {i: self.teachers[int(j)] for i, j in zip(self.ids, r.argmax(1))}

  def mean_quality(self) -> dict[str, float]:
    return {t: float(np.nanmean(self.quality[:, j])) for j, t in enumerate(self.teachers)}

  def mean_nll(self) -> dict[str, float]:
    return {t: float(-np.nanmean(self.learnability[:, j])) for j, t in enumerate(self.teachers)}


def unit_hash(*parts) -> float:
  """A uniform number in [0, 1) from the parts (seeded, host-independent)."""
  h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
  return int.from_bytes(h[:8], "little") / 2.0**64


def strong_teacher(table: ScoreTable, cfg: PolicyConfig) -> str:
  if cfg.strong is not None:
    _check(cfg.strong, table.teachers, "policies.strong")
    return cfg.strong
  mq = table.mean_quality()
  return max(table.teachers, key=lambda t: (mq[t], -table.teachers.index(t)))


def weak_teacher(table: ScoreTable, cfg: PolicyConfig) -> str:
  if cfg.weak is not None:
    _check(cfg.weak, table.teachers, "policies.weak")
    return cfg.weak
  mq = table.mean_quality()
  return min(table.teachers, key=lambda t: (mq[t], table.teachers.index(t)))


def family_strong_teacher(table: ScoreTable, cfg: PolicyConfig, families: Mapping[str, str],
                          student_family: str | None) -> str:
  if cfg.family_strong is not None:
    _check(cfg.family_strong, table.teachers, "policies.family_strong")
    return cfg.family_strong
  same = [t for t in table.teachers if student_family and families.get(t) == student_family]
  if not same:
    raise ValueError(f"family_strong: no teacher of the student's family {student_family!r} "
                     f"(teacher families: {dict(families)}); set policies.family_strong")
  mq = table.mean_quality()
  return max(same, key=lambda t: (mq[t], -table.teachers.index(t)))


def car_teacher(table: ScoreTable, cfg: PolicyConfig) -> str:
  mq, nll = table.mean_quality(), table.mean_nll()
  score = {t: mq[t] / (1.0 + cfg.car_beta * nll[t]) for t in table.teachers}
  return max(table.teachers, key=lambda t: (score[t], -table.teachers.index(t)))


def _check(name, teachers, field):
  if name not in teachers:
    raise ValueError(f"{field}={name!r} is not a teacher; teachers: {list(teachers)}")


def assign(policy: str, ids: Sequence[str], table: ScoreTable, cfg: PolicyConfig, *,
           families: Mapping[str, str] | None = None, student_family: str | None = None,
           routes: Mapping[str, str] | None = None,
           oracle_best: Mapping[str, str] | None = None) -> dict[str, str]:
  """Teacher per training prompt under `policy`.

  persyn: probe prompts keep their best teacher (argmax r), the rest follow the router (`routes`).
  oracle: Generate-then-Select on every prompt (`oracle_best` holds argmax r over all teachers).
  """
  teachers = table.teachers
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
    s, w = strong_teacher(table, cfg), weak_teacher(table, cfg)
    return {i: s if unit_hash(cfg.seed, "mix", i) < cfg.mix_ratio else w for i in ids}
  if policy == "random":
    return {i: teachers[int(unit_hash(cfg.seed, "random", i) * len(teachers))] for i in ids}
  if policy == "persyn":
    best = table.best()
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
