"""The sampling math on fixed logits: exact top-k / top-p sets, and the draws' distribution.

References are computed independently in numpy (float64, by sorting), not with the code under test.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persyn_jax.sampling import logits as L


def nucleus_ref(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """Probabilities after temperature, top-k, top-p (transformers' order), by sorting, float64."""
  x = logits.astype(np.float64) / temperature
  if 0 < top_k < x.size:
    x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)
  p = np.exp(x - x.max())
  p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p, kind="stable")
    mass_before = np.cumsum(p[order]) - p[order]
    keep = np.zeros(p.size, bool)
    keep[order[mass_before < top_p]] = True
    keep |= p >= p[order[mass_before < top_p]].min()  # ties with the last kept token stay
    p = np.where(keep, p, 0)
    p /= p.sum()
  return p


def chi2_pvalue(counts: np.ndarray, expected_p: np.ndarray) -> float:
  from scipy import stats
  keep = expected_p > 0
  n = counts.sum()
  return float(stats.chisquare(counts[keep], expected_p[keep] * n).pvalue)


@pytest.fixture(scope="module")
def logits():
  # a fixed, peaked-and-tailed distribution over 24 tokens, with two exact ties
  rng = np.random.default_rng(1234)
  x = rng.normal(size=24).astype(np.float32) * 1.5
  x[3] = x[7] = 2.0
  return x


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 6, 1.0), (1.3, 0, 0.8), (0.7, 10, 0.9), (1.0, 2, 1.0)])
def test_draws_follow_the_filtered_softmax(logits, temperature, top_k, top_p):
  n = 40000
  keys = L.row_keys(7, jnp.arange(n), jnp.zeros(n, jnp.int32))
  draw = jax.jit(lambda k, x: L.sample(x, k, temperature, top_k, top_p))
  toks = np.asarray(draw(keys, jnp.broadcast_to(jnp.asarray(logits), (n, logits.size))))
  counts = np.bincount(toks, minlength=logits.size)
  ref = nucleus_ref(logits, temperature, top_k, top_p)
  assert counts[ref == 0].sum() == 0, "a filtered-out token was drawn"
  # at a fixed seed this is deterministic; a wrong temperature or filter gives p < 1e-10 here
  assert chi2_pvalue(counts, ref) > 1e-3, (counts, np.round(ref * n))


def test_chi_square_detects_a_wrong_temperature(logits):
  """The test above can fail: draws at T=1 do not pass as draws at T=0.7."""
  n = 40000
  keys = L.row_keys(7, jnp.arange(n), jnp.zeros(n, jnp.int32))
  toks = np.asarray(L.sample(jnp.broadcast_to(jnp.asarray(logits), (n, logits.size)), keys, 1.0))
  counts = np.bincount(toks, minlength=logits.size)
  assert chi2_pvalue(counts, nucleus_ref(logits, 0.7, 0, 1.0)) < 1e-6


def test_top_k_and_top_p_masks_are_exact_with_ties():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(16, 300)) * 3).astype(np.float32)
  x[0, :5] = x[0].max() + 1  # a five-way tie at the top
  x[1, :] = -np.inf
  x[1, [3, 7]] = [1.0, 0.5]  # most of the row already filtered
  x[2] = np.round(x[2])  # many ties everywhere
  for k in (1, 2, 5, 50, 299):
    ref = x >= np.sort(x, axis=1)[:, ::-1][:, k - 1:k]
    got = np.asarray(L.top_k_mask(jnp.asarray(x), k))
    np.testing.assert_array_equal(got, ref, err_msg=f"k={k}")
  probs = np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1)).astype(np.float64)
  for p in (0.01, 0.5, 0.9, 0.95):
    # kept iff the mass of strictly more likely tokens is < p
    ref = np.stack([[row[row > v].sum() < p for v in row] for row in probs])
    got = np.asarray(L.top_p_mask(jnp.asarray(x), p))
    np.testing.assert_array_equal(got, ref, err_msg=f"p={p}")


def test_top_k_keeps_a_signed_zero_tied_with_the_kth_value():
  """-0.0 == +0.0: a zero at the k-th value keeps the other zeros, whatever their sign, as
  transformers' TopKLogitsWarper (scores < k-th value removed) and numpy's sort do."""
  import torch
  from transformers.generation.logits_process import TopKLogitsWarper
  x = np.array([[1.0, 0.0, -0.0, -1.0, 0.5, -0.0],
                [1.0, -0.0, 0.0, -1.0, 0.5, 0.0],
                [-0.0, -0.0, 2.0, -3.0, -0.0, 0.0]], np.float32)
  for k in (1, 2, 3, 4):
    ref = x >= np.sort(x, axis=1)[:, ::-1][:, k - 1:k]
    hf = np.isfinite(TopKLogitsWarper(k)(None, torch.from_numpy(x)).numpy())
    np.testing.assert_array_equal(hf, ref, err_msg=f"k={k}")
    np.testing.assert_array_equal(np.asarray(L.top_k_mask(jnp.asarray(x), k)), ref,
                                  err_msg=f"k={k}")


def test_greedy_is_the_first_argmax():
  x = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 0.0, 5.0]])
  keys = L.row_keys(0, jnp.arange(2), jnp.zeros(2, jnp.int32))
  np.testing.assert_array_equal(np.asarray(L.sample(x, keys, 0.0)), [1, 0])


