"""One frozen config for every supported decoder family.

Families differ by a handful of switches (bias, q/k norm, Gemma's norms and soft-caps, sliding
windows), so one `Transformer` reads them from here instead of one class per family.
`config_from_hf` / `config_to_hf` translate a Hugging Face config.json; values that are looped
over or allocated before the weights are seen are bounded (`checks.MAX_*`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from persyn_jax.models import checks
from persyn_jax.models.checks import CheckpointError

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
    """Forward FLOPs per token of a causal sequence of seq_len tokens: 2 per matmul weight (the
    LM head included, the embedding lookup not), plus attention_flops_per_token. For a dense
    model, training's 3x this is 6 N + 6 L d seq_len: PaLM's 6 N + 12 L d seq_len with the
    causal half of the attention square, as MaxText counts it."""
    matmul = 2 * self.num_params(include_embeddings=False) + 2 * self.vocab_size * self.hidden_size
    return matmul + self.attention_flops_per_token(seq_len)

  def attention_flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token of attention's scores and values (4 heads x head_dim per key),
    averaged over a causal sequence: seq_len / 2 keys per token, and in a sliding layer of window
    W < seq_len, W - W^2 / (2 seq_len) (each token sees min(position, W) keys)."""
    total = 0.0
    for i in range(self.num_layers):
      w = self.sliding_window if self.layer_is_sliding(i) else None
      keys = seq_len / 2 if not w or w >= seq_len else w - w * w / (2 * seq_len)
      total += 4 * self.num_heads * self.head_dim * keys
    return total

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


# ---- config.json (transformers v4 or v5 keys) <-> ModelConfig --------------------------------

GEMMA = ("gemma2", "gemma3_text")


