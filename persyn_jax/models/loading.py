"""Loading and saving models: a Hugging Face directory (config.json + safetensors) or a
`persyn_jax.convert` output (an orbax checkpoint laid out for a mesh), placed by a rule set.

    model, tok = load_model(path, dtype="bfloat16", mesh=mesh, rules=sharding.SERVING)
    save_pretrained(model, tok, "out_dir")             # HF layout, loads in transformers

`rules` is the sharding rule set the parameters are placed by: TRAINING (the default active set;
weights over fsdp x tensor) for models that train or score, SERVING (weights over tensor only)
for teachers that sample. Under SERVING a `tensor` axis that does not divide the kv heads gets
copies of them (`serving_layout`), and `quantize="int8"` stores the decoder's weights in int8
(models/quant.py).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from persyn_jax import fs
from persyn_jax import sharding as shd
from persyn_jax.models.config import ModelConfig
from persyn_jax.io_utils import atomic_write_json
from persyn_jax.models import checks, hub
from persyn_jax.models.hf import (CheckpointError, check_config, config_from_hf, config_to_hf,
                                  head_is_untied, load_params, read_json, save_params)
from persyn_jax.models.transformer import CausalLM, SequenceClassifier

MARKER = "persyn_orbax.json"  # the file that marks (and describes) a convert output
FORMAT = 1


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


def _head(hf: dict, head: str, path: str) -> bool:
  if head not in ("auto", "lm", "classifier"):
    raise ValueError(f"{path}: head={head!r}: expected auto, lm or classifier")
  return is_classifier(hf) if head == "auto" else head == "classifier"


def _runtime_config(cfg: ModelConfig, hf: dict, classifier: bool) -> ModelConfig:
  """The config as loaded: a classifier has at least one label; generation_config.json's eos ids
  join config.json's (we stop on either; transformers' generate stops on generation_config.json's
  alone when the file exists: docs/SAMPLER.md)."""
  if classifier and cfg.num_labels < 1:
    cfg = cfg.replace(num_labels=1)
  gen_eos = hf.get("_generation_config", {}).get("eos_token_id")
  if gen_eos is not None:
    cfg = cfg.replace(eos_token_id=_merge_ids(cfg.eos_token_id, gen_eos))
  return cfg


def _abstract_model(cfg: ModelConfig, hf: dict, head: str, path: str, dtype, param_dtype, mesh):
  """(the abstract model to load into, its storage dtype, the mesh: default one device)."""
  classifier = _head(hf, head, path)
  cfg = _runtime_config(cfg, hf, classifier)
  if cfg.tie_embeddings and not classifier and head_is_untied(path):
    warnings.warn(f"{path}: config.json ties the LM head to the embedding, but the weights hold "
                  "an lm_head.weight of other values; loaded untied, as transformers does")
    cfg = cfg.replace(tie_embeddings=False)
  dtype = as_dtype(dtype)
  pdtype = as_dtype(param_dtype) if param_dtype is not None else dtype
  mesh = mesh if mesh is not None else shd.single_device_mesh()
  abstract = build_model(cfg, classifier=classifier, dtype=dtype, param_dtype=pdtype, abstract=True)
  return abstract, pdtype, mesh


def local_path(path: str) -> str:
  """`path` itself, or for a hub id "org/name[@revision]" that is no local directory its cached
  snapshot (models.hub.resolve: downloaded first by one process per machine while the others
  wait on the cache lock; offline, the error names the id and the `hf download` command), or for
  a gs:// directory a local read-only copy of it (fs.local_dir: fetched once per version)."""
  path = os.fspath(path)
  if fs.is_remote(path):
    if not fs.isdir(path):
      raise FileNotFoundError(f"model directory {path}: no such directory in the bucket")
    return fs.local_dir(path)
  if not os.path.isdir(path) and hub.parse_id(path) is not None:
    return hub.resolve(path)
  return path


def from_pretrained(path: str, *, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None,
                    param_dtype=None, head: str = "auto", tokenizer: bool = True,
                    allow_pickle: bool = False, rules: shd.Rules | None = None,
                    quantize: str | None = None):
  """Loads a local HF directory or a hub id (local_path); returns (model, tokenizer) (tokenizer
  None if `tokenizer=False`).

  `dtype` is the compute dtype and, unless `param_dtype` is given, the storage dtype.
  `head`: "lm" (CausalLM), "classifier" (SequenceClassifier) or "auto" (from `architectures`).
  mesh: default the single-device mesh; rules: the rule set that places the parameters on it
  (default: the active set). Never runs remote code; pickle checkpoints only with
  `allow_pickle=True` (weights_only). quantize: None, or "int8" (weight-only, models/quant.py).
  """
  path = local_path(path)
  cfg, hf = load_config(path)
  abstract, pdtype, mesh = _abstract_model(cfg, hf, head, path, dtype, param_dtype, mesh)
  with shd.use_rules(rules):
    model = load_params(abstract, path, mesh, pdtype, allow_pickle=allow_pickle)
  model = _finish(model, mesh, rules, quantize, path)
  tok = load_tokenizer(path) if tokenizer else None
  return model, tok


