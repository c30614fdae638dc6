"""The attention kernels against the XLA path (Pallas interpret mode on CPU).

Tolerances: every path computes scores and the softmax in fp32 from fp32 inputs; the kernels only
reorder the sums (blocked online softmax: a running max rescales partial sums by exp(m - m_new)).
That reordering costs a few ulps of fp32 per accumulated block, far below 1e-5 on unit-scale
values. Rows with no visible key (padding queries) are never read by the model; for them the
kernels only promise finite values.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persyn_jax.kernels.attention import (ENV_VAR, attention, causal_blocks, choose, cudnn_args,
                                          xla_attention)
from persyn_jax.kernels.decode import decode_attention
from persyn_jax.kernels.flash import flash_attention

TOL = dict(rtol=2e-5, atol=2e-5)


def _qkv(rng, B, T, S, N, K, H):
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return f(B, T, N, H), f(B, S, K, H), f(B, S, K, H)


def _packed_segments(rng, B, T):
  """Rows packed with 1-3 segments, some with left padding (segment 0)."""
  seg = np.zeros((B, T), np.int32)
  for b in range(B):
    pad = int(rng.integers(0, T // 4))
    cuts = np.sort(rng.choice(np.arange(pad + 1, T), size=int(rng.integers(0, 3)), replace=False))
    seg[b, pad:] = 1 + np.searchsorted(cuts, np.arange(pad, T), side="right")
  return jnp.asarray(seg)


CASES = [  # B, T, N, K, H, window, softcap, block_q, block_k
    (2, 16, 2, 2, 8, None, None, 8, 8),      # MHA, blocks divide T
    (2, 21, 4, 2, 16, None, None, 8, 8),     # GQA, ragged tail block on both axes
    (1, 33, 8, 2, 8, 5, None, 16, 8),        # sliding window, G = 4
    (3, 24, 4, 1, 8, None, 30.0, 8, 16),     # softcap (Gemma 2), MQA
    (2, 40, 6, 3, 16, 7, 20.0, 16, 16),      # everything at once
]


@pytest.mark.parametrize("B,T,N,K,H,window,softcap,bq,bk", CASES)
def test_flash_equals_xla_on_packed_rows(B, T, N, K, H, window, softcap, bq, bk):
  rng = np.random.default_rng(T * 7 + N)
  q, k, v = _qkv(rng, B, T, T, N, K, H)
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  seg = _packed_segments(rng, B, T)
  kw = dict(q_idx=idx, q_seg=seg, k_idx=idx, k_seg=seg, window=window, softcap=softcap,
            scale=H ** -0.5)
  ref = xla_attention(q, k, v, **kw)
  got = flash_attention(q, k, v, **kw, block_q=bq, block_k=bk, interpret=True)
  real = np.asarray(seg != 0)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], **TOL)
  assert np.isfinite(np.asarray(got)).all()


def _torch_reference(q, k, v, q_idx, q_seg, k_idx, k_seg, window, softcap, scale):
  """Attention from its definition in float64 torch (independent of the code under test): key s
  is visible to query t when k_idx <= q_idx, the segments are equal and non-zero and, with a
  window, q_idx - k_idx < window (transformers' sliding_window_overlay: kv > q - window); scores
  scale * q.k, then softcap * tanh(s / softcap), then the mask. Rows that see nothing give 0."""
  import torch
  f64 = lambda x: (x if isinstance(x, torch.Tensor)
                   else torch.tensor(np.array(x), dtype=torch.float64))
  q, k, v = f64(q), f64(k), f64(v)
  qi, qs, ki, ks = (torch.tensor(np.array(x)) for x in (q_idx, q_seg, k_idx, k_seg))
  m = (ki[:, None] <= qi[:, :, None]) & (qs[:, :, None] == ks[:, None]) & (ks != 0)[:, None]
  if window:
    m &= (qi[:, :, None] - ki[:, None]) < window
  G = q.shape[2] // k.shape[2]
  s = torch.einsum("btnh,bsnh->bnts", q * scale, k.repeat_interleave(G, dim=2))
  if softcap:
    s = torch.tanh(s / softcap) * softcap
  seen = m.any(-1)
  s = s.masked_fill(~m[:, None], float("-inf")).masked_fill(~seen[:, None, :, None], 0.0)
  out = torch.einsum("bnts,bsnh->btnh", torch.softmax(s, -1), v.repeat_interleave(G, dim=2))
  return out * seen[:, :, None, None]


def test_every_cpu_path_equals_attention_from_its_definition():
  """xla, flash (values and gradients) and decode against float64 torch: GQA, packed rows with
  left padding, a window, a softcap, a scale like Gemma's query_pre_attn_scalar ** -0.5, blocks
  that do not divide the lengths; decode rows of 1 key, a middle range, the whole cache and a
  window shorter than the filled range."""
  import torch
  rng = np.random.default_rng(11)
  B, T, N, K, H, window, softcap, scale = 2, 13, 4, 2, 16, 5, 8.0, 24.0 ** -0.5
  q, k, v = _qkv(rng, B, T, T, N, K, H)
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  seg = jnp.asarray([[0] * 3 + [1] * 6 + [2] * 4, [1] * 13], jnp.int32)
  kw = dict(q_idx=idx, q_seg=seg, k_idx=idx, k_seg=seg, window=window, softcap=softcap,
            scale=scale)
  real = np.asarray(seg != 0)
  w = np.asarray(rng.standard_normal((B, T, N, H)), np.float32) * real[:, :, None, None]
  tq, tk, tv = (torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
                for x in (q, k, v))
  ref = _torch_reference(tq, tk, tv, idx, seg, idx, seg, window, softcap, scale)
  (ref * torch.as_tensor(w, dtype=torch.float64)).sum().backward()
  paths = {"xla": lambda q, k, v: xla_attention(q, k, v, **kw),
           "flash": lambda q, k, v: flash_attention(q, k, v, **kw, block_q=8, block_k=8,
                                                    interpret=True)}
  for name, f in paths.items():
    np.testing.assert_allclose(np.asarray(f(q, k, v))[real], ref.detach().numpy()[real], **TOL,
                               err_msg=name)
    grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
    for d, g, r in zip("qkv", grads, (tq, tk, tv)):
      np.testing.assert_allclose(g, r.grad.numpy(), **TOL, err_msg=f"{name} d{d}")

  S = 21
  _, k, v = _qkv(rng, 4, 1, S, N, K, H)
  qd = jnp.asarray(rng.standard_normal((4, N, H)), jnp.float32)
  start, end = np.array([0, 4, 0, 2], np.int32), np.array([1, 12, S, S], np.int32)
  slot = np.broadcast_to(np.arange(S, dtype=np.int32), (4, S))
  k_seg = ((slot >= start[:, None]) & (slot < end[:, None])).astype(np.int32)
  for win in (None, window):
    got = decode_attention(qd, k, v, jnp.asarray(start), jnp.asarray(end), window=win,
                           softcap=softcap, scale=scale, block_k=8, interpret=True)
    ref = _torch_reference(qd[:, None], k, v, (end - 1)[:, None], np.ones((4, 1), np.int32),
                           slot, k_seg, win, softcap, scale)
    np.testing.assert_allclose(got, ref.numpy()[:, 0], **TOL, err_msg=f"decode window={win}")


def test_flash_attends_a_left_padded_cache_with_more_slots_than_queries():
  """Queries [end, end + T) over a cache of S slots, left padded, as in a chunked prefill."""
  rng = np.random.default_rng(1)
  B, T, S, N, K, H, end = 2, 8, 24, 4, 2, 8, 6
  q, k, v = _qkv(rng, B, T, S, N, K, H)
  q_idx = jnp.broadcast_to(end + jnp.arange(T, dtype=jnp.int32), (B, T))
  k_idx = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  k_seg = jnp.asarray(np.array([[0, 0] + [1] * 12 + [0] * 10, [1] * 14 + [0] * 10]), jnp.int32)
  kw = dict(q_idx=q_idx, q_seg=jnp.ones((B, T), jnp.int32), k_idx=k_idx, k_seg=k_seg,
            window=None, softcap=None, scale=0.3)
  got = flash_attention(q, k, v, **kw, block_q=8, block_k=8, interpret=True)
  np.testing.assert_allclose(got, xla_attention(q, k, v, **kw), **TOL)


@pytest.mark.parametrize("B,T,N,K,H,window,softcap,packed", [
    (2, 12, 4, 2, 8, 4, 10.0, False),   # window + softcap, one segment per row
    (2, 21, 6, 2, 8, None, None, True),  # packed rows with left padding, ragged tail blocks
])
def test_flash_gradients_equal_xla_gradients(B, T, N, K, H, window, softcap, packed):
  """The Pallas backward (dq and dk/dv kernels from the forward's log-sum-exp) against jax.grad
  of the XLA path. The loss weights padding queries by 0, as the SFT loss mask does: a query
  with no visible key passes no gradient in the kernels (see kernels/flash_bwd.py)."""
  rng = np.random.default_rng(T)
  q, k, v = _qkv(rng, B, T, T, N, K, H)
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  seg = _packed_segments(rng, B, T) if packed else jnp.ones((B, T), jnp.int32)
  kw = dict(q_idx=idx, q_seg=seg, k_idx=idx, k_seg=seg, window=window, softcap=softcap,
            scale=0.35)
  w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) * (seg != 0)[:, :, None, None]
  loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v))
  ref = jax.grad(loss(lambda q, k, v: xla_attention(q, k, v, **kw)), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(lambda q, k, v: flash_attention(q, k, v, **kw, block_q=8, block_k=8,
                                                      interpret=True)), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", got, ref):
    np.testing.assert_allclose(g, r, **TOL, err_msg=f"d{name}")


def test_causal_blocks_cover_the_sequence_in_at_most_eight_blocks():
  assert causal_blocks(100) == [(0, 100)]  # under two blocks of 64: one dense block
  assert causal_blocks(256) == [(0, 64), (64, 128), (128, 192), (192, 256)]
  assert causal_blocks(200) == [(0, 64), (64, 128), (128, 192), (192, 200)]
  for T in (128, 129, 1000, 4096, 4097):
    blocks = causal_blocks(T)
    assert blocks[0][0] == 0 and blocks[-1][1] == T and len(blocks) <= 8
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(e - s >= 64 for s, e in blocks[:-1])


@pytest.mark.parametrize("T,window,softcap,packed", [
    (256, None, None, False),  # 4 whole blocks, one segment per row
    (200, 70, 20.0, True),     # ragged tail block, a window across blocks, softcap, packed rows
])
def test_in_order_blocks_equal_the_dense_xla_path(T, window, softcap, packed):
  """in_order lets the XLA path skip the keys after each query block (the causal upper
  triangle). Values and gradients equal the dense form's to fp32 summation order on every real
  query; padding queries (segment 0, never read) stay finite."""
  rng = np.random.default_rng(T)
  B, N, K, H = 2, 4, 2, 8
  q, k, v = _qkv(rng, B, T, T, N, K, H)
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  seg = _packed_segments(rng, B, T) if packed else jnp.ones((B, T), jnp.int32)
  kw = dict(q_idx=idx, q_seg=seg, k_idx=idx, k_seg=seg, window=window, softcap=softcap,
            scale=0.35)
  real = np.asarray(seg != 0)
  # jitted as the model runs it: op-by-op dispatch of the blocked form costs minutes under load
  attn = lambda in_order: jax.jit(lambda q, k, v: xla_attention(q, k, v, **kw, in_order=in_order))
  dense = attn(False)(q, k, v)
  blocked = attn(True)(q, k, v)
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], rtol=1e-6,
                             atol=1e-6)
  assert np.isfinite(np.asarray(blocked)).all()
  w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) * (seg != 0)[:, :, None, None]
  grads = lambda in_order: jax.jit(jax.grad(
      lambda q, k, v: jnp.sum(w * xla_attention(q, k, v, **kw, in_order=in_order)),
      argnums=(0, 1, 2)))(q, k, v)
  for name, g, r in zip("qkv", grads(True), grads(False)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=f"d{name}")


@pytest.mark.parametrize("N,K,window,softcap,block_k", [
    (4, 4, None, None, 8),   # MHA
    (8, 2, None, None, 16),  # GQA, S = 45 not a multiple of the block
    (6, 2, 9, 25.0, 8),      # sliding window + softcap
])
def test_decode_reads_each_rows_range_like_xla(N, K, window, softcap, block_k):
  rng = np.random.default_rng(N + K)
  B, S, H = 4, 45, 8
  _, k, v = _qkv(rng, B, 1, S, N, K, H)
  q = jnp.asarray(rng.standard_normal((B, N, H)), jnp.float32)
  start = jnp.asarray([0, 5, 17, 30], jnp.int32)  # left padding differs per row
  end = jnp.asarray([1, 40, 45, 31], jnp.int32)   # and so does the filled length
  got = decode_attention(q, k, v, start, end, window=window, softcap=softcap, scale=H ** -0.5,
                         block_k=block_k, interpret=True)
  slot = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  k_seg = ((slot >= start[:, None]) & (slot < end[:, None])).astype(jnp.int32)
  ref = xla_attention(q[:, None], k, v, q_idx=(end - 1)[:, None], q_seg=jnp.ones((B, 1), jnp.int32),
                        k_idx=slot, k_seg=k_seg, window=window, softcap=softcap,
                        scale=H ** -0.5)[:, 0]
  np.testing.assert_allclose(got, ref, **TOL)


def test_decode_ignores_whatever_lies_outside_the_range():
  """Slots outside [start, end) may hold anything (stale rows of a slot cache, NaN included)."""
  rng = np.random.default_rng(5)
  B, S, N, K, H = 2, 32, 2, 1, 8
  _, k, v = _qkv(rng, B, 1, S, N, K, H)
  q = jnp.asarray(rng.standard_normal((B, N, H)), jnp.float32)
  start, end = jnp.asarray([4, 0], jnp.int32), jnp.asarray([12, 9], jnp.int32)
  clean = decode_attention(q, k, v, start, end, block_k=8, interpret=True)
  outside = (jnp.arange(S)[None, :] < start[:, None]) | (jnp.arange(S)[None, :] >= end[:, None])
  dirty = lambda x: jnp.where(outside[:, :, None, None], 1e4, x)
  np.testing.assert_allclose(decode_attention(q, dirty(k), dirty(v), start, end, block_k=8,
                                              interpret=True), clean, **TOL)
  poison = lambda x: jnp.where(outside[:, :, None, None], jnp.nan, x)
  np.testing.assert_allclose(decode_attention(q, poison(k), poison(v), start, end, block_k=8,
                                              interpret=True), clean, **TOL)


def test_attention_dispatch_routes_decode_through_the_filled_range():
  """attention(impl="pallas_decode") derives [start, end) from the cache's segment ids."""
  rng = np.random.default_rng(6)
  B, S, N, K, H = 3, 20, 4, 2, 8
  q, k, v = _qkv(rng, B, 1, S, N, K, H)
  k_seg = jnp.asarray(np.array([[0] * 3 + [1] * 10 + [0] * 7, [1] * 18 + [0] * 2,
                                [0] * 9 + [1] * 2 + [0] * 9]), jnp.int32)
  q_idx = jnp.asarray([[12], [17], [10]], jnp.int32)
  kw = dict(q_idx=q_idx, q_seg=jnp.ones((B, 1), jnp.int32),
            k_idx=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)), k_seg=k_seg,
            window=None, softcap=None, scale=0.4)
  np.testing.assert_allclose(attention(q, k, v, **kw, impl="pallas_decode"),
                             attention(q, k, v, **kw, impl="xla"), **TOL)