def _real(source: str, key: str, value: Any) -> float:
  """A positive finite number field (a string, null or 0 named here, not in a rotary table)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or \
      not math.isfinite(value) or value <= 0:
    raise CheckpointError(f"{source}: field {key!r} = {value!r}: expected a positive number")
  return float(value)


def _rope_from(params: dict | None, fallback_theta: float, source: str, key: str,
               original_max: Any = None) -> RopeConfig:
  """One rotary table; `original_max`: the llama3 pretraining length when the table has none
  (transformers' rule, given by the caller), or None to read the table's own."""
  params = dict(params or {})
  rtype = params.get("rope_type", params.get("type", "default"))
  if rtype not in ("default", "linear", "llama3"):
    raise CheckpointError(f"{source}: {key}: rope type {rtype!r} is not supported (default, "
                          "linear, llama3)")
  if params.get("partial_rotary_factor") not in (None, 1, 1.0):
    raise CheckpointError(f"{source}: {key}.partial_rotary_factor="
                          f"{params['partial_rotary_factor']!r}: partial rotary is not supported")
  real = lambda k, default: _real(source, f"{key}.{k}", params.get(k, default))
  return RopeConfig(
      theta=real("rope_theta", fallback_theta), rope_type=rtype, factor=real("factor", 1.0),
      low_freq_factor=real("low_freq_factor", 1.0), high_freq_factor=real("high_freq_factor", 4.0),
      original_max_position_embeddings=int(
          real("original_max_position_embeddings", 8192) if original_max is None else
          _real(source, "original_max_position_embeddings", original_max)))


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
  """Our ModelConfig from the dict of an HF config.json (transformers v4 or v5 keys)."""
  try:
    return _config_from_hf(hf, source)
  except CheckpointError:
    raise
  except (TypeError, ValueError, ZeroDivisionError) as e:  # a value of an unexpected type or range
    raise CheckpointError(f"{source}: {e}") from None


# Sizes a config.json must state: never filled in from a default.
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
             "intermediate_size")


def _with_hf_defaults(hf: dict[str, Any], mt: str) -> dict[str, Any]:
  """`hf` plus, for each key it leaves out, the value transformers' config class of `mt` gives it,
  derived keys included (a Qwen2 file without `layer_types` gets the layers its
  `max_window_layers` implies; a Gemma 2 file without `query_pre_attn_scalar` gets 256): a
  trimmed or older config.json then means what it means to transformers. The file's own values
  are kept as they are (checked below); a file transformers cannot read is parsed as it is."""
  import logging
  import warnings
  try:
    from transformers import CONFIG_MAPPING
  except ImportError:  # pragma: no cover - transformers is a dependency
    return hf
  skip = {"model_type", "architectures", "auto_map", "transformers_version"}
  log = logging.getLogger("transformers")
  level = log.level
  log.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      full = CONFIG_MAPPING[mt](**{k: v for k, v in hf.items() if k not in skip}).to_dict()
  except Exception:  # noqa: BLE001 - a value transformers rejects is named by our own checks
    return hf
  finally:
    log.setLevel(level)
  return {**{k: v for k, v in full.items() if k not in _REQUIRED and k not in skip}, **hf}


def _config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
  mt = hf.get("model_type")
  if mt == "gemma3" and "text_config" in hf:
    raise CheckpointError(f"{source}: model_type 'gemma3' is the multimodal Gemma 3; use its text "
                          "model (model_type 'gemma3_text', Gemma3ForCausalLM)")
  if mt not in SUPPORTED_MODEL_TYPES or mt == "gemma3":
    raise CheckpointError(f"{source}: model_type {mt!r} is not supported; supported: "
                          f"{', '.join(t for t in SUPPORTED_MODEL_TYPES if t != 'gemma3')}")
  hf = _with_hf_defaults(hf, mt)
  def count(key: str, default: int | None = None, limit: str | None = None) -> int:
    """A positive integer field (a value of another type is named, not passed to int()), at most
    the named limit of `checks` (values that are looped over or allocated before the weights)."""
    v = hf.get(key)
    v = default if v is None else v
    if v is None:
      raise CheckpointError(f"{source}: required field {key!r} is missing")
    if isinstance(v, float) and v.is_integer():
      v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise CheckpointError(f"{source}: field {key!r} = {v!r}: expected a positive integer")
    return checks.check_value(source, key, v, limit) if limit else v

  D, L = count("hidden_size", limit="MAX_WIDTH"), count("num_hidden_layers", limit="MAX_LAYERS")
  N = count("num_attention_heads", limit="MAX_HEADS")
  vocab, F = count("vocab_size", limit="MAX_VOCAB"), count("intermediate_size", limit="MAX_WIDTH")
  K = count("num_key_value_heads", N, limit="MAX_HEADS")
  H = count("head_dim", D // N, limit="MAX_WIDTH")
  gemma = mt in GEMMA
  # Gemma's MLP reads hidden_activation, the others hidden_act
  act = (hf.get("hidden_activation") if gemma else None) or hf.get("hidden_act") or \
      ("gelu_pytorch_tanh" if gemma else "silu")
  acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
  if act not in acts:
    raise CheckpointError(f"{source}: hidden activation {act!r} is not supported ({', '.join(acts)})")
  if hf.get("partial_rotary_factor") not in (None, 1, 1.0):
    raise CheckpointError(f"{source}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported")
  if mt == "gemma3_text" and hf.get("use_bidirectional_attention"):
    raise CheckpointError(f"{source}: use_bidirectional_attention=true (an embedding model) is not "
                          "supported: the decoder attends causally")

  # RoPE: v5 `rope_parameters` (for Gemma 3: one dict per layer type), else v4 keys.
  rp = hf.get("rope_parameters")
  real = lambda key, default: _real(source, key, hf.get(key, default))
  theta = real("rope_theta", 1_000_000.0 if mt == "gemma3_text" else 10000.0)
  max_positions = count("max_position_embeddings", 8192)
  # llama3's pretraining length, as transformers' standardize_rope_params sets it: a top-level
  # original_max_position_embeddings wins over the table's own (one table only); a table without
  # one gets max_position_embeddings
  def original_max(table: dict | None, nested: bool):
    table = table or {}
    if table.get("rope_type", table.get("type")) != "llama3":
      return None
    top = None if nested else hf.get("original_max_position_embeddings")
    if top is not None:
      return top
    return None if table.get("original_max_position_embeddings") is not None else max_positions
  rope_local = None
  if isinstance(rp, dict) and "full_attention" in rp:
    rope = _rope_from(rp["full_attention"], theta, source, "rope_parameters.full_attention",
                      original_max(rp["full_attention"], True))
    rope_local = _rope_from(rp.get("sliding_attention"), real("rope_local_base_freq", 10000.0),
                            source, "rope_parameters.sliding_attention",
                            original_max(rp.get("sliding_attention"), True))
  elif rp:
    rope = _rope_from(rp, theta, source, "rope_parameters", original_max(rp, False))
  else:
    scaling = hf.get("rope_scaling")
    rope = _rope_from(scaling, theta, source, "rope_scaling", original_max(scaling, False))
  if mt == "gemma3_text" and rope_local is None:
    rope_local = RopeConfig(theta=real("rope_local_base_freq", 10000.0))

  # Sliding windows as transformers' model of each family reads them: Llama has none, Phi-3 (and
  # Mistral without layer_types) slides on every layer; a Mistral file with layer_types loads as
  # Ministral, which follows them, as Qwen and Gemma do.
  window = hf.get("sliding_window") if mt != "llama" else None
  if mt in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    window = None
  layer_types = hf.get("layer_types") if mt in ("mistral", "qwen2", "qwen3") + GEMMA else None
  if layer_types:
    layer_types = ["full_attention" if t == "attention" else t for t in layer_types]  # v5 alias
    odd = sorted({str(t) for t in layer_types} - {"full_attention", "sliding_attention"})
    if odd:
      raise CheckpointError(f"{source}: layer_types {odd} are not supported (full_attention, "
                            "sliding_attention)")
    if not window and "sliding_attention" in layer_types:
      # transformers cannot run such a file (its sliding-window mask needs a window); attending
      # globally instead would be a model the file does not describe
      off = ", use_sliding_window = false" if mt in ("qwen2", "qwen3") and \
          not hf.get("use_sliding_window", False) else ""
      raise CheckpointError(f"{source}: layer_types has sliding_attention layers, but no sliding "
                            f"window is set (sliding_window = {hf.get('sliding_window')!r}{off})")
  if window and layer_types:
    sliding = tuple(t == "sliding_attention" for t in layer_types)
  elif window and mt == "gemma2":
    sliding = tuple(i % 2 == 0 for i in range(L))
  elif window and mt in ("qwen2", "qwen3"):  # transformers' rule where it has no layer_types
    first = count("max_window_layers", 28) if hf.get("max_window_layers") != 0 else 0
    sliding = tuple(i >= first for i in range(L))
  elif window and mt == "gemma3_text":
    pattern = count("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    sliding = tuple((i + 1) % pattern != 0 for i in range(L))
  elif window:
    sliding = (True,) * L
  else:
    sliding = ()
  # biases as transformers' model of each family makes them: Qwen2 has q/k/v biases, Mistral and
  # Phi-3 none, the others follow attention_bias (and Llama mlp_bias)
  attn_bias = mt in ("llama", "qwen3") + GEMMA and bool(hf.get("attention_bias", False))
  num_labels = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 0) or 0)
  return ModelConfig(
      model_type=mt, vocab_size=vocab, hidden_size=D, intermediate_size=F, num_layers=L,
      num_heads=N, num_kv_heads=K, head_dim=H, rms_norm_eps=real("rms_norm_eps", 1e-6),
      rope=rope, rope_local=rope_local,
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      qkv_bias=attn_bias or mt == "qwen2", o_bias=attn_bias and mt != "qwen2",
      mlp_bias=mt == "llama" and bool(hf.get("mlp_bias", False)),
      qk_norm=mt in ("qwen3", "gemma3_text"),
      activation=acts[act], gemma_norm=gemma, embed_scale=gemma, post_norms=gemma,
      query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]) if gemma and hf.get("query_pre_attn_scalar") else None,
      # transformers' Gemma 3 attention does not apply attn_logit_softcapping: neither do we
      attn_logit_softcap=hf.get("attn_logit_softcapping") if mt == "gemma2" else None,
      final_logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
      sliding_window=int(window) if window else None, sliding_layers=sliding,
      max_position_embeddings=max_positions,
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
  if mt == "qwen3" or mt in GEMMA:
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
