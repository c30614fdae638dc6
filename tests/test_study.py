"""The teacher study: gains per teacher and category, and how each reward signal predicts them."""
import json
import math
import os

import numpy as np
import pytest
import scipy.stats

from persyn_jax import config as C
from persyn_jax import policies as pol
from persyn_jax.data import shards
from persyn_jax.report.study import study_markdown
from persyn_jax.stages import Run
from persyn_jax.stages.study import agreement, best_set, by_category, compare_signal, spearman

from test_pipeline import explicit_config


@pytest.mark.parametrize("x, y", [([1, 2, 3, 4], [2, 1, 4, 3]), ([0.1, 0.1, 0.5, 0.2], [3, 1, 2, 2]),
                                  ([5, 4, 3, 2], [1, 2, 3, 4])])
def test_spearman_matches_scipy(x, y):
  assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)


def test_spearman_is_undefined_for_a_constant_side():
  assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
  assert math.isnan(spearman([1, float("nan")], [1, 2]))


def test_agreement_counts_ties_as_a_random_pick():
  gain = {"A": 0.2, "B": 0.1, "C": 0.2}
  assert best_set(gain) == ["A", "C"]
  # ties as the policies see them (policies.within_tie: TIE_TOL relative to the size, at least
  # absolute): z-scored means above 1 tie within 1e-6 of their size
  near = {"A": 3.0, "B": 3.0 - 2.5e-6, "C": 3.0 - 4e-6, "D": 0.5}
  assert best_set(near) == [t for t in near if pol.within_tie(near[t], 3.0)] == ["A", "B"]
  assert best_set({"A": 0.5, "B": 0.5 - 9e-7, "C": 0.5 - 2e-6}) == ["A", "B"]
  assert agreement({"A": 1.0, "B": 0.0, "C": 0.5}, gain) == 0.5   # A is one of 2 best by gain
  assert agreement({"A": 0.0, "B": 1.0, "C": 0.5}, gain) == 0.0
  assert agreement({"A": 1.0, "B": 1.0, "C": 1.0}, gain) == pytest.approx(2 / 6)


def test_compare_signal_per_category_and_overall():
  gains = {"A": {"x": 0.3, "y": -0.1}, "B": {"x": 0.1, "y": 0.2}, "C": {"x": 0.0, "y": 0.1}}
  means = {"A": {"x": 0.9, "y": 0.9}, "B": {"x": 0.5, "y": 0.1}, "C": {"x": 0.1, "y": 0.5}}
  out = compare_signal(means, gains, ["x", "y"])
  assert out["by_category"]["x"] == {"best": ["A"], "agreement": 1.0, "rank_correlation": 1.0}
  assert out["by_category"]["y"]["best"] == ["A"] and out["by_category"]["y"]["agreement"] == 0.0
  assert out["by_category"]["y"]["rank_correlation"] == pytest.approx(-1.0)  # ranks reversed
  assert out["agreement"] == 0.5 and out["rank_correlation"] == pytest.approx(0.0)


