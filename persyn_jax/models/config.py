"""One frozen config for every supported decoder family.

Families differ by a handful of switches (bias, q/k norm, Gemma's norms and soft-caps, sliding
windows), so one `Transformer` reads them from here instead of one class per family.
"""
from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding of one layer kind (`rope_parameters` of transformers v5, `rope_theta` +
  `rope_scaling` of v4)."""

  theta: float = 10000.0
  rope_type: str = "default"  # default | linear | llama3
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  # Gemma 3 uses another theta on its sliding layers.
  rope_local: RopeConfig | None = None
  tie_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  activation: str = "silu"  # silu | gelu_tanh
  # Gemma: norm weight stored as w - 1 (scale is 1 + w), embeddings times sqrt(hidden_size),
  # an extra norm after attention and after the MLP.
  gemma_norm: bool = False
  embed_scale: bool = False
  post_norms: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  # One entry per layer: True where the layer attends within `sliding_window` only.
  sliding_layers: tuple[bool, ...] = ()
  max_position_embeddings: int = 8192
  pad_token_id: int | None = None
  bos_token_id: Any = None
  eos_token_id: Any = None
  # Sequence classification (reward models): number of outputs of the score head.
  num_labels: int = 0

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_kv_heads}")
    if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
      raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for "
                       f"{self.num_layers} layers")
    if self.activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"activation {self.activation!r} is not one of silu, gelu_tanh")

  @property
  def attn_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def layer_is_sliding(self, i: int) -> bool:
    return bool(self.sliding_window) and bool(self.sliding_layers) and self.sliding_layers[i]

  def num_params(self, *, include_embeddings: bool = True) -> int:
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    n = self.num_layers * per_layer + d
    if include_embeddings:
      n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return n

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per matmul weight, plus attention scores and values."""
    matmul = 2 * self.num_params(include_embeddings=False) + 2 * self.vocab_size * self.hidden_size
    attn = 4 * self.num_layers * self.num_heads * self.head_dim * seq_len / 2  # causal: half
    return matmul + attn

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)
