"""Flash attention in Pallas: blocked online softmax with slot indices, segment ids, a sliding
window, a logit softcap and grouped-query heads (the rule of kernels/attention.py).

One program computes a [block_q, H] tile of one query head; it streams the key/value blocks of
that head's kv head through a running max m, normaliser l and accumulator (Milakov & Gimelshein's
online softmax), so the [T, S] scores never exist in memory. A key block that no query of the tile
may see (above the causal diagonal, outside the window, another segment) is skipped.

Backward: a custom_vjp; the forward also keeps each query's log-sum-exp, and two Pallas kernels
(kernels/flash_bwd.py) recompute the probabilities block by block for dq and for dk/dv, so the
backward never holds [T, S] either.
On CPU the kernel runs in Pallas interpret mode, which is how the tests check it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from persyn_jax.kernels.attention import NEG_INF

Array = jax.Array


def _dot_nt(a: Array, b: Array) -> Array:
  """a [M, H] . b [N, H]^T in fp32, without materialising the transpose."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def visible(qi, qs, ki, ks, window):
  """[M, N] bool from query (qi, qs) [M] and key (ki, ks) [N] slot indices and segments."""
  m = (ki[None, :] <= qi[:, None]) & (qs[:, None] == ks[None, :]) & (ks != 0)[None, :]
  if window:
    m &= (qi[:, None] - ki[None, :]) < window
  return m


def _flash_kernel(q_ref, k_ref, v_ref, qi_ref, qs_ref, ki_ref, ks_ref, o_ref, lse_ref, *,
                  block_k: int, window, softcap, scale):
  q = q_ref[...]
  q = q * jnp.asarray(scale, q.dtype)  # scaled in q's dtype, as the XLA path does
  qi, qs = qi_ref[...], qs_ref[...]
  bq, H = q.shape
  n_blocks = k_ref.shape[0] // block_k

  def body(j, carry):
    sl = pl.ds(j * block_k, block_k)
    mask = visible(qi, qs, ki_ref[sl], ks_ref[sl], window)

    def update(carry):
      m, l, acc = carry
      s = _dot_nt(q, k_ref[sl, :])
      if softcap:
        s = jnp.tanh(s / softcap) * softcap
      s = jnp.where(mask, s, NEG_INF)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      # m starts at NEG_INF, not -inf: a row masked so far keeps finite weights, which the first
      # visible key then scales to exactly 0 (exp(NEG_INF - x) underflows)
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[:, None])
      v = v_ref[sl, :]
      pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
      return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

    # skipping only changes rows with no visible key at all (padding, never read): they end up
    # with a finite average of the processed blocks' values, or zeros
    return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry)

  m0 = jnp.full((bq,), NEG_INF, jnp.float32)
  carry = (m0, jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, H), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, n_blocks, body, carry)
  safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(safe)  # the backward's softmax normaliser, log sum exp(s)


def _pad_to(x: Array, axis: int, multiple: int, value=0) -> Array:
  n = x.shape[axis]
  extra = -n % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _padded(q, k, v, q_idx, q_seg, k_idx, k_seg, block_q, block_k):
  """Inputs padded to whole blocks: padded queries have segment 0 (see nothing) and are cut off
  at the end; padded keys are never visible."""
  bq, bk = min(block_q, q.shape[1]), min(block_k, k.shape[1])
  i32 = lambda x: x.astype(jnp.int32)
  return (bq, bk, _pad_to(q, 1, bq), _pad_to(k, 1, bk), _pad_to(v, 1, bk),
          i32(_pad_to(q_idx, 1, bq)), i32(_pad_to(q_seg, 1, bq)), i32(_pad_to(k_idx, 1, bk)),
          i32(_pad_to(k_seg, 1, bk)))


def _forward(padded, *, window, softcap, scale, interpret):
  """(out [B, Tp, N, H], lse [B, N, Tp] fp32) on padded inputs."""
  bq, bk, q, k, v, qi, qs, ki, ks = padded
  B, Tp, N, H = q.shape
  Sp, K = k.shape[1], k.shape[2]
  G = N // K
  kernel = functools.partial(_flash_kernel, block_k=bk, window=window, softcap=softcap,
                             scale=scale)
  return pl.pallas_call(
      kernel,
      grid=(B, N, Tp // bq),
      in_specs=[
          pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
          pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, n // G, 0)),
          pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, n // G, 0)),
          pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
          pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
          pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0)),
          pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0)),
      ],
      out_specs=[pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))],
      out_shape=[jax.ShapeDtypeStruct((B, Tp, N, H), v.dtype),
                 jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
      interpret=interpret,
      name="persyn_flash_attention",
  )(q, k, v, qi, qs, ki, ks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _flash(q, k, v, q_idx, q_seg, k_idx, k_seg, window, softcap, scale, block_q, block_k,
           interpret):
  padded = _padded(q, k, v, q_idx, q_seg, k_idx, k_seg, block_q, block_k)
  out, _ = _forward(padded, window=window, softcap=softcap, scale=scale, interpret=interpret)
  return out[:, :q.shape[1]]


def _flash_fwd(q, k, v, q_idx, q_seg, k_idx, k_seg, window, softcap, scale, block_q, block_k,
               interpret):
  padded = _padded(q, k, v, q_idx, q_seg, k_idx, k_seg, block_q, block_k)
  out, lse = _forward(padded, window=window, softcap=softcap, scale=scale, interpret=interpret)
  return out[:, :q.shape[1]], ((q, k, v, q_idx, q_seg, k_idx, k_seg), out, lse)


def _flash_bwd(window, softcap, scale, block_q, block_k, interpret, res, g):
  from persyn_jax.kernels.flash_bwd import flash_backward
  inputs, out, lse = res
  T, S = inputs[0].shape[1], inputs[1].shape[1]
  padded = _padded(*inputs, block_q, block_k)
  dq, dk, dv = flash_backward(padded, out, lse, _pad_to(g, 1, padded[0]), window=window,
                              softcap=softcap, scale=scale, interpret=interpret)
  return dq[:, :T], dk[:, :S], dv[:, :S], None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: Array, k: Array, v: Array, *, q_idx: Array, q_seg: Array, k_idx: Array,
                    k_seg: Array, window: int | None = None, softcap: float | None = None,
                    scale: float = 1.0, block_q: int = 128, block_k: int = 128,
                    interpret: bool = False) -> Array:
  """Flash attention [B, T, N, H] with the masking rule of kernels.attention (q [B, T, N, H],
  k/v [B, S, K, H]). Rows with no visible key get a uniform softmax over the (padded) keys."""
  N, K = q.shape[2], k.shape[2]
  if N % K:
    raise ValueError(f"query heads {N} are not a multiple of kv heads {K}")
  return _flash(q, k, v, q_idx, q_seg, k_idx, k_seg, window or None, softcap or None,
                float(scale), int(block_q), int(block_k), bool(interpret))