def test_signals_normalize_each_sample_as_the_score_stage_does():
  """With several samples per teacher, a signal is the mean of the per-response normalized values
  (the score stage's reward, which the policies average): it normalized each teacher's mean
  instead, which differs for min-max."""
  from persyn_jax.stages.study import signal_matrix
  q = {("p0", "A"): [1.0, 0.0], ("p0", "B"): [0.6, 0.6], ("p0", "C"): [0.2, 0.9],
       ("p1", "A"): [0.0, 0.0], ("p1", "B"): [1.0, 0.5], ("p1", "C"): [0.3, 0.3]}
  learn = {k: [-v[0] - 1.0, -2.0 * v[1]] for k, v in q.items()}
  records = [{"id": i, "teacher": t, "sample": s, "scores": {"quality": q[(i, t)][s],
                                                             "learnability": learn[(i, t)][s]}}
             for (i, t) in q for s in (0, 1)]
  for alpha in (0.0, 0.4, 1.0):
    ids, got = signal_matrix(records, ["A", "C"], alpha, "minmax")
    assert ids == ["p0", "p1"]
    for r, i in enumerate(ids):  # numpy from the definition: min-max over the prompt's responses
      cells = [(t, s) for t in "ABC" for s in (0, 1)]
      qq = np.array([q[(i, t)][s] for t, s in cells])
      ll = np.array([learn[(i, t)][s] for t, s in cells])
      mm = lambda v: (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else v * 0 + 0.5
      reward = dict(zip(cells, (1 - alpha) * mm(qq) + alpha * mm(ll)))
      for j, t in enumerate(["A", "C"]):
        assert got[r, j] == pytest.approx((reward[(t, 0)] + reward[(t, 1)]) / 2, abs=1e-12)


def test_accuracy_by_category():
  rows = [{"id": "1", "correct": 1.0}, {"id": "2", "correct": 0.0}, {"id": "3", "correct": 1.0}]
  assert by_category(rows, {"1": "a", "2": "a", "3": "b"}) == {"a": 0.5, "b": 1.0,
                                                                "all": pytest.approx(2 / 3)}


@pytest.fixture(scope="module")
def study_run(tiny_world, tmp_path_factory):
  """probe, score and the study on the tiny world: two teachers, two SFT steps each."""
  cfg = explicit_config(tiny_world, tmp_path_factory.mktemp("study"), sets=[
      "study.enabled=true", "study.teachers=[stepwise-Q,sloppy-Q]", "study.eval=12",
      "sft.max_steps=2"])
  logs = []
  Run(cfg, log=logs.append).run(stages=("probe", "score", "study"))
  return cfg, logs


def test_study_measures_each_teacher_and_compares_the_rewards(study_run):
  cfg, logs = study_run
  d = os.path.join(cfg.out_dir, "study")
  s = json.load(open(os.path.join(d, "study.json")))
  assert s["teachers"] == ["stepwise-Q", "sloppy-Q"] and s["eval_prompts"] == 12
  assert os.path.getsize(os.path.join(d, "gain.png")) > 0
  acc = s["accuracy"]
  for t in s["teachers"]:
    assert s["probe_examples"][t] == cfg.prompts.probe
    for k in s["categories"]:
      assert s["gain"][t][k] == pytest.approx(acc[t][k] - acc["base_student"][k])
    # each studied student's answers were scored: its accuracy is the share of right answers
    assert 0.0 <= acc[t]["all"] <= 1.0
  for k in s["categories"]:
    assert s["best_by_gain"][k] == best_set({t: s["gain"][t][k] for t in s["teachers"]})
  # the signals' per-kind means, recomputed from the score stage's records (min-max per prompt)
  recs = list(shards.read_records(os.path.join(cfg.out_dir, "score"), "score"))
  kinds = {json.loads(l)["id"]: json.loads(l)["kind"] for l in open(cfg.prompts.source.path)}
  q = {(r["id"], r["teacher"]): r["scores"]["quality"] for r in recs}
  ids = sorted({r["id"] for r in recs})
  for k in s["categories"]:
    rows = [i for i in ids if kinds[i] == k]
    everyone = [t.name for t in cfg.teachers]  # normalized across all teachers, as the reward is
    mat = np.array([[q[(i, t)] for t in everyone] for i in rows], np.float64)
    lo, hi = mat.min(1, keepdims=True), mat.max(1, keepdims=True)
    norm = np.where(hi > lo, (mat - lo) / np.where(hi > lo, hi - lo, 1), 0.5)
    for t in cfg.study.teachers:
      want = norm[:, everyone.index(t)].mean()
      assert s["signals"]["quality"]["mean"][t][k] == pytest.approx(want)
  assert s["signals"]["combined"]["alpha"] == cfg.scoring.alpha
  md = study_markdown(s, "gain.png")
  assert "| stepwise-Q |" in md and "![study gains](gain.png)" in md


def test_a_disabled_study_does_nothing(tiny_world, tmp_path):
  cfg = explicit_config(tiny_world, tmp_path)
  from persyn_jax.stages.context import Context
  from persyn_jax.stages.study import run
  assert run(Context(cfg, log=lambda m: None)) == {"enabled": False}
  assert not os.path.exists(os.path.join(cfg.out_dir, "study"))


def test_study_config_rejects_a_negative_count():
  from persyn_jax.run_config import StudyConfig
  with pytest.raises(ValueError, match="study.eval=-1"):
    C.from_dict(StudyConfig, {"eval": -1})


def test_preflight_names_the_study_problems_before_any_work(tiny_world, tmp_path):
  from persyn_jax.preflight import problems
  cfg = explicit_config(tiny_world, tmp_path, sets=["study.enabled=true",
                                                    "study.teachers=[nobody]", "eval.verifier=null"])
  found = problems(cfg, ("probe", "score", "study"))
  assert any("study.teachers: ['nobody'] are not teachers" in p for p in found)
  assert any("study.enabled needs eval.verifier" in p for p in found)
  assert problems(explicit_config(tiny_world, tmp_path, sets=["study.enabled=true"]),
                  ("probe", "score", "study")) == []


def test_study_config_rejects_negative_epochs():
  from persyn_jax.run_config import StudyConfig
  with pytest.raises(ValueError, match="study.epochs=-2"):
    C.from_dict(StudyConfig, {"epochs": -2})
