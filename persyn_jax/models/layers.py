"""One decoder block with stacked parameters, and what differs per layer as scanned data.

Every parameter of the block carries a leading `layers` axis (logical axis "layers", on no mesh
axis): `Transformer` runs the block with jax.lax.scan, so the traced and compiled program holds
one block body whatever the depth. What differs between layers is data indexed by the scan, not
Python branches: the RoPE inverse frequencies (Gemma 3's local vs global theta) and the sliding
window (0 = global; Gemma 2/3 alternate). The KV cache is stacked the same way, k and v
[L, B, S, K, H]; a layer writes its new keys into its own slice in place and attends over that
slice, so the attention kernels keep their [B, S, K, H] interface.

Shapes read off the einsum strings: B batch, T query tokens, S key slots, D embed, F mlp,
N query heads, K kv heads, G query heads per kv head, H head dim, V vocab.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persyn_jax.kernels.attention import attention
from persyn_jax.models.config import ModelConfig, RopeConfig
from persyn_jax.sharding import constrain

Array = jax.Array
LAYERS = "layers"  # the logical name of the stacked axis (sharding.py maps it to no mesh axis)
# SFT's named rematerialization policies for the scanned block body: what the backward pass
# keeps from the forward pass ("none": everything; "full": only the block's inputs).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
  return std * jax.random.normal(rngs.params(), shape, dtype)


def _stacked(stack: int | None, shape, axes):
  if stack is None:
    return tuple(shape), tuple(axes)
  return (stack,) + tuple(shape), (LAYERS,) + tuple(axes)


def token_einsum(eqn: str, x: Array, w, **kw) -> Array:
  """jnp.einsum(eqn, x, w) for an activation x whose leading axes are batch and tokens ("BT..."
  in eqn), computed on x reshaped to one token axis [B*T, ...] and reshaped back.

  The value is the same; the gradient is not computed the same way. The weight's gradient then
  contracts one axis, not two, and XLA's CPU backend no longer transposes the output's gradient
  into a [B*T]-minor copy before each such dot (a strided copy fused with the elementwise
  backward around it): a small model's CPU SFT step went from 368 to 285 ms (bench/sft.py's cpu
  preset; docs/PERFORMANCE.md). On TPU/GPU the reshape is free (B and T are adjacent; "seq" is
  never sharded, so B's sharding carries over).
  """
  xs, rest = eqn.replace(" ", "").split(",", 1)
  ws, out = rest.split("->")
  if not (xs.startswith("BT") and out.startswith("BT") and x.ndim == len(xs) >= 3):
    return jnp.einsum(eqn, x, w, **kw)
  B, T = x.shape[:2]
  y = jnp.einsum(f"{xs[1:]},{ws}->{out[1:]}", x.reshape((B * T,) + x.shape[2:]), w, **kw)
  return y.reshape((B, T) + y.shape[1:])


class Einsum(nnx.Module):
  """A weight and the einsum that applies it; the weight carries its logical axis names. With
  `stack`, the weight has a leading layers axis and is applied one layer slice at a time."""

  def __init__(self, eqn: str, shape: Sequence[int], axes: Sequence[str], *, rngs: nnx.Rngs,
               dtype, param_dtype, stack: int | None = None):
    self.eqn = eqn
    self.dtype = dtype
    shape, axes = _stacked(stack, shape, axes)
    self.w = nnx.Param(_init(rngs, shape, param_dtype), logical_axes=axes)

  def __call__(self, x: Array) -> Array:
    w = self.w[...]
    # a cast only where needed: an int8 weight (models/quant.py) arrives as qwix's quantized
    # array in the compute dtype, which it dequantizes inside the einsum and cannot cast
    return token_einsum(self.eqn, x, w if w.dtype == self.dtype else w.astype(self.dtype))


class Bias(nnx.Module):
  def __init__(self, shape, axes, *, param_dtype, dtype, stack: int | None = None):
    self.dtype = dtype
    shape, axes = _stacked(stack, shape, axes)
    self.b = nnx.Param(jnp.zeros(shape, param_dtype), logical_axes=axes)

  def __call__(self, x):
    return x + self.b[...].astype(self.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, gemma: bool, param_dtype, stack: int | None = None):
    self.eps, self.gemma = eps, gemma
    shape, axes = _stacked(stack, (dim,), ("norm",))
    # Gemma stores the scale as w - 1 (its norm multiplies by 1 + w).
    self.scale = nnx.Param(jnp.zeros(shape, param_dtype) if gemma else jnp.ones(shape, param_dtype),
                           logical_axes=axes)

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


def apply_rope(x: Array, positions: Array, inv_freq) -> Array:
  """Rotate-half RoPE. x: [B, T, N, H]; positions: [B, T]; inv_freq [H/2] (may be traced)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
  cos = jnp.cos(freqs)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(freqs)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def layer_data(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """What differs per layer, stacked for the scan: "inv_freq" [L, H/2] fp32 (a sliding layer of
  Gemma 3 uses rope_local) and "window" [L] int32 (the sliding window, 0 = global attention)."""
  inv = [rope_inv_freq(cfg.rope_local if (cfg.layer_is_sliding(i) and cfg.rope_local is not None)
                       else cfg.rope, cfg.head_dim) for i in range(cfg.num_layers)]
  window = [cfg.sliding_window if cfg.layer_is_sliding(i) else 0 for i in range(cfg.num_layers)]
  return {"inv_freq": np.stack(inv).astype(np.float32), "window": np.asarray(window, np.int32)}


def static_window(cfg: ModelConfig) -> int | None:
  """The window every layer shares (None: all global), or -1 when layers differ (then the window
  is scanned data and attention masks with the layer's own value)."""
  sizes = set(layer_data(cfg)["window"].tolist())
  return (sizes.pop() or None) if len(sizes) == 1 else -1


def write_slots(cache: Array, new: Array, end: Array | int) -> Array:
  """cache [B, S, ...] with new [B, T, ...] written at slots end..end+T-1: the same slots for every
  row when `end` is a scalar, row b's own slots from end[b] when it is an [B] array."""
  if jnp.ndim(end) == 0:
    return jax.lax.dynamic_update_slice(cache, new, (0, end) + (0,) * (cache.ndim - 2))
  row = lambda c, n, e: jax.lax.dynamic_update_slice(c, n, (e,) + (0,) * (c.ndim - 1))
  return jax.vmap(row)(cache, new, end)


def write_layer(cache: Array, layer: Array, new: Array, end: Array | int) -> Array:
  """The stacked cache [L, B, S, ...] with new [B, T, ...] written into layer `layer`'s slots
  (as `write_slots`); only the new tokens are written, so a scan carrying the cache updates its
  buffer in place instead of copying a layer per step."""
  if jnp.ndim(end) == 0:
    return jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, end) + (0,) * (cache.ndim - 3))
  row = lambda c, n, e: jax.lax.dynamic_update_slice(c, n[None], (layer, e) + (0,) * (c.ndim - 2))
  return jax.vmap(row, in_axes=(1, 0, 0), out_axes=1)(cache, new, end)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype, stack: int | None = None):
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=stack)
    self.q = Einsum("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), **kw)
    self.k = Einsum("BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), **kw)
    self.v = Einsum("BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), **kw)
    self.o = Einsum("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), **kw)
    bkw = dict(param_dtype=param_dtype, dtype=dtype, stack=stack)
    if cfg.qkv_bias:
      self.q_bias = Bias((N, H), ("heads", "head_dim"), **bkw)
      self.k_bias = Bias((K, H), ("kv_heads", "head_dim"), **bkw)
      self.v_bias = Bias((K, H), ("kv_heads", "head_dim"), **bkw)
    if cfg.o_bias:
      self.o_bias = Bias((D,), ("embed",), **bkw)
    if cfg.qk_norm:
      nkw = dict(gemma=cfg.gemma_norm, param_dtype=param_dtype, stack=stack)
      self.q_norm = RMSNorm(H, cfg.rms_norm_eps, **nkw)
      self.k_norm = RMSNorm(H, cfg.rms_norm_eps, **nkw)
    self.cfg = cfg
    self.window = static_window(cfg)

  def __call__(self, x, positions, q_idx, q_seg, kv: dict | None, k_seg, end, *, layer, inv_freq,
               window):
    """kv: the stacked cache {"k", "v": [L, B, S, K, H]} (or None) of which this call reads and
    writes slice `layer`; inv_freq [H/2] and window (0 = global) are this layer's scanned data."""
    cfg = self.cfg
    q, k, v = self.q(x), self.k(x), self.v(x)
    if cfg.qkv_bias:
      q, k, v = self.q_bias(q), self.k_bias(k), self.v_bias(v)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    # layers that differ in window pass the static size plus this layer's switch
    mixed = self.window == -1
    # in_order: queries and keys are both slots 0..T-1 (no cache, or an empty cache's prefill),
    # so the XLA path may skip the causal upper triangle (kernels.attention.xla_attention)
    attend = lambda q, k, v, k_idx, k_seg, in_order=False: attention(
        q, k, v, q_idx=q_idx, q_seg=q_seg, k_idx=k_idx, k_seg=k_seg,
        window=cfg.sliding_window if mixed else self.window,
        window_on=(window > 0) if mixed else None, softcap=cfg.attn_logit_softcap,
        scale=cfg.attn_scale, in_order=in_order)
    slots = lambda S: jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (x.shape[0], S))
    if kv is None:
      out = attend(q, k, v, slots(k.shape[1]), k_seg, True)
    else:
      k_new, v_new = k.astype(kv["k"].dtype), v.astype(kv["v"].dtype)
      kv = {"k": write_layer(kv["k"], layer, k_new, end),
            "v": write_layer(kv["v"], layer, v_new, end)}
      S = kv["k"].shape[2]
      # this layer's slice is read inside the branch that attends over the cache, so a prefill
      # (the other branch) reads nothing of it
      full = lambda: attend(q, kv["k"][layer].astype(x.dtype), kv["v"][layer].astype(x.dtype),
                            slots(S), k_seg)
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
  def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype, stack: int | None = None):
    D, F = cfg.hidden_size, cfg.intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=stack)
    self.gate = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), **kw)
    self.up = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), **kw)
    self.down = Einsum("BTF,FD->BTD", (F, D), ("mlp", "embed"), **kw)
    if cfg.mlp_bias:
      bkw = dict(param_dtype=param_dtype, dtype=dtype, stack=stack)
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
  """A decoder block; with `stack=L` its parameters hold all L layers (`Transformer` scans it)."""

  def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype, stack: int | None = None):
    norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma=cfg.gemma_norm,
                           param_dtype=param_dtype, stack=stack)
    self.attn_norm = norm()
    self.attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=stack)
    self.mlp_norm = norm()
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=stack)
    if cfg.post_norms:
      self.attn_post_norm = norm()
      self.mlp_post_norm = norm()
    self.post_norms = cfg.post_norms

  def __call__(self, x, positions, q_idx, q_seg, kv, k_seg, end, **layer):
    h, kv = self.attn(self.attn_norm(x), positions, q_idx, q_seg, kv, k_seg, end, **layer)
    if self.post_norms:
      h = self.attn_post_norm(h)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if self.post_norms:
      h = self.mlp_post_norm(h)
    x = constrain(x + h, ("batch", "seq", "act_embed"))
    return x, kv


def scan_blocks(blocks: Block, x: Array, kv: dict | None, data: dict, *, remat: str = "none",
                unroll: bool = False, **inputs) -> tuple[Array, dict | None]:
  """Runs the stacked `blocks` over x, layer by layer in one jax.lax.scan: the parameters and the
  per-layer `data` are the scanned inputs, x and the stacked cache the carry. `remat` names a
  policy of REMAT_POLICIES applied to the block body; `unroll` unrolls the scan (the same values;
  one block body per layer in the compiled program, see `Transformer.unroll`)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: not one of {sorted(REMAT_POLICIES)}")
  graphdef, state = nnx.split(blocks)

  def body(carry, xs):
    x, kv = carry
    st, d, i = xs
    x, kv = nnx.merge(graphdef, st)(x, kv=kv, layer=i, inv_freq=d["inv_freq"],
                                    window=d["window"], **inputs)
    return (x, kv), None

  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  L = len(data["window"])
  (x, kv), _ = jax.lax.scan(body, (x, kv), (state, jax.tree.map(jnp.asarray, data),
                                            jnp.arange(L, dtype=jnp.int32)), unroll=bool(unroll))
  return x, kv