def test_row_keys_depend_only_on_seed_prompt_and_sample():
  a = L.row_keys(3, jnp.asarray([5, 9]), jnp.asarray([0, 1]))
  b = L.row_keys(3, jnp.asarray([9, 1, 5]), jnp.asarray([1, 0, 0]))
  data = lambda k: np.asarray(jax.random.key_data(k))
  np.testing.assert_array_equal(data(a[0]), data(b[2]))
  np.testing.assert_array_equal(data(a[1]), data(b[0]))
  assert not np.array_equal(data(a[0]), data(L.row_keys(4, jnp.asarray([5]), jnp.asarray([0]))[0]))


def _nucleus_ref_rows(x: np.ndarray, p: float) -> np.ndarray:
  """Kept iff the mass of strictly more likely tokens is < p (float64, per row, no sorting of the
  code under test)."""
  probs = np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1)).astype(np.float64)
  return np.stack([[row[row > v].sum() < p for v in row] for row in probs])


@pytest.mark.parametrize("prefilter", [8, 64, 256])
def test_top_p_prefilter_keeps_the_full_vocabulary_nucleus(prefilter):
  """The top-k prefilter changes how the threshold is found, never the kept set: peaked rows
  (top K covers p), flat rows (it does not: the radix fallback) and a mix in one batch."""
  rng = np.random.default_rng(prefilter)
  V = 1000
  peaked = (rng.standard_normal((6, V)) * 4).astype(np.float32)
  flat = (rng.standard_normal((3, V)) * 0.05).astype(np.float32)  # top K mass ~ K / V < p
  flat[0, :] = 0.0  # exactly uniform: every token tied
  for x in (peaked, flat, np.concatenate([peaked[:3], flat])):
    for p in (0.05, 0.5, 0.9, 0.99):
      full = np.asarray(L.top_p_mask(jnp.asarray(x), p, prefilter=0))
      got = np.asarray(jax.jit(lambda x: L.top_p_mask(x, p, prefilter))(jnp.asarray(x)))
      np.testing.assert_array_equal(got, full, err_msg=f"K={prefilter} p={p}")
      np.testing.assert_array_equal(got, _nucleus_ref_rows(x, p), err_msg=f"K={prefilter} p={p}")


def test_top_p_prefilter_covers_p_on_peaked_rows_and_not_on_flat_ones():
  """The two regimes of the test above really occur (the fallback is exercised, not assumed)."""
  rng = np.random.default_rng(3)
  K, p = 64, 0.9
  for scale, covers in ((4.0, True), (0.05, False)):
    x = jnp.asarray(rng.standard_normal((4, 1000)) * scale, jnp.float32)
    top_mass = np.asarray(jnp.sum(jax.lax.top_k(jax.nn.softmax(x, axis=-1), K)[0], axis=-1))
    assert bool(np.all(top_mass >= p)) == covers, top_mass


def test_sampling_with_and_without_the_prefilter_draws_the_same_tokens():
  rng = np.random.default_rng(11)
  x = jnp.asarray(np.concatenate([rng.standard_normal((5, 500)) * 3,
                                  rng.standard_normal((3, 500)) * 0.1]), jnp.float32)
  keys = L.row_keys(1, jnp.arange(8), jnp.zeros(8, jnp.int32))
  a = L.sample(x, keys, 0.8, top_k=0, top_p=0.95, top_p_prefilter=32)
  b = L.sample(x, keys, 0.8, top_k=0, top_p=0.95, top_p_prefilter=0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_first_argmax_is_numpys_argmax_with_ties_nan_and_inf():
  """L.first_argmax (on CPU a max, then a min over the indices that reach it) against np.argmax:
  first index on ties, the first NaN when a row has one, 0 on a row of -inf, +-0 as equal."""
  rng = np.random.default_rng(3)
  x = rng.integers(-3, 4, (64, 37)).astype(np.float32)  # many ties
  x[5, [7, 20]] = np.nan
  x[6, :] = -np.inf
  x[7, :] = -1
  x[7, [2, 9]] = [-0.0, 0.0]
  x[8, :] = np.inf
  x[9, [3, 30]] = np.inf
  got = np.asarray(L.first_argmax(jnp.asarray(x)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
  assert got[5] == 7 and got[6] == 0 and got[7] == 2 and got[9] == 3
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
  # jitted, on the shape a sampler sees
  y = rng.standard_normal((16, 8192)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(L.first_argmax)(jnp.asarray(y))),
                                np.argmax(y, axis=-1))


def test_draw_is_jax_categorical_bit_for_bit():
  """L.draw (Gumbel noise + logits, first_argmax) gives vmap(jax.random.categorical)'s tokens for
  the same keys, on filtered (-inf) rows too."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((32, 300)).astype(np.float32) * 3)
  x = jnp.where(jnp.asarray(rng.random((32, 300)) < 0.7), -jnp.inf, x)
  for seed in range(5):
    keys = L.row_keys(seed, jnp.arange(32, dtype=jnp.uint32), jnp.zeros(32, jnp.uint32))
    want = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x)
    got = jax.jit(L.draw)(keys, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.all(np.isfinite(np.asarray(x)[np.arange(32), np.asarray(got)]))
