"""Hugging Face checkpoints: safetensors -> sharded params, and back (config.json <-> ModelConfig:
`models/config.py`).

Weights are read tensor by tensor, each device's slice straight from a memmap onto its device
(`jax.make_array_from_callback`), so a host never holds a full second copy of the model.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.io_utils import atomic_write_json, fsync_dir, remove_dead_temps
from persyn_jax.models import checks
from persyn_jax.models.checks import CheckpointError
# config_from_hf and config_to_hf moved to models/config.py; still importable from here.
from persyn_jax.models.config import ModelConfig, config_from_hf, config_to_hf  # noqa: F401
from persyn_jax.models.safetensors_io import SafeFile, SafetensorsError, save_file
from persyn_jax.models.transformer import CausalLM, SequenceClassifier


# ---- weight names and layouts -----------------------------------------------------------------
# Our layout -> HF layout: "same", "T" (2-D transpose), "qkv" ([D,N,H] <- [N*H,D]),
# "o" ([N,H,D] <- [D,N*H]), "bias_heads" ([N,H] <- [N*H]).

def weight_map(model: nnx.Module) -> dict[tuple, tuple]:
  """Our parameter path -> (HF tensor name, layout[, (first row, end row) of a fused tensor]).

  The decoder blocks' parameters are stacked over layers (models/layers.py): their entries name
  a tuple of HF tensors, one per layer (model.layers.{i}.*), stacked along the leading axis."""
  cfg: ModelConfig = model.config
  out: dict[tuple, tuple] = {("model", "embed"): ("model.embed_tokens.weight", "same"),
                                       ("model", "final_norm", "scale"): ("model.norm.weight", "same")}
  for sub, (name, *rest) in block_map(cfg).items():
    out[("model", "layers") + sub] = (tuple(f"model.layers.{i}.{name}"
                                            for i in range(cfg.num_layers)), *rest)
  if isinstance(model, SequenceClassifier):
    out[("score",)] = ("score.weight", "T")
  elif not cfg.tie_embeddings:
    out[("lm_head",)] = ("lm_head.weight", "T")
  return out


def block_map(cfg: ModelConfig) -> dict[tuple, tuple]:
  """One decoder block: our path inside the block -> (HF name after model.layers.{i}., layout[,
  rows of a fused tensor])."""
  out: dict[tuple, tuple] = {("attn_norm", "scale"): ("input_layernorm.weight", "same")}
  if cfg.gemma_norm:
    out[("attn_post_norm", "scale")] = ("post_attention_layernorm.weight", "same")
    out[("mlp_norm", "scale")] = ("pre_feedforward_layernorm.weight", "same")
    out[("mlp_post_norm", "scale")] = ("post_feedforward_layernorm.weight", "same")
  else:
    out[("mlp_norm", "scale")] = ("post_attention_layernorm.weight", "same")
  if cfg.model_type == "phi3":  # fused q|k|v and gate|up, split by rows
    N, K, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    rows = {"q": (0, N * H), "k": (N * H, (N + K) * H), "v": ((N + K) * H, (N + 2 * K) * H)}
    for n in ("q", "k", "v"):
      out[("attn", n, "w")] = ("self_attn.qkv_proj.weight", "qkv", rows[n])
    out[("attn", "o", "w")] = ("self_attn.o_proj.weight", "o")
    out[("mlp", "gate", "w")] = ("mlp.gate_up_proj.weight", "T", (0, F))
    out[("mlp", "up", "w")] = ("mlp.gate_up_proj.weight", "T", (F, 2 * F))
    out[("mlp", "down", "w")] = ("mlp.down_proj.weight", "T")
    return out
  for n in ("q", "k", "v"):
    out[("attn", n, "w")] = (f"self_attn.{n}_proj.weight", "qkv")
    if cfg.qkv_bias:
      out[("attn", f"{n}_bias", "b")] = (f"self_attn.{n}_proj.bias", "bias_heads")
  out[("attn", "o", "w")] = ("self_attn.o_proj.weight", "o")
  if cfg.o_bias:
    out[("attn", "o_bias", "b")] = ("self_attn.o_proj.bias", "same")
  if cfg.qk_norm:
    out[("attn", "q_norm", "scale")] = ("self_attn.q_norm.weight", "same")
    out[("attn", "k_norm", "scale")] = ("self_attn.k_norm.weight", "same")
  for n in ("gate", "up", "down"):
    out[("mlp", n, "w")] = (f"mlp.{n}_proj.weight", "T")
    if cfg.mlp_bias:
      out[("mlp", f"{n}_bias", "b")] = (f"mlp.{n}_proj.bias", "same")
  return out


def names_of(entry_name) -> tuple[str, ...]:
  """The HF tensor names of one weight_map entry (one, or one per layer for a stacked one)."""
  return entry_name if isinstance(entry_name, tuple) else (entry_name,)


def fused_rows(wmap: dict, name: str) -> int:
  return max(entry[2][1] for entry in wmap.values() if name in names_of(entry[0]) and len(entry) > 2)


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


def read_slice(src, layout: str, index: tuple, shape: tuple[int, ...]) -> np.ndarray:
  """The block `index` (of our layout, global shape `shape`) read from HF-layout `src`; a list
  `src` holds one tensor per layer of a stacked parameter (shape [L, ...]), read layer by layer."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  if isinstance(src, list):
    layers = range(len(src))[index[0]]
    return np.stack([read_slice(src[i], layout, index[1:], shape[1:]) for i in layers])
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