def serving_layout(model: nnx.Module, mesh: jax.sharding.Mesh, *, rules: shd.Rules | None = None,
                   what: str = "model") -> nnx.Module:
  """`model` with each kv head copied `sharding.kv_head_replicas` times (a no-op when `tensor`
  divides the kv heads or `rules` keeps none), re-placed on `mesh` by `rules`.

  The copies make the k/v projections, their biases and the KV cache split over `tensor` like
  the query heads, instead of being replicated whole on every shard; the outputs are unchanged
  (every query head reads a copy of its own kv head). Serving only: training the copies apart
  would untie them."""
  rules = rules if rules is not None else shd.active_rules()
  cfg = model.config
  r = shd.kv_head_replicas(cfg.num_heads, cfg.num_kv_heads, int(mesh.shape["tensor"]), what=what) \
      if rules.replicate_kv else 1
  if r == 1:
    return model
  new = cfg.replace(num_kv_heads=cfg.num_kv_heads * r)
  for _, module in model.iter_modules():
    for attr in ("cfg", "config"):
      if getattr(module, attr, None) == cfg:
        setattr(module, attr, new)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = getattr(var, "logical_axes", None) or ()
    if "kv_heads" in axes:
      var.set_value(jnp.repeat(var.get_value(), r, axis=axes.index("kv_heads")))
  return shd.shard_model(model, mesh, rules=rules)


def _finish(model, mesh, rules, quantize: str | None, path: str):
  """The serving layout and the optional weight quantization of a loaded model."""
  model = serving_layout(model, mesh, rules=rules, what=path)
  if quantize:
    from persyn_jax.models.quant import quantize_model
    model = quantize_model(model, quantize, what=path)
    model = shd.shard_model(model, mesh, rules=rules)
  return model


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
  atomic_write_json(os.path.join(path, "config.json"), hf)
  eos = model.config.eos_token_id
  gen = {"eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
         "bos_token_id": model.config.bos_token_id, "pad_token_id": model.config.pad_token_id}
  atomic_write_json(os.path.join(path, "generation_config.json"),
                    {k: v for k, v in gen.items() if v is not None})
  if tokenizer is not None:
    tokenizer.save_pretrained(path)

def is_orbax_checkpoint(path: str) -> bool:
  return os.path.exists(os.path.join(path, MARKER))


def from_orbax(path: str, *, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None,
               param_dtype=None, head: str = "auto", tokenizer: bool = True,
               rules: shd.Rules | None = None, quantize: str | None = None):
  """(model, tokenizer) from a `persyn_jax.convert` output directory, the parameters restored
  straight onto `mesh` by `rules` (each process reads only the chunks its devices hold; another
  layout than the stored one is resharded while reading). Arguments as `from_pretrained`."""
  from persyn_jax.checkpoints import abstract as abstract_tree, restore_tree

  marker = os.path.join(path, MARKER)
  if not os.path.exists(marker):
    raise CheckpointError(f"{path}: no {MARKER}; not a persyn_jax.convert output")
  try:
    with open(marker, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:  # cut short, junk, not UTF-8
    raise CheckpointError(f"{marker}: unreadable ({type(e).__name__}: {e}); convert again") \
        from None
  if not isinstance(meta, dict):
    raise CheckpointError(f"{marker}: not a JSON object; convert again")
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{marker}: format {meta.get('format')!r}, this version reads {FORMAT}")
  cfg, hf = load_config(path)
  if head == "auto":  # the head the checkpoint was written with, not config.json's architectures
    head = "classifier" if meta.get("head") == "SequenceClassifier" else "lm"
  abstract, _, mesh = _abstract_model(cfg, hf, head, path, dtype, param_dtype, mesh)
  graphdef, state = nnx.split(abstract)
  shardings = nnx.to_pure_dict(shd.state_shardings(state, mesh, rules=rules))
  # the target's dtype: orbax casts while reading, so a bf16 run never holds an fp32 copy
  target = abstract_tree(nnx.to_pure_dict(state), shardings)
  try:
    restored = restore_tree(os.path.join(path, "params"), target)
  except CheckpointError:  # damaged files: restore_tree names them
    raise
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"{path}/params does not match the model of {path}/config.json "
                          f"({type(e).__name__}: {e})") from None
  nnx.replace_by_pure_dict(state, restored)
  model = _finish(nnx.merge(graphdef, state), mesh, rules, quantize, path)
  tok = load_tokenizer(path) if tokenizer else None
  return model, tok


def load_model(path: str, *, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None,
               param_dtype=None, head: str = "auto", tokenizer: bool = True,
               allow_pickle: bool = False, rules: shd.Rules | None = None,
               quantize: str | None = None):
  """(model, tokenizer) from a `persyn_jax.convert` (orbax) output, an HF directory, or a hub id
  "org/name[@revision]" (models.hub.resolve: safetensors, configs and tokenizer only), placed on
  `mesh` by `rules` (e.g. SERVING for a teacher that samples); arguments as `from_pretrained`
  (allow_pickle concerns HF directories only)."""
  kw = dict(dtype=dtype, mesh=mesh, param_dtype=param_dtype, head=head, tokenizer=tokenizer,
            rules=rules, quantize=quantize)
  path = local_path(path)
  if is_orbax_checkpoint(path):
    return from_orbax(path, **kw)
  return from_pretrained(path, allow_pickle=allow_pickle, **kw)