def test_cudnn_arguments_state_the_same_rule():
  """cuDNN cannot run here; its arguments, given to jax's own XLA implementation of the same
  API, must reproduce our XLA path (on bf16 inputs, as cuDNN takes)."""
  rng = np.random.default_rng(7)
  B, T, N, K, H = 2, 12, 4, 2, 16
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(rng, B, T, T, N, K, H))
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  seg = _packed_segments(rng, B, T)
  kw = dict(q_idx=idx, q_seg=seg, k_idx=idx, k_seg=seg, window=5, softcap=None, scale=0.25)
  args = cudnn_args(q, k, v, **kw)
  got = jax.nn.dot_product_attention(**args, implementation="xla")
  real = np.asarray(seg != 0)
  # bf16 probabilities times bf16 values: about 3 significant digits
  np.testing.assert_allclose(np.asarray(got, np.float32)[real],
                             np.asarray(xla_attention(q, k, v, **kw), np.float32)[real],
                             rtol=2e-2, atol=2e-2)
  with pytest.raises(ValueError, match="softcap"):
    cudnn_args(q, k, v, **{**kw, "softcap": 50.0})


def test_auto_is_xla_on_cpu_and_the_env_variable_forces_an_impl(monkeypatch):
  q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
  monkeypatch.delenv(ENV_VAR, raising=False)
  assert choose("auto", q, None) == "xla"
  monkeypatch.setenv(ENV_VAR, "pallas_flash")
  assert choose("auto", q, None) == "pallas_flash"
  assert choose("xla", q, None) == "xla"  # an explicit impl wins over the environment
  monkeypatch.setenv(ENV_VAR, "flashy")
  with pytest.raises(ValueError, match="flashy"):
    choose("auto", q, None)
  with pytest.raises(ValueError, match="splash"):
    choose("splash", q, None)


