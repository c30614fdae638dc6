"""The decoder: one config-driven flax.nnx module for Llama, Mistral, Qwen2/2.5/3 and Gemma 2/3.

Shapes read off the einsum strings: B batch, T query tokens, S key slots, D embed, F mlp,
N query heads, K kv heads, G query heads per kv head, H head dim, V vocab.
The KV cache is a plain dict pytree, passed in and returned.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# NEG_INF and attention_mask stay importable from here (re-exported)
from persyn_jax.kernels.attention import NEG_INF, attention, attention_mask  # noqa: F401
from persyn_jax.models.config import ModelConfig, RopeConfig
from persyn_jax.sharding import constrain

Array = jax.Array
Cache = dict[str, Any]


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
  return std * jax.random.normal(rngs.params(), shape, dtype)


class Einsum(nnx.Module):
  """A weight and the einsum that applies it; the weight carries its logical axis names."""

  def __init__(self, eqn: str, shape: Sequence[int], axes: Sequence[str], *, rngs: nnx.Rngs,
               dtype, param_dtype):
    self.eqn = eqn
    self.dtype = dtype
    self.w = nnx.Param(_init(rngs, tuple(shape), param_dtype), logical_axes=tuple(axes))

  def __call__(self, x: Array) -> Array:
    w = self.w[...]
    # a cast only where needed: an int8 weight (models/quant.py) arrives as qwix's quantized
    # array in the compute dtype, which it dequantizes inside the einsum and cannot cast
    return jnp.einsum(self.eqn, x, w if w.dtype == self.dtype else w.astype(self.dtype))


class Bias(nnx.Module):
  def __init__(self, shape, axes, *, param_dtype, dtype):
    self.dtype = dtype
    self.b = nnx.Param(jnp.zeros(shape, param_dtype), logical_axes=tuple(axes))

  def __call__(self, x):
    return x + self.b[...].astype(self.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, gemma: bool, param_dtype):
    self.eps, self.gemma = eps, gemma
    # Gemma stores the scale as w - 1 (its norm multiplies by 1 + w).
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype) if gemma else jnp.ones((dim,), param_dtype),
                           logical_axes=("norm",))

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    w = self.scale[...]
    if self.gemma:  # Gemma scales in fp32, then casts
      return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w.astype(x.dtype) * xf.astype(x.dtype)  # Llama casts, then scales


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies in fp32, computed as transformers does (incl. Llama 3.1's scaling)."""
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv = (1.0 / (np.float32(rope.theta) ** exponent)).astype(np.float32)
  if rope.rope_type == "linear":
    inv = inv / np.float32(rope.factor)
  elif rope.rope_type == "llama3":
    old = rope.original_max_position_embeddings
    low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  elif rope.rope_type != "default":
    raise ValueError(f"rope type {rope.rope_type!r} is not supported (default, linear, llama3)")
  return inv


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotate-half RoPE. x: [B, T, N, H]; positions: [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
  cos = jnp.cos(freqs)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(freqs)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def write_slots(cache: Array, new: Array, end: Array | int) -> Array:
  """cache [B, S, ...] with new [B, T, ...] written at slots end..end+T-1: the same slots for every
  row when `end` is a scalar, row b's own slots from end[b] when it is an [B] array."""
  if jnp.ndim(end) == 0:
    return jax.lax.dynamic_update_slice(cache, new, (0, end) + (0,) * (cache.ndim - 2))
  row = lambda c, n, e: jax.lax.dynamic_update_slice(c, n, (e,) + (0,) * (c.ndim - 1))
  return jax.vmap(row)(cache, new, end)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, *, rngs, dtype, param_dtype):
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q = Einsum("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), **kw)
    self.k = Einsum("BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), **kw)
    self.v = Einsum("BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), **kw)
    self.o = Einsum("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), **kw)
    bkw = dict(param_dtype=param_dtype, dtype=dtype)
    if cfg.qkv_bias:
      self.q_bias = Bias((N, H), ("heads", "head_dim"), **bkw)
      self.k_bias = Bias((K, H), ("kv_heads", "head_dim"), **bkw)
      self.v_bias = Bias((K, H), ("kv_heads", "head_dim"), **bkw)
    if cfg.o_bias:
      self.o_bias = Bias((D,), ("embed",), **bkw)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(H, cfg.rms_norm_eps, gemma=cfg.gemma_norm, param_dtype=param_dtype)
      self.k_norm = RMSNorm(H, cfg.rms_norm_eps, gemma=cfg.gemma_norm, param_dtype=param_dtype)
    self.cfg = cfg
    self.sliding = cfg.layer_is_sliding(layer)
    rope = cfg.rope_local if (self.sliding and cfg.rope_local is not None) else cfg.rope
    self._rope = rope

  def __call__(self, x, positions, q_idx, q_seg, kv: dict | None, k_seg, end):
    cfg = self.cfg
    q, k, v = self.q(x), self.k(x), self.v(x)
    if cfg.qkv_bias:
      q, k, v = self.q_bias(q), self.k_bias(k), self.v_bias(v)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_inv_freq(self._rope, cfg.head_dim)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    # in_order: queries and keys are both slots 0..T-1 (no cache, or an empty cache's prefill),
    # so the XLA path may skip the causal upper triangle
    attend = lambda q, k, v, k_idx, k_seg, in_order=False: attention(
        q, k, v, q_idx=q_idx, q_seg=q_seg, k_idx=k_idx, k_seg=k_seg,
        window=cfg.sliding_window if self.sliding else None, softcap=cfg.attn_logit_softcap,
        scale=cfg.attn_scale, in_order=in_order)
    slots = lambda S: jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (x.shape[0], S))
    if kv is None:
      out = attend(q, k, v, slots(k.shape[1]), k_seg, True)
    else:
      k_new, v_new = k.astype(kv["k"].dtype), v.astype(kv["v"].dtype)
      kc, vc = write_slots(kv["k"], k_new, end), write_slots(kv["v"], v_new, end)
      kv = {"k": kc, "v": vc}
      S = kc.shape[1]
      full = lambda: attend(q, kc.astype(x.dtype), vc.astype(x.dtype), slots(S), k_seg)
      if x.shape[1] == 1:
        out = full()
      else:
        # an empty cache (prefill): the T fresh keys are all there is to see (later slots are in
        # the future), so attend over T keys instead of T + max_new_tokens; the fresh k/v pass
        # through the cache dtype so both branches see the same values
        prompt = lambda: attend(q, k_new.astype(x.dtype), v_new.astype(x.dtype), q_idx, q_seg, True)
        out = jax.lax.cond(jnp.all(jnp.asarray(end) == 0), prompt, full)
    out = constrain(out, ("batch", "seq", "act_heads", "head_dim"))
    out = self.o(out)
    if cfg.o_bias:
      out = self.o_bias(out)
    return out, kv


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
    D, F = cfg.hidden_size, cfg.intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), **kw)
    self.up = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), **kw)
    self.down = Einsum("BTF,FD->BTD", (F, D), ("mlp", "embed"), **kw)
    if cfg.mlp_bias:
      bkw = dict(param_dtype=param_dtype, dtype=dtype)
      self.gate_bias = Bias((F,), ("mlp",), **bkw)
      self.up_bias = Bias((F,), ("mlp",), **bkw)
      self.down_bias = Bias((D,), ("embed",), **bkw)
    self.cfg = cfg

  def __call__(self, x):
    g, u = self.gate(x), self.up(x)
    if self.cfg.mlp_bias:
      g, u = self.gate_bias(g), self.up_bias(u)
    g = jax.nn.silu(g) if self.cfg.activation == "silu" else jax.nn.gelu(g, approximate=True)
    h = constrain(g * u, ("batch", "seq", "act_mlp"))
    out = self.down(h)
    return self.down_bias(out) if self.cfg.mlp_bias else out


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, *, rngs, dtype, param_dtype):
    norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma=cfg.gemma_norm,
                           param_dtype=param_dtype)
    self.attn_norm = norm()
    self.attn = Attention(cfg, layer, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mlp_norm = norm()
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if cfg.post_norms:
      self.attn_post_norm = norm()
      self.mlp_post_norm = norm()
    self.post_norms = cfg.post_norms

  def __call__(self, x, positions, q_idx, q_seg, kv, k_seg, end):
    h, kv = self.attn(self.attn_norm(x), positions, q_idx, q_seg, kv, k_seg, end)
    if self.post_norms:
      h = self.attn_post_norm(h)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if self.post_norms:
      h = self.mlp_post_norm(h)
    x = constrain(x + h, ("batch", "seq", "act_embed"))
    return x, kv


def positions_from_segments(segment_ids: Array) -> Array:
  """Positions that restart at 0 at the start of every run of equal segment ids.

  For an HF attention mask (1 = token) this gives cumsum(mask) - 1 on the tokens, whatever the
  padding side; for packed rows it restarts per segment.
  """
  B, T = segment_ids.shape
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  run_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - run_start


class Transformer(nnx.Module):
  """Embedding, decoder blocks and the final norm: input ids to hidden states."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.cfg = cfg
    self.dtype = dtype
    self.embed = nnx.Param(_init(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype),
                           logical_axes=("vocab", "embed"))
    self.layers = nnx.List([Block(cfg, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma=cfg.gemma_norm,
                              param_dtype=param_dtype)

  def __call__(self, input_ids: Array, *, positions: Array, segment_ids: Array,
               cache: Cache | None = None) -> tuple[Array, Cache | None]:
    B, T = input_ids.shape
    # the table's embed axis gathered first (as FSDP does for every weight): a lookup into a table
    # sharded on both axes would make XLA replicate the gathered activations
    table = constrain(self.embed[...], ("vocab", None))
    x = jnp.take(table, input_ids, axis=0).astype(self.dtype)
    if self.cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), self.dtype)
    x = constrain(x, ("batch", "seq", "act_embed"))
    if cache is None:
      end = 0
      q_idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      k_seg = segment_ids
    else:
      end = cache["end"]
      # a scalar end: every row writes at the same slot; an [B] end: one write slot per row (the
      # slot cache of continuous batching)
      first = end if jnp.ndim(end) == 0 else end[:, None]
      q_idx = first + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      k_seg = write_slots(cache["segment_ids"], segment_ids.astype(jnp.int32), end)
    new_layers = []
    for i, block in enumerate(self.layers):
      kv = None if cache is None else cache["layers"][i]
      x, kv = block(x, positions, q_idx, segment_ids, kv, k_seg, end)
      new_layers.append(kv)
    x = self.final_norm(x)
    if cache is None:
      return x, None
    return x, {"layers": new_layers, "segment_ids": k_seg, "end": end + T}


def _inputs(input_ids, attention_mask, positions, segment_ids):
  if segment_ids is None:
    segment_ids = (jnp.ones_like(input_ids) if attention_mask is None else attention_mask)
  segment_ids = jnp.asarray(segment_ids).astype(jnp.int32)
  if positions is None:
    positions = positions_from_segments(segment_ids)
  return positions, segment_ids


class CausalLM(nnx.Module):
  """Transformer + LM head (tied to the embedding where the config says so)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.config = cfg
    self.model = Transformer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(_init(rngs, (cfg.hidden_size, cfg.vocab_size), param_dtype),
                               logical_axes=("embed", "vocab"))

  @property
  def dtype(self):
    return self.model.dtype

  def logits(self, hidden: Array) -> Array:
    """fp32 logits [..., V] from final hidden states [..., D]."""
    if self.config.tie_embeddings:
      w = self.model.embed[...].astype(hidden.dtype)
      out = jnp.einsum("...D,VD->...V", hidden, w, preferred_element_type=jnp.float32)
    else:
      w = self.lm_head[...].astype(hidden.dtype)
      out = jnp.einsum("...D,DV->...V", hidden, w, preferred_element_type=jnp.float32)
    if self.config.final_logit_softcap:
      cap = self.config.final_logit_softcap
      out = jnp.tanh(out / cap) * cap
    return out

  def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None,
                    cache=None):
    positions, segment_ids = _inputs(input_ids, attention_mask, positions, segment_ids)
    return self.model(input_ids, positions=positions, segment_ids=segment_ids, cache=cache)

  def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None,
               cache: Cache | None = None):
    """Logits [B, T, V] (fp32); with a cache, (logits, new cache).

    Positions follow the mask (or restart per packed segment), so left and right padding both work.
    """
    h, new_cache = self.hidden_states(input_ids, attention_mask, positions=positions,
                                      segment_ids=segment_ids, cache=cache)
    logits = constrain(self.logits(h), ("batch", "seq", "act_vocab"))
    return logits if cache is None else (logits, new_cache)