def _open_weights(path: str, allow_pickle: bool, allow_external_links: bool | None = None
                  ) -> dict[str, Callable[[], np.ndarray]]:
  """Tensor name -> a function returning an indexable array (memmap), for every weight file."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  inside = lambda p: checks.check_inside(path, p, allow_external_links)
  # transformers' order: model.safetensors first, then the index (a directory holding both loads
  # the same weights here as there)
  if os.path.exists(single):
    f = _safe(inside(single))
    return {name: (lambda n=name: f.array(n)) for name in f.names()}
  if os.path.exists(index):
    wmap = read_json(inside(index), max_bytes="MAX_INDEX_BYTES").get("weight_map")
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
      raise CheckpointError(f"{index}: not a safetensors index (needs a weight_map of tensor name "
                            "-> file name)")
    files = {}
    for fname in sorted(set(wmap.values())):
      if os.path.basename(fname) != fname:
        raise CheckpointError(f"{index}: weight file {fname!r} is not a plain file name")
      fpath = os.path.join(path, fname)
      if not os.path.exists(fpath):
        raise CheckpointError(f"{index} lists {fname}, which is missing")
      files[fname] = _safe(inside(fpath))
    return {name: (lambda f=files[fname], n=name: f.array(n)) for name, fname in wmap.items()
            if _has(files[fname], name, index)}
  pickles = [n for n in ("pytorch_model.bin", "model.pt", "model.pth") if os.path.exists(os.path.join(path, n))]
  if pickles:
    if not allow_pickle:
      raise CheckpointError(
          f"{os.path.join(path, pickles[0])}: pickle checkpoints are refused, since unpickling can "
          "run arbitrary code. Convert it to safetensors (transformers: "
          "model.save_pretrained(dir, safe_serialization=True)), or pass allow_pickle=True to "
          "load it with torch.load(weights_only=True)")
    import torch  # optional, only for this explicit opt-in
    sd = torch.load(inside(os.path.join(path, pickles[0])), map_location="cpu", weights_only=True)
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


def read_json(path: str, *, max_bytes: str = "MAX_CONFIG_BYTES",
              allow_external_links: bool | None = None) -> dict:
  """The JSON object in file `path`, read only if it lies inside its directory (see
  `checks.check_inside`) and is no larger than the limit `checks.<max_bytes>`."""
  try:
    checks.check_inside(os.path.dirname(path) or ".", path, allow_external_links)
    checks.check_size(path, max_bytes)
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path} is missing") from None
  except (ValueError, RecursionError) as e:  # also bad UTF-8 and integers too long to convert
    raise CheckpointError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def check_config(cfg: ModelConfig, path: str, allow_external_links: bool | None = None) -> None:
  """config.json's sizes (vocabulary, width, layers, heads) against the safetensors headers of
  `path`, before a model is built (no weight is read); a directory without safetensors files has
  nothing to check here."""
  if any(os.path.exists(os.path.join(path, n))
         for n in ("model.safetensors", "model.safetensors.index.json")):
    _check_sizes(cfg, _open_weights(path, False, allow_external_links), path)


def head_is_untied(path: str, allow_external_links: bool | None = None,
                   chunk_rows: int = 4096) -> bool:
  """Whether the safetensors of `path` hold an lm_head.weight that is not model.embed_tokens.weight.

  transformers (PreTrainedModel.tie_weights) then leaves the head of a config with
  tie_word_embeddings=true untied, since the checkpoint contradicts the config; equal tensors
  (a file that stores both) stay tied. Compared block by block from the memmaps."""
  if not any(os.path.exists(os.path.join(path, n))
             for n in ("model.safetensors", "model.safetensors.index.json")):
    return False
  tensors = _open_weights(path, False, allow_external_links)
  if "lm_head.weight" not in tensors or "model.embed_tokens.weight" not in tensors:
    return False
  head, embed = tensors["lm_head.weight"](), tensors["model.embed_tokens.weight"]()
  if head.shape != embed.shape:
    return True
  return any(not np.array_equal(head[r:r + chunk_rows], embed[r:r + chunk_rows])
             for r in range(0, head.shape[0], chunk_rows))


def _check_sizes(cfg: ModelConfig, tensors: dict, path: str) -> None:
  checks.check_config_against_weights(
      cfg, lambda n: tuple(tensors[n]().shape) if n in tensors else None, list(tensors),
      os.path.join(path, "config.json"))


def load_params(model: nnx.Module, path: str, mesh, dtype, *, allow_pickle: bool = False,
                allow_external_links: bool | None = None) -> nnx.Module:
  """Fills an abstract model (from nnx.eval_shape) with the weights of `path`, sharded on `mesh`.

  Weight files are read only from inside `path` unless `allow_external_links` (default: the
  environment variable PERSYN_JAX_ALLOW_EXTERNAL_LINKS); config.json's sizes are checked against
  the weights' shapes before anything is allocated."""
  tensors = _open_weights(path, allow_pickle, allow_external_links)
  if model.config.tie_embeddings and "model.embed_tokens.weight" not in tensors and \
      "lm_head.weight" in tensors:
    # a tied model stored through its head only: transformers (PreTrainedModel.tie_weights)
    # ties the embedding to the tensor that is there
    tensors["model.embed_tokens.weight"] = tensors["lm_head.weight"]
  _check_sizes(model.config, tensors, path)
  wmap = weight_map(model)
  graphdef, state = nnx.split(model)
  expected = {n for entry in wmap.values() for n in names_of(entry[0])}
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
    stacked = isinstance(name, tuple)
    srcs = [_hf_tensor(tensors, n, layout, rows, shape[1:] if stacked else shape, wmap, path)
            for n in names_of(name)]
    src = srcs if stacked else srcs[0]
    sharding = shd.variable_sharding(var, mesh)
    np_dtype = np.dtype(dtype)
    arr = jax.make_array_from_callback(
        shape, sharding, lambda idx, s=src, l=layout, sh=shape: read_slice(s, l, idx, sh).astype(np_dtype))
    var.set_value(arr)
  return nnx.merge(graphdef, state)  # the variables of `state` were filled in place


