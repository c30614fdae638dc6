"""Ragged decode attention in Pallas: one query token per row, reading only the row's keys.

q [B, N, H] (the new token of each row), a KV cache k/v [B, S, K, H] in the model's layout (no
transpose per step), and per row the filled key range [start, end) as runtime int32 arrays. One
program handles the G query heads that share one kv head of one row; its loop runs over the key
blocks that intersect [start, end) only, so a row with 40 filled slots of a 4096-slot cache reads
one block, not 32. With a sliding window the range starts at max(start, end - window) (the query
sits at slot end - 1).

Reads: on a GPU (Triton) the key/value block spec only places a row's cache, and the loads in the
loop touch the filled blocks alone. On a TPU the block pipeline would copy a row's whole [S, H]
slice into VMEM before the loop; a TPU version that copies only the filled blocks (manual DMA from
memory_space=ANY, lengths as scalar prefetch) is not written yet, so there the saving is compute.

Equal to kernels.attention's rule with q_idx = end - 1, k_idx = slot, k_seg = 1 on [start, end)
and 0 elsewhere. On CPU it runs in Pallas interpret mode, which is how the tests check it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from persyn_jax.kernels.attention import NEG_INF

Array = jax.Array


def _decode_kernel(q_ref, k_ref, v_ref, start_ref, end_ref, o_ref, *, block_k: int, window,
                   softcap, scale):
  q = q_ref[...]
  q = q * jnp.asarray(scale, q.dtype)
  G, H = q.shape
  S = k_ref.shape[0]
  end = end_ref[0]
  lo = start_ref[0]
  if window:
    lo = jnp.maximum(lo, end - window)

  def body(j, carry):
    m, l, acc = carry
    # the last block is shifted back to end at S (S need not be a multiple of block_k); keys
    # before j * block_k were already counted by the previous block
    off = jnp.minimum(j * block_k, S - block_k)
    sl = pl.ds(off, block_k)
    idx = off + jnp.arange(block_k)
    keep = (idx >= jnp.maximum(lo, j * block_k)) & (idx < end)
    s = jax.lax.dot_general(q, k_ref[sl, :], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    if softcap:
      s = jnp.tanh(s / softcap) * softcap
    s = jnp.where(keep[None, :], s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(keep[None, :], jnp.exp(s - m_new[:, None]), 0.0)
    # slots of the block outside the range may hold anything (a slot cache's stale rows): a zero
    # weight times a NaN or infinite value would still be NaN
    v = jnp.where(keep[:, None], v_ref[sl, :], jnp.zeros((), v_ref.dtype))
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

  carry = (jnp.full((G,), NEG_INF, jnp.float32), jnp.zeros((G,), jnp.float32),
           jnp.zeros((G, H), jnp.float32))
  first = lo // block_k
  last = (end + block_k - 1) // block_k  # ragged: runtime loop bounds per row
  m, l, acc = jax.lax.fori_loop(first, jnp.maximum(first, last), body, carry)
  # an empty range (a row not started) gives zeros, not 0/0
  o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def decode_attention(q: Array, k: Array, v: Array, start: Array, end: Array, *,
                     window: int | None = None, softcap: float | None = None, scale: float = 1.0,
                     block_k: int = 256, interpret: bool = False) -> Array:
  """[B, N, H]: attention of each row's single query over its cache slots [start, end).

  q [B, N, H]; k, v [B, S, K, H]; start, end [B] int32 with 0 <= start <= end <= S.
  """
  B, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if N % K:
    raise ValueError(f"query heads {N} are not a multiple of kv heads {K}")
  G = N // K
  bk = min(block_k, S)
  kernel = functools.partial(_decode_kernel, block_k=bk, window=window or None,
                             softcap=softcap or None, scale=float(scale))
  out = pl.pallas_call(
      kernel,
      grid=(B, K),
      in_specs=[
          pl.BlockSpec((None, None, G, H), lambda b, h: (b, h, 0, 0)),
          pl.BlockSpec((None, S, None, H), lambda b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, S, None, H), lambda b, h: (b, 0, h, 0)),
          pl.BlockSpec((1,), lambda b, h: (b,)),
          pl.BlockSpec((1,), lambda b, h: (b,)),
      ],
      out_specs=pl.BlockSpec((None, None, G, H), lambda b, h: (b, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((B, K, G, H), v.dtype),
      interpret=interpret,
      name="persyn_decode_attention",
  )(q.reshape(B, K, G, H), k, v, jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32))
  return out.reshape(B, N, H)
