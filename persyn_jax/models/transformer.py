"""The decoder: one config-driven flax.nnx module for Llama, Mistral, Qwen2/2.5/3 and Gemma 2/3.

The decoder blocks are one stacked `Block` run by jax.lax.scan (models/layers.py): trace and
compile time do not grow with depth. The KV cache is a plain dict pytree, passed in and returned;
its k and v are stacked over layers, [L, B, S, K, H].
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# NEG_INF, attention_mask and the block's pieces stay importable from here (re-exported)
from persyn_jax.kernels.attention import NEG_INF, attention, attention_mask  # noqa: F401
from persyn_jax.models.config import ModelConfig
from persyn_jax.models.layers import (LAYERS, REMAT_POLICIES, Attention, Bias, Block,  # noqa: F401
                                      Einsum, MLP, RMSNorm, _init, apply_rope, layer_data,
                                      rope_inv_freq, scan_blocks, write_slots)
from persyn_jax.sharding import constrain

Array = jax.Array
Cache = dict[str, Any]


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
    self.layers = Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, stack=cfg.num_layers)
    # SFT's rematerialization of the scanned block body (REMAT_POLICIES; `set_remat`)
    self.remat = "none"
    # SFT's unrolled layer loop (`set_unroll`): on XLA's CPU backend the scan's stacked residuals
    # (zero-filled, written and read back per layer) cost a small model's training step about a
    # sixth of its time; unrolled, each layer's residuals are plain buffers
    self.unroll = False
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
    x, kv = scan_blocks(self.layers, x, None if cache is None else cache["layers"],
                        layer_data(self.cfg), remat=self.remat, unroll=self.unroll,
                        positions=positions, q_idx=q_idx,
                        q_seg=segment_ids, k_seg=k_seg, end=end)
    x = self.final_norm(x)
    if cache is None:
      return x, None
    return x, {"layers": kv, "segment_ids": k_seg, "end": end + T}


def _inputs(input_ids, attention_mask, positions, segment_ids):
  if segment_ids is None:
    segment_ids = (jnp.ones_like(input_ids) if attention_mask is None else attention_mask)
    if positions is None and attention_mask is not None:
      # an HF attention mask: a token's position counts the tokens before it (cumsum - 1, as
      # transformers' generate numbers them), also across zeros inside a row, where the tokens
      # on both sides see each other; packed rows pass segment_ids and restart per segment
      tokens = (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
      positions = jnp.maximum(jnp.cumsum(tokens, axis=1) - 1, 0)
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

    Positions count the mask's tokens (or restart per packed segment of `segment_ids`), so left
    and right padding both work.
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
  `*ForSequenceClassification` reward models (e.g. Skywork-Reward-Llama-3.1-8B): the rightmost
  token that is in the mask and is not `pad_token_id` (with pad = EOS, a trailing EOS is skipped)."""

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
    read = attention_mask > 0
    if self.config.pad_token_id is not None:
      read &= input_ids != self.config.pad_token_id
    pooled = pool_last(h, read)
    return jnp.einsum("BD,DL->BL", pooled, self.score[...].astype(pooled.dtype),
                      preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
  """An empty KV cache for `max_len` slots. Sharded by the caller (`cache_shardings`).

  "end" is the next slot to write: a scalar (all rows in step, a left-padded batch) or, for the
  slot cache of continuous batching, an [batch] array set by the caller (one per row).
  "layers" holds k and v stacked over layers, [L, batch, max_len, K, H]."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {
      "layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
      "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
      "end": jnp.zeros((), jnp.int32),
  }


CACHE_KV_AXES = (LAYERS, "batch", "cache_seq", "act_kv_heads", "head_dim")


def set_remat(model: nnx.Module, policy: str) -> nnx.Module:
  """Sets the rematerialization policy of `model`'s scanned block body (REMAT_POLICIES: none,
  full, dots, dots_no_batch); returns the model."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat={policy!r}: not one of {sorted(REMAT_POLICIES)}")
  model.model.remat = policy
  return model


def set_unroll(model: nnx.Module, unroll: bool) -> nnx.Module:
  """Unrolls (or scans again) `model`'s layer loop; the values are the same. Unrolled, the compiled
  program holds one block per layer (compile time grows with depth); returns the model."""
  model.model.unroll = bool(unroll)
  return model