def test_auto_on_gpu_picks_cudnn_only_for_even_lengths(monkeypatch):
  """jax's cuDNN refuses a masked attention of odd query or key length under differentiation, in
  its custom_vjp forward rule: under the model's scanned layers that runs outside the fallback in
  `attention` (an odd-length SFT step would fail), so "auto" on a GPU keeps those shapes on xla."""
  monkeypatch.delenv(ENV_VAR, raising=False)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q = lambda T, dtype=jnp.bfloat16, H=64: jnp.zeros((1, T, 4, H), dtype)
  assert choose("auto", q(8), None) == "cudnn"
  assert choose("auto", q(8), None, kv_len=16) == "cudnn"
  assert choose("auto", q(7), None) == "xla"
  assert choose("auto", q(8), None, kv_len=15) == "xla"
  assert choose("auto", q(1), None, kv_len=16) == "xla"  # decode
  assert choose("auto", q(8), 50.0) == "xla"  # softcap
  assert choose("auto", q(8, jnp.float32), None) == "xla"
  assert choose("auto", q(8, H=12), None) == "xla"

  # the refusal's path, modelled on CPU: a custom_vjp whose forward rule raises, in a scan
  @jax.custom_vjp
  def refuses(x):
    return x
  refuses.defvjp(lambda x: (_ for _ in ()).throw(NotImplementedError("odd")), lambda r, g: (g,))

  def fallback(x):
    try:
      return refuses(x)
    except NotImplementedError:
      return x
  scanned = lambda x: jax.lax.scan(lambda c, _: (c + fallback(x).sum(), None), 0.0, None,
                                   length=2)[0]
  with pytest.raises(NotImplementedError):
    jax.grad(scanned)(jnp.ones(3))


