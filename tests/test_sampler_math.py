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
