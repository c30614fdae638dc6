"""Flax nnx decoder LMs that load and save Hugging Face checkpoints.

    model, tokenizer = from_pretrained("path/to/hf_dir", dtype="bfloat16", mesh=mesh)
    logits = model(input_ids, attention_mask)          # [batch, seq, vocab], fp32
    save_pretrained(model, tokenizer, "out_dir")       # HF layout, loads in transformers
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.models import checks
from persyn_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeConfig
from persyn_jax.models.hf import (CheckpointError, check_config, config_from_hf, config_to_hf,
                                  load_params, read_json, save_params, _atomic_json)
from persyn_jax.models.transformer import (CausalLM, SequenceClassifier, Transformer, init_cache,
                                           pool_last, last_token_index, CACHE_KV_AXES)

__all__ = ["from_pretrained", "save_pretrained", "load_config", "load_tokenizer", "ModelConfig",
           "RopeConfig", "CausalLM", "SequenceClassifier", "Transformer", "CheckpointError",
           "SUPPORTED_MODEL_TYPES", "init_cache", "pool_last", "as_dtype", "build_model", "load_model"]


def as_dtype(dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    names = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16"}
    try:
      return jnp.dtype(names.get(dtype, dtype))
    except TypeError:
      raise ValueError(f"unknown dtype {dtype!r}") from None
  return jnp.dtype(dtype)


def load_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
  """Our ModelConfig and the raw dict of `path/config.json` (plus generation_config.json eos ids)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory (a local Hugging Face model directory is expected)")
  hf = read_json(cfg_path)
  if hf.get("auto_map"):
    raise CheckpointError(f"{cfg_path}: auto_map asks for remote code, which is never run")
  cfg = config_from_hf(hf, source=cfg_path)
  check_config(cfg, path)  # before a model of these sizes is built
  gen_path = os.path.join(path, "generation_config.json")
  if os.path.exists(gen_path):
    hf["_generation_config"] = read_json(gen_path)
  return cfg, hf


def is_classifier(hf: dict) -> bool:
  return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def build_model(cfg: ModelConfig, *, classifier: bool = False, dtype="float32", param_dtype=None,
                seed: int = 0, abstract: bool = False) -> nnx.Module:
  """A randomly initialised model (or its abstract shape, for loading into)."""
  dtype = as_dtype(dtype)
  param_dtype = as_dtype(param_dtype) if param_dtype is not None else dtype
  cls = SequenceClassifier if classifier else CausalLM
  make = lambda: cls(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)
  return nnx.eval_shape(make) if abstract else make()


def load_tokenizer(path: str, *, allow_external_links: bool | None = None):
  """The tokenizer of directory `path`; its files are size-checked, and read only from inside it
  unless `allow_external_links` (default: env PERSYN_JAX_ALLOW_EXTERNAL_LINKS)."""
  from transformers import AutoTokenizer
  files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
  if not any(os.path.exists(os.path.join(path, f)) for f in files):
    raise CheckpointError(f"{path}: no tokenizer files ({', '.join(files)})")
  checks.check_tokenizer_dir(path, allow_external_links)
  # Exactly transformers' choice of tokenizer class, so ids match every HF tool. (For a model_type
  # such as qwen2, transformers picks Qwen2Tokenizer even for a generic tokenizer.json.)
  try:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
  except Exception as e:  # transformers raises many kinds; name the directory
    raise CheckpointError(f"{path}: the tokenizer does not load ({type(e).__name__}: {e})") from None
  checks.check_chat_template(tok, path)
  return tok


def from_pretrained(path: str, *, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None,
                    param_dtype=None, head: str = "auto", tokenizer: bool = True,
                    allow_pickle: bool = False):
  """Loads a local HF directory; returns (model, tokenizer) (tokenizer None if `tokenizer=False`).

  `dtype` is the compute dtype and, unless `param_dtype` is given, the storage dtype.
  `head`: "lm" (CausalLM), "classifier" (SequenceClassifier) or "auto" (from `architectures`).
  Never runs remote code; pickle checkpoints only with `allow_pickle=True` (weights_only).
  """
  cfg, hf = load_config(path)
  classifier = is_classifier(hf) if head == "auto" else head == "classifier"
  if head not in ("auto", "lm", "classifier"):
    raise ValueError(f"head={head!r}: expected auto, lm or classifier")
  if classifier and cfg.num_labels < 1:
    cfg = cfg.replace(num_labels=1)
  gen = hf.get("_generation_config", {})
  if gen.get("eos_token_id") is not None:
    eos = gen["eos_token_id"]
    cfg = cfg.replace(eos_token_id=_merge_ids(cfg.eos_token_id, eos))
  dtype = as_dtype(dtype)
  pdtype = as_dtype(param_dtype) if param_dtype is not None else dtype
  mesh = mesh if mesh is not None else shd.make_mesh(shd.MeshConfig(1, 1, 1), jax.devices()[:1])
  abstract = build_model(cfg, classifier=classifier, dtype=dtype, param_dtype=pdtype, abstract=True)
  model = load_params(abstract, path, mesh, pdtype, allow_pickle=allow_pickle)
  tok = load_tokenizer(path) if tokenizer else None
  return model, tok


def load_model(path: str, **kw):
  """(model, tokenizer) from an HF directory or a `persyn_jax.convert` (orbax) output; keyword
  arguments as `from_pretrained`."""
  from persyn_jax.convert import load_model as _load
  return _load(path, **kw)


def _merge_ids(a, b) -> tuple[int, ...] | None:
  out: list[int] = []
  for x in (a, b):
    for i in (x if isinstance(x, (list, tuple)) else [x]):
      if i is not None and int(i) not in out:
        out.append(int(i))
  return tuple(out) if out else None


def save_pretrained(model: nnx.Module, tokenizer, path: str, *, dtype=None) -> None:
  """Writes `model` (and `tokenizer`, if given) in HF layout: config.json, safetensors, tokenizer.

  `dtype` casts the saved weights (default: as stored).
  """
  os.makedirs(path, exist_ok=True)
  classifier = isinstance(model, SequenceClassifier)
  hf = config_to_hf(model.config, classifier=classifier)
  if dtype is not None:
    hf["torch_dtype"] = str(as_dtype(dtype))
  else:
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    hf["torch_dtype"] = str(leaf.dtype)
  save_params(model, path, dtype=as_dtype(dtype) if dtype is not None else None)
  _atomic_json(hf, os.path.join(path, "config.json"))
  eos = model.config.eos_token_id
  gen = {"eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
         "bos_token_id": model.config.bos_token_id, "pad_token_id": model.config.pad_token_id}
  _atomic_json({k: v for k, v in gen.items() if v is not None},
               os.path.join(path, "generation_config.json"))
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