def _gemma_like_model():
  """GQA, a sliding-window layer, a logit softcap: every switch the kernels take."""
  from persyn_jax.models import build_model
  from persyn_jax.models.config import ModelConfig
  cfg = ModelConfig(model_type="gemma2", vocab_size=97, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=3,
                    sliding_layers=(True, False), attn_logit_softcap=5.0, pad_token_id=0)
  return build_model(cfg, dtype="float32", seed=3)


def test_model_on_the_pallas_kernels_equals_the_model_on_xla(monkeypatch):
  """The model's attention goes through kernels.attention: forcing the Pallas kernels with the
  environment switch changes no logit of a packed forward, nor of a prefill + decode step."""
  from persyn_jax.models import init_cache
  model = _gemma_like_model()
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, 97, (2, 10)), jnp.int32)
  seg = jnp.asarray([[1] * 4 + [2] * 6, [0] * 3 + [1] * 7], jnp.int32)

  def run(impl_prefill, impl_decode):
    monkeypatch.setenv(ENV_VAR, impl_prefill)
    packed = model(ids, segment_ids=seg)
    cache = init_cache(model.config, 2, 14, jnp.float32)
    mask = (seg != 0).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    pre, cache = model(ids, segment_ids=mask, positions=pos, cache=cache)
    monkeypatch.setenv(ENV_VAR, impl_decode)
    step, _ = model(ids[:, -1:], segment_ids=jnp.ones((2, 1), jnp.int32),
                    positions=pos[:, -1:] + 1, cache=cache)
    return packed, pre, step

  ref = run("xla", "xla")
  got = run("pallas_flash", "pallas_decode")
  real = np.asarray(seg != 0)
  np.testing.assert_allclose(np.asarray(got[0])[real], np.asarray(ref[0])[real], **TOL)
  np.testing.assert_allclose(np.asarray(got[1])[real], np.asarray(ref[1])[real], **TOL)
  np.testing.assert_allclose(got[2], ref[2], **TOL)


