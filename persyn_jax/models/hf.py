"""Hugging Face checkpoints: config.json -> ModelConfig, safetensors -> sharded params, and back.

Weights are read tensor by tensor, each device's slice straight from a memmap onto its device
(`jax.make_array_from_callback`), so a host never holds a full second copy of the model.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeConfig
from persyn_jax.models.safetensors_io import SafeFile, SafetensorsError, save_file
from persyn_jax.models.transformer import CausalLM, SequenceClassifier


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


# ---- weight names and layouts -----------------------------------------------------------------
# Our layout -> HF layout: "same", "T" (2-D transpose), "qkv" ([D,N,H] <- [N*H,D]),
# "o" ([N,H,D] <- [D,N*H]), "bias_heads" ([N,H] <- [N*H]).

def weight_map(model: nnx.Module) -> dict[tuple, tuple]:
  """Our parameter path -> (HF tensor name, layout[, (first row, end row) of a fused tensor])."""
  cfg: ModelConfig = model.config
  out: dict[tuple, tuple] = {("model", "embed"): ("model.embed_tokens.weight", "same"),
                                       ("model", "final_norm", "scale"): ("model.norm.weight", "same")}
  gemma = cfg.gemma_norm
  for i in range(cfg.num_layers):
    p, h = ("model", "layers", i), f"model.layers.{i}."
    out[p + ("attn_norm", "scale")] = (h + "input_layernorm.weight", "same")
    if gemma:
      out[p + ("attn_post_norm", "scale")] = (h + "post_attention_layernorm.weight", "same")
      out[p + ("mlp_norm", "scale")] = (h + "pre_feedforward_layernorm.weight", "same")
      out[p + ("mlp_post_norm", "scale")] = (h + "post_feedforward_layernorm.weight", "same")
    else:
      out[p + ("mlp_norm", "scale")] = (h + "post_attention_layernorm.weight", "same")
    if cfg.model_type == "phi3":  # fused q|k|v and gate|up, split by rows
      N, K, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
      rows = {"q": (0, N * H), "k": (N * H, (N + K) * H), "v": ((N + K) * H, (N + 2 * K) * H)}
      for n in ("q", "k", "v"):
        out[p + ("attn", n, "w")] = (h + "self_attn.qkv_proj.weight", "qkv", rows[n])
      out[p + ("attn", "o", "w")] = (h + "self_attn.o_proj.weight", "o")
      out[p + ("mlp", "gate", "w")] = (h + "mlp.gate_up_proj.weight", "T", (0, F))
      out[p + ("mlp", "up", "w")] = (h + "mlp.gate_up_proj.weight", "T", (F, 2 * F))
      out[p + ("mlp", "down", "w")] = (h + "mlp.down_proj.weight", "T")
      continue
    for n in ("q", "k", "v"):
      out[p + ("attn", n, "w")] = (h + f"self_attn.{n}_proj.weight", "qkv")
      if cfg.qkv_bias:
        out[p + ("attn", f"{n}_bias", "b")] = (h + f"self_attn.{n}_proj.bias", "bias_heads")
    out[p + ("attn", "o", "w")] = (h + "self_attn.o_proj.weight", "o")
    if cfg.o_bias:
      out[p + ("attn", "o_bias", "b")] = (h + "self_attn.o_proj.bias", "same")
    if cfg.qk_norm:
      out[p + ("attn", "q_norm", "scale")] = (h + "self_attn.q_norm.weight", "same")
      out[p + ("attn", "k_norm", "scale")] = (h + "self_attn.k_norm.weight", "same")
    for n in ("gate", "up", "down"):
      out[p + ("mlp", n, "w")] = (h + f"mlp.{n}_proj.weight", "T")
      if cfg.mlp_bias:
        out[p + ("mlp", f"{n}_bias", "b")] = (h + f"mlp.{n}_proj.bias", "same")
  if isinstance(model, SequenceClassifier):
    out[("score",)] = ("score.weight", "T")
  elif not cfg.tie_embeddings:
    out[("lm_head",)] = ("lm_head.weight", "T")
  return out


def fused_rows(wmap: dict, name: str) -> int:
  return max(entry[2][1] for entry in wmap.values() if entry[0] == name and len(entry) > 2)


def hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if layout == "same":
    return shape
  if layout == "T":
    return shape[::-1]
  if layout == "qkv":
    return (shape[1] * shape[2], shape[0])
  if layout == "o":
    return (shape[2], shape[0] * shape[1])
  if layout == "bias_heads":
    return (shape[0] * shape[1],)
  raise ValueError(layout)


def _span(s: slice, n: int) -> tuple[int, int]:
  start, stop, _ = s.indices(n)
  return start, stop


def read_slice(src: np.ndarray, layout: str, index: tuple, shape: tuple[int, ...]) -> np.ndarray:
  """The block `index` (of our layout, global shape `shape`) read from HF-layout `src`."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  if layout == "same":
    return np.asarray(src[index])
  if layout == "T":
    return np.asarray(src[index[1], index[0]]).T
  if layout == "qkv":  # ours [D, N, H] <- [N*H, D]
    D, N, H = shape
    n0, n1 = _span(index[1], N)
    block = np.asarray(src[n0 * H:n1 * H, index[0]])
    return block.reshape(n1 - n0, H, -1).transpose(2, 0, 1)[:, :, index[2]]
  if layout == "o":  # ours [N, H, D] <- [D, N*H]
    N, H, D = shape
    n0, n1 = _span(index[0], N)
    block = np.asarray(src[index[2], n0 * H:n1 * H])
    return block.reshape(-1, n1 - n0, H).transpose(1, 2, 0)[:, index[1], :]
  if layout == "bias_heads":
    N, H = shape
    n0, n1 = _span(index[0], N)
    return np.asarray(src[n0 * H:n1 * H]).reshape(n1 - n0, H)[:, index[1]]
  raise ValueError(layout)


