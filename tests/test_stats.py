"""The report's statistics (persyn_jax/report/stats.py) against brute-force references: the exact
bootstrap distribution of small samples, an index-drawing bootstrap written out in a loop, known
cases, coverage over simulated data, and what pairing buys."""
import itertools

import numpy as np
import pytest

from persyn_jax.report import stats


def exact_bootstrap(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Every one of the n**n index draws of a bootstrap of x: (its mean, its probability)."""
  n = len(x)
  means = np.array([x[list(idx)].mean() for idx in itertools.product(range(n), repeat=n)])
  return means, np.full(len(means), 1.0 / len(means))


def loop_bootstrap(a, b, resamples, seed):
  """The textbook paired bootstrap: draw indices, take both policies on them, one resample at a
  time."""
  rng = np.random.default_rng(seed)
  d = []
  for _ in range(resamples):
    idx = rng.integers(0, len(a), len(a))
    d.append(a[idx].mean() - b[idx].mean())
  return np.quantile(d, [0.025, 0.975])


def test_the_resampled_means_follow_the_exact_bootstrap_distribution():
  x = np.array([0.0, 1.0, 1.0, 0.5, 0.0])
  means, prob = exact_bootstrap(x)
  counts = stats.resample_counts(len(x), 40000, np.random.default_rng(1))
  mc = stats.bootstrap_means(x[None], counts)[0]
  assert mc.mean() == pytest.approx((means * prob).sum(), abs=0.003)
  assert mc.std() == pytest.approx(np.sqrt(((means - x.mean()) ** 2 * prob).sum()), rel=0.02)
  # the interval's ends: the exact distribution's 2.5% and 97.5% points, up to one atom (0.1)
  order = np.argsort(means)
  cdf = np.cumsum(prob[order])
  exact = means[order][np.searchsorted(cdf, 0.025)], means[order][np.searchsorted(cdf, 0.975)]
  lo, hi = stats.percentile_interval(mc)
  assert abs(lo - exact[0]) <= 0.1 + 1e-9 and abs(hi - exact[1]) <= 0.1 + 1e-9


def test_the_paired_interval_matches_a_loop_over_drawn_indices():
  rng = np.random.default_rng(0)
  b = (rng.random(400) < 0.6).astype(float)
  a = np.where(rng.random(400) < 0.1, 1 - b, b)  # a flips 10% of b's answers
  d, (lo, hi) = stats.delta_interval(a, b, resamples=4000, seed=3)
  ref = loop_bootstrap(a, b, 4000, seed=11)  # other draws: equal up to Monte Carlo error
  assert d == pytest.approx(a.mean() - b.mean())
  assert lo == pytest.approx(ref[0], abs=0.006) and hi == pytest.approx(ref[1], abs=0.006)


def test_known_cases():
  same = np.array([[1, 0, 1, 1, 0, 1.0]])
  out = stats.compare({"strong": same, "persyn": same}, resamples=500)
  p = out["policies"]["persyn"]
  assert p["delta"] == 0 and p["delta_ci"] == [0.0, 0.0] and not p["significant"]
  const = stats.compare({"strong": np.ones((2, 50)), "x": np.zeros((2, 50))}, resamples=500)
  x = const["policies"]["x"]
  assert x["ci"] == [0.0, 0.0] and x["delta_ci"] == [-1.0, -1.0] and x["significant"]
  assert const["policies"]["strong"]["ci"] == [1.0, 1.0] and "delta" not in const["policies"]["strong"]


def test_a_policy_whose_every_answer_is_strongs_gets_exactly_strongs_interval_and_zero_delta():
  """eval's same_as twin (car trained on strong's very data): the same correctness as strong, beside
  other policies and averaged over seeds. Its difference is 0 on every resample, so its interval
  is [0, 0] exactly (not +-1e-16 of a matrix product's rounding), and its own interval is
  strong's."""
  rng = np.random.default_rng(0)
  strong = (rng.random((3, 200)) < 0.7).astype(float)
  c = {"base_student": rng.random((1, 200)) < 0.5, "persyn": rng.random((3, 200)) < 0.6,
       "strong": strong, "car": strong.copy(), "mix": rng.random((3, 200)) < 0.6}
  out = stats.compare(c, kinds=["a", "b"] * 100)
  blocks = [out["policies"]] + list(out["by_kind"].values())
  for b in blocks:
    assert b["car"]["delta"] == 0 and b["car"]["delta_ci"] == [0.0, 0.0]
    assert not b["car"]["significant"] and b["car"]["ci"] == b["strong"]["ci"]
  # a policy's own interval does not depend on which other policies are compared beside it
  alone = stats.compare({"strong": strong, "persyn": c["persyn"]})["policies"]["persyn"]
  assert alone["ci"] == out["policies"]["persyn"]["ci"]
  assert stats.delta_interval(strong.mean(0), strong.mean(0))[1] == (0.0, 0.0)


def test_seeds_are_averaged_per_problem_and_their_spread_reported():
  c = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0.0]])  # 3 seeds x 4 problems
  out = stats.compare({"strong": c}, baseline=None, resamples=100)["policies"]["strong"]
  assert out["accuracy"] == pytest.approx(0.5) and out["seeds"] == 3
  assert out["seed_scores"] == [0.5, 0.25, 0.75]
  assert out["seed_sd"] == pytest.approx(0.25)
  half = 4.302652729749464 * 0.25 / np.sqrt(3)  # scipy.stats.t.ppf(0.975, 2)
  assert out["seed_ci"] == pytest.approx([0.5 - half, 0.5 + half], rel=1e-12)


