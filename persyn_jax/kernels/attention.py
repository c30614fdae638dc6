"""Attention behind one function: the XLA math, cuDNN flash attention, and two Pallas kernels.

q [B, T, N, H], k and v [B, S, K, H] (N a multiple of K: grouped-query attention). Which keys a
query sees is given by slot indices and segment ids, the same rule for packed training rows and a
left-padded KV cache: key s is visible to query t when k_idx[s] <= q_idx[t] (causal), k_seg[s] ==
q_seg[t] != 0 (same segment, not padding) and, with a window, q_idx[t] - k_idx[s] < window.

Implementations (`impl`):
  "xla"           dense fp32 scores, the model's reference math; for in-order queries and keys
                  (no cache, a prefill) in causal query blocks that skip the future keys.
  "cudnn"         jax.nn.dot_product_attention(implementation="cudnn"); GPU, bf16/fp16, no softcap.
  "pallas_flash"  blocked online softmax (kernels/flash.py); TPU/GPU prefill, scoring, SFT.
  "pallas_decode" ragged decode (kernels/decode.py): one query per row, reads only the keys in
                  each row's filled range; requires T == 1 and a contiguous visible range.
  "auto"          xla on CPU; on GPU cudnn for T > 1 where it applies (bf16/fp16, no softcap,
                  head dim <= 128, even T and S; a shape cuDNN rejects falls back to xla), else
                  xla; on TPU pallas_decode for a single query token and pallas_flash otherwise,
                  each only once it has compiled there (`kernel_compiles`; else xla, with a
                  warning) and only on one device (no shard_map around the kernels yet; else xla).
The environment variable PERSYN_JAX_ATTENTION (one of the names above) replaces "auto" at trace
time, so a run can force a path without a code change (e.g. PERSYN_JAX_ATTENTION=xla to compare).
"""
from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30  # finite, so a fully masked (padding) row gives a uniform softmax, not NaN
IMPLS = ("auto", "xla", "cudnn", "pallas_flash", "pallas_decode")
ENV_VAR = "PERSYN_JAX_ATTENTION"


def attention_mask(q_idx: Array, q_seg: Array, k_idx: Array, k_seg: Array,
                   window: int | None, window_on: Array | None = None) -> Array:
  """[B, T, S] bool: causal by slot index, same non-zero segment, optional sliding window
  (applied only where the traced scalar `window_on` is true, when one is given).

  Slot indices order tokens in time both for packed rows and for a left-padded KV cache, so the
  same rule serves training (packing: segments never see each other) and decoding.
  """
  m = (k_idx[:, None, :] <= q_idx[:, :, None]) & (q_seg[:, :, None] == k_seg[:, None, :])
  m &= (k_seg != 0)[:, None, :]
  if window:
    inside = (q_idx[:, :, None] - k_idx[:, None, :]) < window
    m &= inside if window_on is None else (inside | ~window_on)
  return m


def _dense(q, k, v, *, q_idx, q_seg, k_idx, k_seg, window, softcap, scale, window_on=None):
  B, T, N, H = q.shape
  K = k.shape[2]
  mask = attention_mask(q_idx, q_seg, k_idx, k_seg, window, window_on)
  q = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, N // K, H)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  if softcap:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)