def _hf_tensor(tensors: dict, name: str, layout: str, rows: list, shape: tuple, wmap: dict,
               path: str):
  """HF tensor `name` (its rows of a fused tensor), checked against our `shape` in `layout`."""
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
  return src


def save_params(model: nnx.Module, path: str, *, dtype=None, max_shard_bytes: int = 4 << 30) -> None:
  """Writes the weights in HF layout (safetensors, sharded with an index past max_shard_bytes)."""
  wmap = weight_map(model)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  parts: dict[str, list] = {}
  for ppath, (name, layout, *rows) in wmap.items():
    arr = np.asarray(jax.device_get(flat[ppath].get_value()))
    if dtype is not None:
      arr = arr.astype(np.dtype(dtype))
    for i, n in enumerate(names_of(name)):  # a stacked parameter: one tensor per layer
      a = arr[i] if isinstance(name, tuple) else arr
      parts.setdefault(n, []).append((rows[0][0] if rows else 0, to_hf_layout(a, layout)))
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
  single = os.path.join(path, "model.safetensors")
  if len(shards) == 1:
    _atomic_save(shards[0], single)
    _remove_stale_weights(path, {"model.safetensors"})
    return
  if os.path.exists(single):  # an earlier save's, which loaders would take before the index
    os.remove(single)
  wmap_out, total = {}, 0
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for fname, sh in zip(names, shards):
    _atomic_save(sh, os.path.join(path, fname))
    for name, arr in sh:
      wmap_out[name] = fname
      total += arr.nbytes
  atomic_write_json(os.path.join(path, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": wmap_out})
  _remove_stale_weights(path, {"model.safetensors.index.json", *names})


def _remove_stale_weights(path: str, keep: set[str]) -> None:
  """Removes the weight files an earlier save into `path` left that this one did not write (its
  index or single file, shards of another count), as transformers' save_pretrained cleans them:
  left in place, a loader would read the old weights beside the new ones."""
  stale = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
  for fname in os.listdir(path):
    if fname not in keep and stale.fullmatch(fname):
      os.remove(os.path.join(path, fname))


def _atomic_save(items, fpath):
  """A safetensors file written under a temp name of this process (fsynced), then renamed; a
  temp left by a killed writer is removed first."""
  tmp = f"{fpath}.tmp-{os.getpid()}"
  remove_dead_temps(fpath)
  save_file(items, tmp, metadata={"format": "pt"})
  os.replace(tmp, fpath)
  fsync_dir(os.path.dirname(fpath) or ".")

