"""Hugging Face config.json <-> our ModelConfig (transformers v4 and v5 keys), and the checkpoint
error every loader raises."""
from __future__ import annotations

import json
from typing import Any

from persyn_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeConfig


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


GEMMA = ("gemma2", "gemma3_text")


def _rope_from(params: dict | None, fallback_theta: float) -> RopeConfig:
  params = dict(params or {})
  rtype = params.get("rope_type", params.get("type", "default"))
  if rtype not in ("default", "linear", "llama3"):
    raise CheckpointError(f"rope type {rtype!r} is not supported (default, linear, llama3)")
  return RopeConfig(
      theta=float(params.get("rope_theta", fallback_theta)), rope_type=rtype,
      factor=float(params.get("factor", 1.0)),
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)))


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
  """Our ModelConfig from the dict of an HF config.json (transformers v4 or v5 keys)."""
  mt = hf.get("model_type")
  if mt == "gemma3" and "text_config" in hf:
    raise CheckpointError(f"{source}: model_type 'gemma3' is the multimodal Gemma 3; use its text "
                          "model (model_type 'gemma3_text', Gemma3ForCausalLM)")
  if mt not in SUPPORTED_MODEL_TYPES or mt == "gemma3":
    raise CheckpointError(f"{source}: model_type {mt!r} is not supported; supported: "
                          f"{', '.join(t for t in SUPPORTED_MODEL_TYPES if t != 'gemma3')}")
  def count(key: str, default: int | None = None) -> int:
    """A positive integer field (a value of another type is named, not passed to int())."""
    v = hf.get(key)
    v = default if v is None else v
    if v is None:
      raise CheckpointError(f"{source}: required field {key!r} is missing")
    if isinstance(v, float) and v.is_integer():
      v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise CheckpointError(f"{source}: field {key!r} = {v!r}: expected a positive integer")
    return v

  D, L, N = count("hidden_size"), count("num_hidden_layers"), count("num_attention_heads")
  vocab, F = count("vocab_size"), count("intermediate_size")
  K = count("num_key_value_heads", N)
  H = count("head_dim", D // N)
  gemma = mt in GEMMA
  act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
  acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
  if act not in acts:
    raise CheckpointError(f"{source}: hidden activation {act!r} is not supported ({', '.join(acts)})")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise CheckpointError(f"{source}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported")

  # RoPE: v5 `rope_parameters` (for Gemma 3: one dict per layer type), else v4 keys.
  rp = hf.get("rope_parameters")
  theta = float(hf.get("rope_theta", 1_000_000.0 if mt == "gemma3_text" else 10000.0))
  rope_local = None
  if isinstance(rp, dict) and "full_attention" in rp:
    rope = _rope_from(rp["full_attention"], theta)
    rope_local = _rope_from(rp.get("sliding_attention"), float(hf.get("rope_local_base_freq", 10000.0)))
  elif rp:
    rope = _rope_from(rp, theta)
  else:
    rope = _rope_from(hf.get("rope_scaling"), theta)
  if mt == "gemma3_text" and rope_local is None:
    rope_local = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10000.0)))

  window = hf.get("sliding_window")
  if mt in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    window = None
  layer_types = hf.get("layer_types")
  if window and layer_types:
    sliding = tuple(t == "sliding_attention" for t in layer_types)
  elif window and mt == "gemma2":
    sliding = tuple(i % 2 == 0 for i in range(L))
  elif window and mt == "gemma3_text":
    pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
    sliding = tuple((i + 1) % pattern != 0 for i in range(L))
  elif window:
    sliding = (True,) * L
  else:
    sliding = ()
  attn_bias = bool(hf.get("attention_bias", False))
  num_labels = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 0) or 0)
  return ModelConfig(
      model_type=mt, vocab_size=vocab, hidden_size=D, intermediate_size=F, num_layers=L,
      num_heads=N, num_kv_heads=K, head_dim=H, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope=rope, rope_local=rope_local,
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      qkv_bias=attn_bias or mt == "qwen2", o_bias=attn_bias and mt != "qwen2",
      mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=mt in ("qwen3", "gemma3_text"),
      activation=acts[act], gemma_norm=gemma, embed_scale=gemma, post_norms=gemma,
      query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]) if gemma and hf.get("query_pre_attn_scalar") else None,
      attn_logit_softcap=hf.get("attn_logit_softcapping") if gemma else None,
      final_logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
      sliding_window=int(window) if window else None, sliding_layers=sliding,
      max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
      pad_token_id=hf.get("pad_token_id"), bos_token_id=_tupled(hf.get("bos_token_id")),
      eos_token_id=_tupled(hf.get("eos_token_id")), num_labels=num_labels)


def _tupled(x):
  return tuple(x) if isinstance(x, list) else x


HF_ARCH = {"phi3": "Phi3", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
           "gemma2": "Gemma2", "gemma3_text": "Gemma3"}


def config_to_hf(cfg: ModelConfig, *, classifier: bool = False) -> dict[str, Any]:
  """config.json contents (transformers v5 keys) that transformers reads back as the same model."""
  def rope_dict(r: RopeConfig):
    d = {"rope_type": r.rope_type, "rope_theta": r.theta}
    if r.rope_type == "linear":
      d["factor"] = r.factor
    if r.rope_type == "llama3":
      d.update(factor=r.factor, low_freq_factor=r.low_freq_factor,
               high_freq_factor=r.high_freq_factor,
               original_max_position_embeddings=r.original_max_position_embeddings)
    return d

  mt = cfg.model_type
  name = HF_ARCH[mt] + ("ForSequenceClassification" if classifier else "ForCausalLM")
  hf: dict[str, Any] = {
      "architectures": [name], "model_type": mt, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings, "pad_token_id": cfg.pad_token_id,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
      "torch_dtype": "float32",
  }
  act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.activation]
  if cfg.gemma_norm:
    hf["hidden_activation"] = act
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    hf["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
    hf["attn_logit_softcapping"] = cfg.attn_logit_softcap
    hf["final_logit_softcapping"] = cfg.final_logit_softcap
  else:
    hf["hidden_act"] = act
  if mt == "llama":
    hf["attention_bias"] = cfg.qkv_bias
    hf["mlp_bias"] = cfg.mlp_bias
  if mt == "qwen3":
    hf["attention_bias"] = cfg.qkv_bias
  if cfg.rope_local is not None:
    hf["rope_parameters"] = {"full_attention": rope_dict(cfg.rope),
                             "sliding_attention": rope_dict(cfg.rope_local)}
  else:
    hf["rope_parameters"] = rope_dict(cfg.rope)
  hf["sliding_window"] = cfg.sliding_window
  if mt in ("qwen2", "qwen3"):
    hf["use_sliding_window"] = bool(cfg.sliding_window)
    hf["max_window_layers"] = 0
  if cfg.sliding_window or mt in GEMMA:
    hf["layer_types"] = ["sliding_attention" if cfg.layer_is_sliding(i) else "full_attention"
                         for i in range(cfg.num_layers)]
  if classifier:
    hf["num_labels"] = cfg.num_labels
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
  return hf


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path} is missing") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data
