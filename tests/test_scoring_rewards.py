"""The combined reward (the paper's Eq. 2): properties of the per-prompt normalizers, and records."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from persyn_jax import rewards, scoring

# Multiples of 1/8 in [-125, 125]: exact in binary, and equal values (ties) are common.
values = hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)),
                    elements=st.integers(-1000, 1000).map(lambda v: v / 8))
scales = st.lists(st.integers(1, 64).map(lambda v: v / 4), min_size=5, max_size=5)
shifts = st.lists(st.integers(-800, 800).map(lambda v: v / 8), min_size=5, max_size=5)


def affine(x, a, b):
  return x * np.asarray(a[:x.shape[0]])[:, None] + np.asarray(b[:x.shape[0]])[:, None]


@settings(max_examples=100, deadline=None)
@given(values)
def test_minmax_is_in_unit_interval_with_ends_and_flat_rows_at_half(x):
  y = rewards.minmax(x)
  assert np.all((y >= 0) & (y <= 1))
  for row, out in zip(x, y):
    if row.min() == row.max():
      assert np.all(out == 0.5)
    else:
      assert out[row.argmin()] == 0.0 and out[row.argmax()] == 1.0


@settings(max_examples=100, deadline=None)
@given(values, scales, shifts)
def test_minmax_and_zscore_ignore_a_per_prompt_positive_affine_map(x, a, b):
  for method in ("minmax", "zscore"):
    np.testing.assert_allclose(rewards.normalize(affine(x, a, b), method),
                               rewards.normalize(x, method), atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(values)
def test_zscore_rows_have_mean_zero_and_unit_std(x):
  y = rewards.zscore(x)
  np.testing.assert_allclose(y.mean(1), 0.0, atol=1e-9)
  for row, out in zip(x, y):
    assert np.isclose(out.std(), 0.0 if row.min() == row.max() else 1.0, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(values, scales, shifts)
def test_rank_is_invariant_to_increasing_maps_and_ties_share_a_rank(x, a, b):
  y = rewards.rank(x)
  np.testing.assert_allclose(rewards.rank(np.cbrt(affine(x, a, b))), y, atol=1e-12)
  assert np.all((y >= 0) & (y <= 1))
  for row, out in zip(x, y):
    for v in np.unique(row):
      assert np.ptp(out[row == v]) == 0  # equal scores, equal normalized value
    if row.size > 1:
      assert np.isclose(out.mean(), 0.5)  # average ranks of n items sum to n(n-1)/2


@settings(max_examples=100, deadline=None)
@given(values, st.sampled_from(["minmax", "zscore", "rank"]))
def test_missing_scores_stay_missing_and_do_not_move_the_others(x, method):
  if x.shape[1] < 2:
    return
  with_nan = x.copy()
  with_nan[:, 0] = np.nan
  y = rewards.normalize(with_nan, method)
  assert np.all(np.isnan(y[:, 0]))
  np.testing.assert_allclose(y[:, 1:], rewards.normalize(x[:, 1:], method), atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(values, values)
def test_combine_weights_quality_by_one_minus_alpha(q, l):
  if q.shape != l.shape:
    return
  np.testing.assert_allclose(rewards.combine(q, l, alpha=0.0), rewards.minmax(q))
  np.testing.assert_allclose(rewards.combine(q, l, alpha=1.0), rewards.minmax(l))
  r = rewards.combine(q, l)  # alpha = 0.4, minmax: a convex mix of two [0, 1] values
  np.testing.assert_allclose(r, 0.6 * rewards.minmax(q) + 0.4 * rewards.minmax(l))
  assert np.all((r >= 0) & (r <= 1))


def reference_norm(row, method):
  """One prompt's normalization from the definitions in docs/SCORING.md (NaN: left out)."""
  out, ok = np.full(row.shape, np.nan), ~np.isnan(row)
  x = row[ok]
  if x.size == 0:
    return out
  if method == "minmax":
    out[ok] = 0.5 if x.max() == x.min() else (x - x.min()) / (x.max() - x.min())
  elif method == "zscore":
    out[ok] = 0.0 if x.std() == 0 else (x - x.mean()) / x.std()
  else:  # average rank of ties, scaled to [0, 1]
    ranks = np.array([(x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])
    out[ok] = 0.5 if x.size == 1 else ranks / (x.size - 1)
  return out


@pytest.mark.parametrize("method", ["minmax", "zscore", "rank"])
def test_combine_leaves_a_response_missing_either_score_out_of_both_normalizations(method):
  nan = np.nan
  q = np.array([[1.0, 0.0, 10.0], [1.0, nan, 10.0], [-5.0, -2.5, -7.0], [2.0, 2.0, nan], [-3.0, nan, nan]])
  l = np.array([[-1.0, -0.5, nan], [-1.0, -0.5, -2.0], [-0.3, -1.1, -0.9], [-1.0, -1.0, -4.0],
                [-1.2, -0.7, nan]])
  want = []
  for qr, lr in zip(q, l):  # a response with a missing score is no candidate at all
    both = ~np.isnan(qr) & ~np.isnan(lr)
    qr, lr = np.where(both, qr, nan), np.where(both, lr, nan)
    want.append(0.6 * reference_norm(qr, method) + 0.4 * reference_norm(lr, method))
  got = rewards.combine(q, l, 0.4, method)
  np.testing.assert_allclose(got, want, atol=1e-12)
  # row 0: teacher C has quality 10 but no learnability; A (q 1, l -1) still beats B (q 0, l -0.5)
  if method == "minmax":
    np.testing.assert_allclose(got[0], [0.6, 0.4, nan])


def test_normalizer_examples():
  x = np.array([[1.0, 3.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
  np.testing.assert_allclose(rewards.minmax(x), [[0, 1, 0.5, 1], [0.5] * 4])
  np.testing.assert_allclose(rewards.rank(x), [[0, 2.5 / 3, 1 / 3, 2.5 / 3], [0.5] * 4])
  z = (x[0] - 2.25) / np.std(x[0])
  np.testing.assert_allclose(rewards.zscore(x), [z, [0.0] * 4])
  with pytest.raises(ValueError, match="normalizer 'softmax'"):
    rewards.normalize(x, "softmax")
  with pytest.raises(ValueError, match="alpha"):
    rewards.combine(x, x, alpha=-0.1)


def test_group_matrix_averages_samples_and_marks_missing():
  rows, cols, m = rewards.group_matrix(["p1", "p1", "p1", "p2"], ["A", "B", "A", "B"],
                                       [1.0, 2.0, 3.0, 4.0], ["A", "B", "C"])
  assert rows == ["p1", "p2"] and cols == ["A", "B", "C"]
  np.testing.assert_array_equal(m, [[2.0, 2.0, np.nan], [np.nan, 4.0, np.nan]])


class FakeStudent:
  """Learnability stand-in: minus the response length (the real one is tested against torch)."""

  def learnability(self, prompts, responses):
    return np.asarray([-float(len(r)) for r in responses]), {"pairs": len(responses)}


def test_score_records_with_a_verifier():
  recs = [
      {"id": "q1", "prompt": "2+2?", "teacher": "A", "response": "The answer is 4.", "reference": "4"},
      {"id": "q1", "prompt": "2+2?", "teacher": "B", "response": "It is 5", "reference": "4"},
      {"id": "q1", "prompt": "2+2?", "teacher": "C", "response": "so 2 + 2 = 4\n#### 4",
       "reference": "4"},
      {"id": "q2", "prompt": "3/4?", "teacher": "A", "response": r"\boxed{0.75}", "reference": "3/4"},
      {"id": "q2", "prompt": "3/4?", "teacher": "B", "response": "1", "reference": "3/4"},
  ]
  cfg = scoring.ScoringConfig(quality="verifier", verifier="math")
  out, stats = scoring.score_records(recs, cfg, student=FakeStudent())
  q = [o["scores"]["quality"] for o in out]
  assert q == [1.0, 0.0, 1.0, 1.0, 0.0]
  # q1: quality minmax [1, 0, 1]; learnability -16, -7, -19 -> minmax [0.25, 1, 0]
  r = [o["scores"]["reward"] for o in out]
  np.testing.assert_allclose(r[:3], [0.6 + 0.4 * 0.25, 0.4, 0.6])
  np.testing.assert_allclose(r[3:], [0.6 + 0.0, 0.4])  # learnability -12 vs -1
  assert stats["prompts"] == 2 and stats["unscored"] == 0
  ids, teachers, m = scoring.reward_matrix(out, ["A", "B", "C"])
  assert ids == ["q1", "q2"] and np.isnan(m[1, 2]) and m[0, 2] == pytest.approx(0.6)
  with pytest.raises(ValueError, match="no 'reference' field"):
    scoring.score_records([{k: v for k, v in recs[0].items() if k != "reference"}], cfg,
                          student=FakeStudent())
