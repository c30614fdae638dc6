"""The backward of kernels/flash.py: dq, dk and dv from the forward's log-sum-exp, blockwise.

With s = softcap(scale * q . k) masked, p = exp(s - lse) and the output o = p v:
  dv = p^T do,   dp = do v^T,   ds = p * (dp - delta) with delta = rowsum(do * o),
  and through the softcap c * tanh(x / c) a factor 1 - (s / c)^2;  dq = scale * ds k,
  dk = ds^T (scale * q).
One kernel computes dq per query tile (looping over key blocks), another dk and dv per key tile
of one kv head (looping over the G query heads of its group and their query blocks), so neither
holds a [T, S] matrix. Masked entries get p = 0, so a query with no visible key (padding, whose
output gradient is zero in practice) passes no gradient at all.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from persyn_jax.kernels.flash import visible

Array = jax.Array


def _nt(a, b):  # a [M, H] . b [N, H]^T
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _nn(a, b):  # a [M, N] . b [N, H]
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _tn(a, b):  # a [N, M]^T . b [N, H]
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _probs_and_ds(q, k, v, do, lse, delta, mask, softcap):
  """p and d(scores before the softcap) of one [bq, bk] tile; q already scaled."""
  s = _nt(q, k)
  if softcap:
    t = jnp.tanh(s / softcap)
    s = t * softcap
  p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
  ds = p * (_nt(do, v) - delta[:, None])
  if softcap:
    ds = ds * (1.0 - t * t)
  return p, ds


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qi_ref, qs_ref, ki_ref, ks_ref,
               dq_ref, *, block_k, window, softcap, scale):
  q = q_ref[...]
  q = q * jnp.asarray(scale, q.dtype)
  do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]
  qi, qs = qi_ref[...], qs_ref[...]

  def body(j, acc):
    sl = pl.ds(j * block_k, block_k)
    mask = visible(qi, qs, ki_ref[sl], ks_ref[sl], window)

    def update(acc):
      k = k_ref[sl, :]
      _, ds = _probs_and_ds(q, k, v_ref[sl, :], do, lse, delta, mask, softcap)
      return acc + _nn(ds.astype(k.dtype), k)
    return jax.lax.cond(jnp.any(mask), update, lambda a: a, acc)

  acc = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body,
                          jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (acc * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qi_ref, qs_ref, ki_ref, ks_ref,
                dk_ref, dv_ref, *, block_q, window, softcap, scale):
  k, v = k_ref[...], v_ref[...]
  ki, ks = ki_ref[...], ks_ref[...]
  G = q_ref.shape[1]
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for g in range(G):  # the query heads that share this kv head (static, a handful)
    def body(i, carry, g=g):
      sl = pl.ds(i * block_q, block_q)
      mask = visible(qi_ref[sl], qs_ref[sl], ki, ks, window)

      def update(carry):
        dk, dv = carry
        q = q_ref[sl, g, :]
        q = q * jnp.asarray(scale, q.dtype)
        do = do_ref[sl, g, :]
        p, ds = _probs_and_ds(q, k, v, do, lse_ref[g, sl], delta_ref[g, sl], mask, softcap)
        return dk + _tn(ds.astype(q.dtype), q), dv + _tn(p.astype(do.dtype), do)
      return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry)

    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block_q, body, (dk, dv))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_backward(padded, out: Array, lse: Array, do: Array, *, window, softcap, scale,
                   interpret: bool):
  """(dq, dk, dv) on the padded inputs of kernels.flash (`_padded`), the forward's padded out
  [B, Tp, N, H] and lse [B, N, Tp], and the padded output gradient do [B, Tp, N, H]."""
  bq, bk, q, k, v, qi, qs, ki, ks = padded
  B, Tp, N, H = q.shape
  Sp, K = k.shape[1], k.shape[2]
  G = N // K
  do = do.astype(out.dtype)
  delta = jnp.einsum("BTNH,BTNH->BNT", do.astype(jnp.float32), out.astype(jnp.float32))
  kw = dict(window=window, softcap=softcap, scale=scale)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=bk, **kw),
      grid=(B, N, Tp // bq),
      in_specs=[
          pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
          pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, n // G, 0)),
          pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, n // G, 0)),
          pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
          pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
          pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
          pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
          pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
          pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0)),
          pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0)),
      ],
      out_specs=pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret, name="persyn_flash_dq",
  )(q, k, v, do, lse, delta, qi, qs, ki, ks)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, **kw),
      grid=(B, K, Sp // bk),
      in_specs=[
          pl.BlockSpec((None, Tp, G, H), lambda b, h, j: (b, 0, h, 0)),
          pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, Tp, G, H), lambda b, h, j: (b, 0, h, 0)),
          pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0)),
          pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0)),
          pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)),
          pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)),
          pl.BlockSpec((None, bk), lambda b, h, j: (b, j)),
          pl.BlockSpec((None, bk), lambda b, h, j: (b, j)),
      ],
      out_specs=[pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
                 pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=interpret, name="persyn_flash_dkv",
  )(q, k, v, do, lse, delta, qi, qs, ki, ks)
  return dq, dk, dv