def causal_blocks(T: int, min_block: int = 64, max_blocks: int = 8) -> list[tuple[int, int]]:
  """Query blocks [(start, end)] of an in-order sequence of T tokens: at most `max_blocks` blocks
  of at least `min_block` queries (one block, the whole sequence, when T < 2 * min_block)."""
  if T < 2 * min_block:
    return [(0, T)]
  c = max(min_block, -(-T // max_blocks))
  return [(s, min(s + c, T)) for s in range(0, T, c)]


def xla_attention(q, k, v, *, q_idx, q_seg, k_idx, k_seg, window, softcap, scale,
                  window_on=None, in_order: bool = False):
  """The reference: dense fp32 scores [B, K, G, T, S], masked softmax, probabilities in v's dtype.

  A fully masked query row (padding) gets a uniform softmax over the keys it is given: finite,
  never read. With `in_order` (the caller's promise that q_idx and k_idx both are 0..T-1: no
  cache, or the prefill of an empty one) the queries go in blocks (`causal_blocks`), and block
  [s, e) scores keys 0..e-1 only: the keys after its last query are in its future, masked anyway.
  On CPU this skips almost half of the score FLOPs and softmax passes (the causal upper triangle)
  of a training step, a packed scoring row or a prefill; the values are those of the dense form
  up to fp32 summation order (the skipped keys only add exact zeros).
  """
  kw = dict(window=window, softcap=softcap, scale=scale, window_on=window_on)
  T, S = q.shape[1], k.shape[1]
  blocks = causal_blocks(T) if in_order and T == S else [(0, T)]
  if len(blocks) == 1:
    return _dense(q, k, v, q_idx=q_idx, q_seg=q_seg, k_idx=k_idx, k_seg=k_seg, **kw)
  outs = [_dense(q[:, s:e], k[:, :e], v[:, :e], q_idx=q_idx[:, s:e], q_seg=q_seg[:, s:e],
                 k_idx=k_idx[:, :e], k_seg=k_seg[:, :e], **kw) for s, e in blocks]
  return jnp.concatenate(outs, axis=1)


def cudnn_args(q, k, v, *, q_idx, q_seg, k_idx, k_seg, window, softcap, scale,
               window_on=None) -> dict:
  """The keyword arguments of jax.nn.dot_product_attention that state our masking rule.

  cuDNN's own causal/padding/window masks assume keys in slot order from 0 with no segments, which
  a left-padded cache or a packed row is not, so the general boolean mask is passed instead.
  """
  if softcap:
    raise ValueError("cudnn attention has no logit softcap (Gemma 2): use impl='xla' or a "
                     "Pallas kernel")
  mask = attention_mask(q_idx, q_seg, k_idx, k_seg, window, window_on)
  return dict(query=q, key=k, value=v, mask=mask[:, None], scale=float(scale))


def cudnn_attention(q, k, v, **kw):
  args = cudnn_args(q, k, v, **kw)
  out = jax.nn.dot_product_attention(**args, implementation="cudnn")
  # a padding query with no visible key is never read, but must stay finite: its NaN would
  # reach later layers through 0 * NaN in their value sums
  seen = jnp.any(args["mask"][:, 0], axis=-1)[:, :, None, None]
  return jnp.where(seen, out, jnp.zeros((), out.dtype))


def _cudnn_applies(q, kv_len: int, softcap) -> bool:
  """Whether "auto" may pick cuDNN. Even query and key lengths: jax's cuDNN rejects a masked
  (biased) attention of odd length when it is differentiated, and it does so in the forward rule
  of its custom_vjp, which under a scanned or rematerialized layer (the model's) runs outside the
  try in `attention`, so an odd-length SFT step would fail instead of falling back to xla."""
  return (not softcap and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0
          and q.shape[1] % 2 == 0 and kv_len % 2 == 0)


def choose(impl: str, q: Array, softcap, kv_len: int | None = None) -> str:
  """The implementation `impl` resolves to for this call (the env variable overrides "auto");
  kv_len: the number of key slots (default: q's length)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
  if impl == "auto":
    impl = os.environ.get(ENV_VAR, "auto") or "auto"
    if impl not in IMPLS:
      raise ValueError(f"{ENV_VAR}={impl!r} is not one of {IMPLS}")
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "gpu":  # decode (one query) gains little from a masked flash kernel: XLA
    kv_len = q.shape[1] if kv_len is None else kv_len
    return "cudnn" if q.shape[1] > 1 and _cudnn_applies(q, kv_len, softcap) else "xla"
  if backend == "tpu" and _one_device():
    pick = "pallas_decode" if q.shape[1] == 1 else "pallas_flash"
    return pick if kernel_compiles(pick, str(q.dtype)) else "xla"
  return "xla"


def _one_device() -> bool:
  """True outside a mesh or on a one-device mesh. The Pallas kernels are not wrapped in a
  shard_map yet: under a multi-device mesh XLA would gather their inputs onto every device."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.size == 1 if not mesh.empty else jax.device_count() == 1


@functools.cache
def kernel_compiles(which: str, dtype: str, interpret: bool = False) -> bool:
  """Whether a Pallas kernel lowers and compiles on this backend, tried once on a small shape.

  The kernels are checked in interpret mode on CPU only; "auto" must not bet a TPU run on a
  lowering it has never seen, so a kernel that fails here is replaced by "xla" with a warning.
  """
  from persyn_jax.kernels.decode import decode_attention
  from persyn_jax.kernels.flash import flash_attention
  if which not in ("pallas_flash", "pallas_decode"):
    raise ValueError(f"{which!r} is not a Pallas kernel")
  B, T, N, K, H = 1, 128, 2, 1, 128
  sds = jax.ShapeDtypeStruct
  ids = sds((B, T), jnp.int32)
  try:
    if which == "pallas_flash":
      f = lambda q, k, v, i, s: flash_attention(q, k, v, q_idx=i, q_seg=s, k_idx=i, k_seg=s,
                                                interpret=interpret)
      args = (sds((B, T, N, H), dtype), sds((B, T, K, H), dtype), sds((B, T, K, H), dtype), ids,
              ids)
    elif which == "pallas_decode":
      f = lambda q, k, v, s, e: decode_attention(q, k, v, s, e, interpret=interpret)
      args = (sds((B, N, H), dtype), sds((B, T, K, H), dtype), sds((B, T, K, H), dtype),
              sds((B,), jnp.int32), sds((B,), jnp.int32))
    jax.jit(f).lower(*args).compile()
    return True
  except Exception as e:  # lowering errors have many types (Mosaic, Triton, MLIR)
    warnings.warn(f"attention kernel {which} does not compile on {jax.default_backend()} "
                  f"({type(e).__name__}: {str(e)[:300]}); using xla")
    return False


def decode_range(q_idx: Array, k_seg: Array) -> tuple[Array, Array]:
  """(start, end) [B] of each row's visible keys for a single query: from the first non-zero key
  segment to the query's own slot. Valid when those keys form one contiguous run (a left-padded
  or slot cache), which is what pallas_decode requires."""
  S = k_seg.shape[1]
  filled = k_seg != 0
  start = jnp.where(jnp.any(filled, axis=1), jnp.argmax(filled, axis=1), S).astype(jnp.int32)
  return start, (q_idx[:, 0] + 1).astype(jnp.int32)


def attention(q: Array, k: Array, v: Array, *, q_idx: Array, q_seg: Array, k_idx: Array,
              k_seg: Array, window: int | None = None, softcap: float | None = None,
              scale: float = 1.0, impl: str = "auto", window_on: Array | None = None,
              in_order: bool = False) -> Array:
  """Attention output [B, T, N, H] in v's dtype; see the module docstring for the rule and impls.

  window and softcap are static (None or 0 = off); scale multiplies q before the scores.
  window_on: a traced bool scalar (a scanned layer's own switch, Gemma's alternating layers) that
  turns the window off where false; None = the window always applies.
  in_order (static): the caller promises that q_idx and k_idx are both 0..T-1 (no cache, or an
  empty cache's prefill over its T fresh keys), so the XLA path may skip the causal upper
  triangle block by block (`xla_attention`).
  """
  if window_on is not None and window:
    # the kernels take a static window
    if choose(impl, q, softcap, k.shape[1]).startswith("pallas"):
      on = lambda: attention(q, k, v, q_idx=q_idx, q_seg=q_seg, k_idx=k_idx, k_seg=k_seg,
                             window=window, softcap=softcap, scale=scale, impl=impl)
      off = lambda: attention(q, k, v, q_idx=q_idx, q_seg=q_seg, k_idx=k_idx, k_seg=k_seg,
                              window=None, softcap=softcap, scale=scale, impl=impl)
      return jax.lax.cond(window_on, on, off)
  else:
    window_on = None
  kw = dict(q_idx=q_idx, q_seg=q_seg, k_idx=k_idx, k_seg=k_seg, window=window, softcap=softcap,
            scale=scale)
  which = choose(impl, q, softcap, k.shape[1])
  if which == "xla":
    return xla_attention(q, k, v, **kw, window_on=window_on, in_order=in_order)
  if which == "cudnn":
    try:
      return cudnn_attention(q, k, v, **kw, window_on=window_on)
    except NotImplementedError:  # a shape cuDNN rejects at trace time (raised when impl="cudnn")
      if impl != "auto":
        raise
      return xla_attention(q, k, v, **kw, window_on=window_on, in_order=in_order)
  if which == "pallas_flash":
    from persyn_jax.kernels.flash import flash_attention
    return flash_attention(q, k, v, **kw, interpret=jax.default_backend() == "cpu")
  from persyn_jax.kernels.decode import decode_attention
  if q.shape[1] != 1:
    raise ValueError(f"pallas_decode takes one query token per row, got q of shape {q.shape}")
  start, end = decode_range(q_idx, k_seg)
  out = decode_attention(q[:, 0], k, v, start, end, window=window, softcap=softcap, scale=scale,
                         interpret=jax.default_backend() == "cpu")
  return out[:, None]