@pytest.mark.parametrize("seeds", [2, 3, 5, 12, 31, 32, 45])
def test_the_seed_interval_is_scipys_t_interval(seeds):
  """Student's t at seeds - 1 degrees of freedom, exactly (not a 3-digit table, nor the normal's
  1.96 past 30 degrees of freedom)."""
  import scipy.stats as scipy_stats  # jax's own dependency: always installed
  x = np.random.default_rng(seeds).uniform(0.5, 0.8, seeds)
  want = scipy_stats.t.interval(0.95, seeds - 1, loc=x.mean(), scale=scipy_stats.sem(x))
  assert stats.seed_interval(x) == pytest.approx(want, rel=1e-12)
  for df in (1, 2, seeds, 100):
    assert stats.t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-12)


def test_intervals_are_seeded():
  rng = np.random.default_rng(5)
  c = {"strong": rng.random((3, 80)) < 0.5, "persyn": rng.random((3, 80)) < 0.6}
  assert stats.compare(c, seed=7) == stats.compare(c, seed=7)
  assert stats.compare(c, seed=7) != stats.compare(c, seed=8)


def test_the_paired_interval_covers_the_true_difference_about_95_percent_of_the_time():
  rng = np.random.default_rng(0)
  hits, trials, n = 0, 300, 300
  for t in range(trials):
    # per problem a difficulty; strong solves with p, the other policy with p + 0.05 (truth 0.05)
    p = rng.uniform(0.2, 0.8, n)
    u = rng.random(n)
    b, a = (u < p).astype(float), (u < p + 0.05).astype(float)
    # the truth: the expected difference over the problem distribution
    _, (lo, hi) = stats.delta_interval(a, b, resamples=1000, seed=t)
    hits += lo <= 0.05 <= hi
  assert 0.90 <= hits / trials <= 0.99


def test_pairing_narrows_the_interval_when_policies_fail_on_the_same_problems():
  rng = np.random.default_rng(2)
  b = (rng.random(500) < 0.6).astype(float)
  a = np.where(rng.random(500) < 0.05, 1 - b, b)
  _, paired = stats.delta_interval(a, b, seed=0)
  _, unpaired = stats.delta_interval(a, b, paired=False, seed=0)
  assert (paired[1] - paired[0]) < 0.4 * (unpaired[1] - unpaired[0])
  # independent policies: pairing changes little
  c = (rng.random(500) < 0.6).astype(float)
  _, p2 = stats.delta_interval(c, b, seed=0)
  _, u2 = stats.delta_interval(c, b, paired=False, seed=0)
  assert (p2[1] - p2[0]) == pytest.approx(u2[1] - u2[0], rel=0.2)


def test_per_kind_blocks_use_only_that_kinds_problems():
  strong = np.array([[1, 1, 1, 0, 0, 0.0]])
  other = np.array([[1, 1, 1, 1, 1, 1.0]])
  out = stats.compare({"strong": strong, "x": other}, kinds=["a"] * 3 + ["b"] * 3, resamples=300)
  assert out["by_kind"]["a"]["x"]["delta"] == 0 and not out["by_kind"]["a"]["x"]["significant"]
  assert out["by_kind"]["b"]["x"]["delta_ci"] == [1.0, 1.0] and out["by_kind"]["b"]["x"]["significant"]


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="same non-zero number of problems"):
    stats.compare({"strong": np.ones((1, 3)), "x": np.ones((1, 4))})
  with pytest.raises(ValueError, match="2 kinds for 3 problems"):
    stats.compare({"strong": np.ones((1, 3))}, kinds=["a", "b"])