def to_hf_layout(arr: np.ndarray, layout: str) -> np.ndarray:
  if layout == "same":
    return arr
  if layout == "T":
    return arr.T
  if layout == "qkv":
    D, N, H = arr.shape
    return arr.transpose(1, 2, 0).reshape(N * H, D)
  if layout == "o":
    N, H, D = arr.shape
    return arr.transpose(2, 0, 1).reshape(D, N * H)
  if layout == "bias_heads":
    return arr.reshape(-1)
  raise ValueError(layout)


# ---- loading ----------------------------------------------------------------------------------

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _open_weights(path: str, allow_pickle: bool) -> dict[str, Callable[[], np.ndarray]]:
  """Tensor name -> a function returning an indexable array (memmap), for every weight file."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      try:
        wmap = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    files = {}
    for fname in sorted(set(wmap.values())):
      if os.path.basename(fname) != fname:
        raise CheckpointError(f"{index}: weight file {fname!r} is not a plain file name")
      fpath = os.path.join(path, fname)
      if not os.path.exists(fpath):
        raise CheckpointError(f"{index} lists {fname}, which is missing")
      files[fname] = _safe(fpath)
    return {name: (lambda f=files[fname], n=name: f.array(n)) for name, fname in wmap.items()
            if _has(files[fname], name, index)}
  if os.path.exists(single):
    f = _safe(single)
    return {name: (lambda n=name: f.array(n)) for name in f.names()}
  pickles = [n for n in ("pytorch_model.bin", "model.pt", "model.pth") if os.path.exists(os.path.join(path, n))]
  if pickles:
    if not allow_pickle:
      raise CheckpointError(
          f"{os.path.join(path, pickles[0])}: pickle checkpoints are refused, since unpickling can "
          "run arbitrary code. Convert it to safetensors (transformers: "
          "model.save_pretrained(dir, safe_serialization=True)), or pass allow_pickle=True to "
          "load it with torch.load(weights_only=True)")
    import torch  # optional, only for this explicit opt-in
    sd = torch.load(os.path.join(path, pickles[0]), map_location="cpu", weights_only=True)
    return {k: (lambda t=v: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()) for k, v in sd.items()}
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _safe(fpath):
  try:
    return SafeFile(fpath)
  except SafetensorsError as e:
    raise CheckpointError(str(e)) from None


def _has(f: SafeFile, name: str, index: str) -> bool:
  if name not in f.header:
    raise CheckpointError(f"{index} maps {name!r} to {f.path}, which does not hold it")
  return True


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


def load_params(model: nnx.Module, path: str, mesh, dtype, *, allow_pickle: bool = False) -> nnx.Module:
  """Fills an abstract model (from nnx.eval_shape) with the weights of `path`, sharded on `mesh`."""
  tensors = _open_weights(path, allow_pickle)
  wmap = weight_map(model)
  graphdef, state = nnx.split(model)
  expected = {entry[0] for entry in wmap.values()}
  unexpected = sorted(n for n in tensors if n not in expected and not n.endswith(IGNORED_SUFFIXES)
                      and not (n == "lm_head.weight" and model.config.tie_embeddings))
  missing = sorted(n for n in expected if n not in tensors)
  if missing:
    raise CheckpointError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
  if unexpected:
    raise CheckpointError(f"{path}: unexpected tensors {unexpected[:8]}"
                          f"{' ...' if len(unexpected) > 8 else ''} for model_type "
                          f"{model.config.model_type!r}")
  flat = dict(nnx.to_flat_state(state))
  for ppath, var in flat.items():
    if ppath not in wmap:
      raise CheckpointError(f"internal: parameter {ppath} has no HF name")
    name, layout, *rows = wmap[ppath]
    shape = tuple(var.get_value().shape)
    src = tensors[name]()
    if not (np.issubdtype(src.dtype, np.floating) or src.dtype == ml_dtypes.bfloat16):
      raise CheckpointError(f"{path}: tensor {name!r} has dtype {src.dtype}; weights must be "
                            "floating point (a mis-typed or quantized export?)")
    want = hf_shape(layout, shape)
    if rows:
      r0, r1 = rows[0]
      full = (fused_rows(wmap, name),) + want[1:]
      if tuple(src.shape) != full:
        raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(src.shape)}, expected {full}")
      src = src[r0:r1]
    if tuple(src.shape) != want:
      raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(src.shape)}, expected {want}")
    sharding = shd.variable_sharding(var, mesh)
    np_dtype = np.dtype(dtype)
    arr = jax.make_array_from_callback(
        shape, sharding, lambda idx, s=src, l=layout, sh=shape: read_slice(s, l, idx, sh).astype(np_dtype))
    var.set_value(arr)
  return nnx.merge(graphdef, state)  # the variables of `state` were filled in place


def save_params(model: nnx.Module, path: str, *, dtype=None, max_shard_bytes: int = 4 << 30) -> None:
  """Writes the weights in HF layout (safetensors, sharded with an index past max_shard_bytes)."""
  wmap = weight_map(model)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  parts: dict[str, list] = {}
  for ppath, (name, layout, *rows) in wmap.items():
    arr = np.asarray(jax.device_get(flat[ppath].get_value()))
    if dtype is not None:
      arr = arr.astype(np.dtype(dtype))
    parts.setdefault(name, []).append((rows[0][0] if rows else 0, to_hf_layout(arr, layout)))
  items = [(name, np.ascontiguousarray(np.concatenate([a for _, a in sorted(ps, key=lambda x: x[0])])
                                       if len(ps) > 1 else ps[0][1])) for name, ps in parts.items()]
  shards, cur, size = [], [], 0
  for it in items:
    n = it[1].nbytes
    if cur and size + n > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(it)
    size += n
  shards.append(cur)
  if len(shards) == 1:
    _atomic_save(shards[0], os.path.join(path, "model.safetensors"))
    return
  wmap_out, total = {}, 0
  for i, sh in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    _atomic_save(sh, os.path.join(path, fname))
    for name, arr in sh:
      wmap_out[name] = fname
      total += arr.nbytes
  _atomic_json({"metadata": {"total_size": total}, "weight_map": wmap_out},
               os.path.join(path, "model.safetensors.index.json"))


def _atomic_save(items, fpath):
  tmp = fpath + ".tmp"
  save_file(items, tmp, metadata={"format": "pt"})
  os.replace(tmp, fpath)


def _atomic_json(obj, fpath):
  tmp = fpath + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, fpath)