def test_prefill_attends_over_the_prompt_only_and_changes_no_logit():
  """With an empty cache of many slots the model attends over the T prompt keys only (a lax.cond
  on the cache's end): the unfilled slots are poisoned with NaN, which any read would spread
  (0 * NaN in the value sum), and the logits still equal those of the same prompt without a
  cache, bit for bit."""
  from persyn_jax.models import init_cache
  model = _gemma_like_model()
  ids = jnp.asarray(np.random.default_rng(1).integers(1, 97, (2, 9)), jnp.int32)
  mask = jnp.asarray([[1] * 9, [0] * 4 + [1] * 5], jnp.int32)
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  no_cache = model(ids, segment_ids=mask, positions=pos)
  cache = init_cache(model.config, 2, 9 + 64, jnp.float32)
  cache["layers"] = {n: jnp.full_like(x, jnp.nan) for n, x in cache["layers"].items()}
  cached, cache = model(ids, segment_ids=mask, positions=pos, cache=cache)
  real = np.asarray(mask != 0)
  np.testing.assert_array_equal(np.asarray(cached)[real], np.asarray(no_cache)[real])
  assert int(cache["end"]) == 9


def test_a_kernel_that_does_not_compile_here_is_reported_not_selected():
  """"auto" on a TPU picks a Pallas kernel only after it compiled there. The check itself: on CPU
  a Pallas kernel compiles in interpret mode and not natively (no Pallas CPU lowering)."""
  from persyn_jax.kernels.attention import kernel_compiles
  assert kernel_compiles("pallas_flash", "float32", interpret=True)
  assert kernel_compiles("pallas_decode", "float32", interpret=True)
  with pytest.warns(UserWarning, match="does not compile"):
    assert not kernel_compiles("pallas_decode", "float32", interpret=False)


def test_pallas_kernels_are_chosen_only_on_one_device():
  """No shard_map wraps the kernels yet, so "auto" keeps XLA under a multi-device mesh."""
  from persyn_jax.kernels.attention import _one_device
  devices = jax.devices()
  with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=devices[:1])):
    assert _one_device()
  # conftest gives the CPU 8 devices
  with jax.set_mesh(jax.make_mesh((2,), ("data",), devices=devices[:2])):
    assert not _one_device()
