"""Pure sampling math on a batch of fp32 logits [B, V]: temperature, top-k, top-p, and the draw.

Top-k and top-p are exact without sorting the vocabulary: each is a threshold found by a radix
search on the float bit patterns (`_radix_threshold`). A sort of [B, 128k] per decode step costs
more than the rest of the step on a GPU; eight fused passes over the logits cost a few percent.
top-p first looks for its threshold among each row's top K tokens (`TOP_P_PREFILTER`), which
is exact when they hold p of the mass, and runs the radix search only when some row's do not.
The random key of a row depends only on (seed, prompt index, sample index, step), so a row's draws
do not depend on what else is in its batch, on its bucket, or on the mesh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
_RADIX_BITS = 4  # 15 candidate thresholds per pass, 8 passes over the 32 key bits


def row_keys(seed: Array | int, prompt_index: Array, sample_index: Array) -> Array:
  """One typed PRNG key per row: fold_in(fold_in(key(seed), prompt_index), sample_index)."""
  base = jax.random.key(jnp.asarray(seed, jnp.uint32))
  fold = jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(base, p), s))
  return fold(jnp.asarray(prompt_index, jnp.uint32), jnp.asarray(sample_index, jnp.uint32))


def step_keys(keys: Array, step: Array | int) -> Array:
  """The keys of decode step `step` (0 = the token sampled from the prompt's logits)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, jnp.asarray(step, jnp.uint32)))(keys)


def _ordered_key(x: Array) -> Array:
  """uint32 whose unsigned order is the float32 order of `x` (sign-magnitude to two's offset);
  -0.0 maps to +0.0's key, since the two compare equal (a tie at the k-th value)."""
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
  sign = bits >> 31
  return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


def _radix_threshold(keys: Array, weights: Array, target: Array) -> Array:
  """Per row, the largest uint32 t with sum(weights[keys >= t]) >= target; keys, weights [B, V].

  The masked sum is monotone in t, so t is built from its top bits down, `_RADIX_BITS` per pass;
  each pass is one read of [B, V] (XLA fuses the compare-and-sum over the candidate axis).
  Assumes sum(weights) >= target (t = 0 always qualifies).
  """
  B = keys.shape[0]
  digits = jnp.arange(1, 2 ** _RADIX_BITS, dtype=jnp.uint32)

  def one_pass(i, t):
    shift = jnp.uint32(32 - _RADIX_BITS) - jnp.uint32(_RADIX_BITS) * i.astype(jnp.uint32)
    cands = t[:, None] | (digits[None, :] << shift)                      # [B, C]
    # [B, C, V] summed over the minor axis: a row reduction, XLA's fastest kind; never stored
    mass = jnp.sum(jnp.where(keys[:, None, :] >= cands[:, :, None], weights[:, None, :], 0),
                   axis=2)                                               # [B, C]
    # mass falls as the digit grows, so the qualifying digits are a prefix 1..n
    n = jnp.sum(mass >= target[:, None], axis=1).astype(jnp.uint32)
    return t | (n << shift)

  # a rolled loop: one compiled pass instead of eight (compile time), same work
  return jax.lax.fori_loop(0, 32 // _RADIX_BITS, one_pass, jnp.zeros((B,), jnp.uint32))


def top_k_mask(logits: Array, k: int) -> Array:
  """True where a logit is >= the k-th largest of its row (ties at the k-th value are kept, as in
  transformers' TopKLogitsWarper)."""
  keys = _ordered_key(logits)
  target = jnp.full((logits.shape[0],), k, jnp.float32)
  t = _radix_threshold(keys, jnp.ones(logits.shape, jnp.float32), target)
  return keys >= t[:, None]


TOP_P_PREFILTER = 128  # candidates kept by the top-k prefilter of top_p_mask (0 = off)


def _nucleus_threshold_full(probs: Array, target: Array) -> Array:
  """[B] uint32: the radix-search threshold over the whole vocabulary (probabilities >= 0, so
  their bit patterns order like their values)."""
  return _radix_threshold(jax.lax.bitcast_convert_type(probs, jnp.uint32), probs, target)


def top_p_mask(logits: Array, p: float, prefilter: int = TOP_P_PREFILTER) -> Array:
  """True on the nucleus: token j is kept when the probability mass of tokens strictly more likely
  than j is < p (the most likely token is always kept; tokens tied with the last kept one too).

  The threshold is the largest probability t with mass(prob >= t) >= p. With `prefilter` = K
  (0 < K < V) it is read off the K most likely tokens of each row (jax.lax.top_k and a cumulative
  sum over K, instead of eight passes over V); that is the same t whenever those K tokens hold at
  least p of the mass, since t is then one of them. When some row's top K hold less than p (a very
  flat distribution), the step falls back to the full-vocabulary radix search for the whole batch,
  so the result is always the exact nucleus. The only difference between the two paths is the
  order in which fp32 masses are summed: a row whose cumulative mass lands within rounding
  (~1e-7) of p may keep one token more or less on one path than on the other.
  """
  probs = jax.nn.softmax(logits, axis=-1)
  # fp32 round-off can leave the total mass a hair under p when p is close to 1
  target = jnp.minimum(jnp.full((logits.shape[0],), p, jnp.float32), jnp.sum(probs, axis=-1))
  if not 0 < prefilter < logits.shape[-1]:
    return probs >= _bits_to_prob(_nucleus_threshold_full(probs, target))[:, None]
  top, _ = jax.lax.top_k(probs, prefilter)                 # [B, K], most likely first
  mass = jnp.cumsum(top, axis=-1)
  first = jnp.argmax(mass >= target[:, None], axis=-1)     # the first token that reaches p
  t_top = jnp.take_along_axis(top, first[:, None], axis=1)[:, 0]
  covered = jnp.all(mass[:, -1] >= target)
  t = jax.lax.cond(covered, lambda: t_top,
                   lambda: _bits_to_prob(_nucleus_threshold_full(probs, target)))
  return probs >= t[:, None]


def _bits_to_prob(t: Array) -> Array:
  return jax.lax.bitcast_convert_type(t, jnp.float32)


def filter_logits(logits: Array, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  top_p_prefilter: int = TOP_P_PREFILTER) -> Array:
  """fp32 logits / temperature with the tokens outside top-k, then outside the nucleus, at -inf
  (the order of transformers' warpers: temperature, top-k, top-p). temperature must be > 0."""
  x = logits.astype(jnp.float32) / jnp.float32(temperature)
  V = x.shape[-1]
  if 0 < top_k < V:
    x = jnp.where(top_k_mask(x, top_k), x, -jnp.inf)
  if 0.0 < top_p < 1.0:
    x = jnp.where(top_p_mask(x, top_p, top_p_prefilter), x, -jnp.inf)
  return x


def first_argmax(x: Array) -> Array:
  """jnp.argmax(x, axis=-1) as int32: the first index of each row's largest value, NaN counting
  as the largest (as in jnp.argmax). On CPU it is a max, then a min over the indices that reach
  it: XLA:CPU lowers argmax to a variadic (value, index) reduction that runs about 6x slower than
  these two plain ones ([16, 8192] fp32: 290 against 50 us a step). Elsewhere jnp.argmax (one
  pass over the logits)."""
  if jax.default_backend() != "cpu":
    return jnp.argmax(x, axis=-1).astype(jnp.int32)
  top = jnp.max(x, axis=-1, keepdims=True)
  idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where((x == top) | jnp.isnan(x), idx, x.shape[-1]), axis=-1)


def draw(keys: Array, x: Array) -> Array:
  """One token per row of x [B, V] by the Gumbel-max trick, with each row's own key: the draws of
  jax.vmap(jax.random.categorical)(keys, x), bit for bit (argmax of the row's Gumbel noise plus
  its logits), with first_argmax for the argmax."""
  noise = jax.vmap(lambda k: jax.random.gumbel(k, x.shape[1:], x.dtype))(keys)
  return first_argmax(noise + x)


def sample(logits: Array, keys: Array, temperature: float, top_k: int = 0,
           top_p: float = 1.0, top_p_prefilter: int = TOP_P_PREFILTER) -> Array:
  """Next token ids [B] (int32) from logits [B, V] and one key per row; greedy (first argmax)
  when temperature == 0."""
  if temperature == 0.0:
    return first_argmax(logits)
  x = filter_logits(logits, temperature, top_k, top_p, top_p_prefilter)
  return draw(keys, x)
