"""The chunked fp32 log-probability of target tokens, shared by SFT (the loss) and scoring
(learnability, the paper's Eq. 1).

The logits of a [B, T] batch over a 128K+ vocabulary would need B x T x V fp32 values at once
(2 GB per row at 4K tokens); both functions here run the log-softmax over `chunk` tokens of the
sequence at a time, so only [B, chunk, V] logits are live.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
LogitsFn = Callable[[Array], Array]


def target_logprob(logits: Array, targets: Array) -> tuple[Array, Array]:
  """(log p(target), logsumexp) per token from logits [..., V], in fp32."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - lse, lse


def _chunks(chunk: int, *xs: Array) -> tuple[int, int, list[Array]]:
  """(number of chunks, chunk length, each [B, T, ...] array as [n, B, c, ...]), the sequence
  zero-padded up to a whole number of chunks."""
  B, T = xs[0].shape[:2]
  c = min(chunk, T)
  n = -(-T // c)
  out = []
  for x in xs:
    if n * c != T:
      x = jnp.pad(x, ((0, 0), (0, n * c - T)) + ((0, 0),) * (x.ndim - 2))
    out.append(jnp.swapaxes(x.reshape((B, n, c) + x.shape[2:]), 0, 1))
  return n, c, out


def token_logprobs(logits_fn: LogitsFn, hidden: Array, targets: Array, chunk: int
                   ) -> tuple[Array, Array]:
  """(log p(target), logsumexp), each [B, T], from hidden states [B, T, D] through `logits_fn`,
  `chunk` tokens at a time. Each chunk's logits are recomputed in the backward pass
  (jax.checkpoint), so a training step never holds [B, T, V] logits either."""
  B, T = targets.shape
  n, c, (h, t) = _chunks(chunk, hidden, targets)

  @jax.checkpoint
  def one(h_c, t_c):
    return target_logprob(logits_fn(h_c), t_c)

  logp, lse = jax.lax.map(lambda xs: one(*xs), (h, t))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * c)[:, :T]
  return unchunk(logp), unchunk(lse)


def masked_logprob_sums(logits_fn: LogitsFn, hidden: Array, targets: Array, mask: Array,
                        chunk: int) -> tuple[Array, Array]:
  """(sum of log p(target) where mask is 1, number of masked tokens), per row [B].

  Summed within each chunk, then over chunks (a fixed order: a row's sum does not depend on the
  batch it sits in)."""
  _, _, (h, t, m) = _chunks(chunk, hidden, targets, mask)

  def one(args):
    h_c, t_c, m_c = args
    logp, _ = target_logprob(logits_fn(h_c), t_c)
    return jnp.sum(logp * m_c, axis=-1)

  return jax.lax.map(one, (h, t, m)).sum(0), mask.sum(-1)


def gathered_logprobs(logits_fn: LogitsFn, hidden: Array, index: Array, targets: Array,
                      chunk: int) -> Array:
  """log p(target) [B, K] at K chosen positions per row (`index` [B, K] into hidden [B, T, D]).

  The positions are gathered *before* the vocabulary projection, so the LM head (the largest
  matmul of a small model, and a [., V] fp32 log-softmax) runs only where a score is wanted,
  e.g. on response tokens and not on the prompt (scoring)."""
  picked = jnp.take_along_axis(hidden, index[..., None].astype(jnp.int32), axis=1)
  logp, _ = token_logprobs(logits_fn, picked, targets, chunk)
  return logp