def last_token_index(attention_mask: Array) -> Array:
  """Index of the rightmost non-pad token of each row (left or right padding)."""
  T = attention_mask.shape[1]
  return jnp.max(jnp.where(attention_mask > 0, jnp.arange(T), 0), axis=1)


def pool_last(hidden: Array, attention_mask: Array) -> Array:
  idx = last_token_index(attention_mask)
  return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


class SequenceClassifier(nnx.Module):
  """Transformer + a linear score head (no bias) read at the last non-pad token, as transformers'
  `*ForSequenceClassification` reward models (e.g. Skywork-Reward-Llama-3.1-8B)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    if cfg.num_labels < 1:
      raise ValueError("a sequence classifier needs num_labels >= 1")
    self.config = cfg
    self.model = Transformer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.score = nnx.Param(_init(rngs, (cfg.hidden_size, cfg.num_labels), param_dtype),
                           logical_axes=("embed", "labels"))

  @property
  def dtype(self):
    return self.model.dtype

  def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None):
    """Scores [B, num_labels] (fp32)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    positions, segment_ids = _inputs(input_ids, attention_mask, positions, segment_ids)
    h, _ = self.model(input_ids, positions=positions, segment_ids=segment_ids)
    pooled = pool_last(h, attention_mask)
    return jnp.einsum("BD,DL->BL", pooled, self.score[...].astype(pooled.dtype),
                      preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
  """An empty KV cache for `max_len` slots. Sharded by the caller (`cache_shardings`).

  "end" is the next slot to write: a scalar (all rows in step, a left-padded batch) or, for the
  slot cache of continuous batching, an [batch] array set by the caller (one per row)."""
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {
      "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                 for _ in range(cfg.num_layers)],
      "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
      "end": jnp.zeros((), jnp.int32),
  }


CACHE_KV_AXES = ("batch", "cache_seq", "act_kv_heads", "head_dim")
