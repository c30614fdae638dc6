"""Checks on a model directory before its files are parsed or its model is built.

A model directory is untrusted input. Its files are read only from inside it: a link that leads
out of it is refused unless allowed. Each small file has a size limit, checked before it is
parsed. The sizes in config.json must agree with the shapes of the weights before a model is
built. Each error names the file and the key, where a corrupt or hostile file would otherwise end
in an OOM kill or a hang.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Mapping


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


# Size limits, far above every published model's files (config.json: a few kB; Gemma 3's
# tokenizer_config.json, with its added tokens: about 1 MB; chat templates: tens of kB; the
# largest tokenizer.json files: tens of MB; a weight index: a few MB).
MAX_CONFIG_BYTES = 4 << 20
MAX_TOKENIZER_CONFIG_BYTES = 16 << 20
MAX_CHAT_TEMPLATE_BYTES = 1 << 20
MAX_TOKENIZER_BYTES = 256 << 20
MAX_INDEX_BYTES = 64 << 20

# Limits on config.json values that are looped over or allocated before the weights are seen
# (the largest published models: 126 layers, 262k vocabulary, 128 heads, width 53248).
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 24
MAX_HEADS = 1 << 12
MAX_WIDTH = 1 << 20

# Each file a tokenizer load may read -> its limit.
TOKENIZER_FILES = {
    "config.json": "MAX_CONFIG_BYTES", "special_tokens_map.json": "MAX_CONFIG_BYTES",
    "tokenizer_config.json": "MAX_TOKENIZER_CONFIG_BYTES",
    "chat_template.jinja": "MAX_CHAT_TEMPLATE_BYTES",
    "chat_template.json": "MAX_CHAT_TEMPLATE_BYTES",
    **{name: "MAX_TOKENIZER_BYTES" for name in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                                "vocab.txt", "merges.txt", "added_tokens.json")},
}

ALLOW_LINKS_ENV = "PERSYN_JAX_ALLOW_EXTERNAL_LINKS"


def check_size(path: str, limit_name: str) -> None:
  """CheckpointError if the file `path` is larger than the named limit of this module."""
  limit = globals()[limit_name]
  size = os.path.getsize(path)
  if size > limit:
    raise CheckpointError(f"{path}: {size} bytes, over the limit of {limit} bytes for this file "
                          f"(persyn_jax.models.checks.{limit_name}): corrupt or not a model file")


def check_value(source: str, key: str, value: int, limit_name: str) -> int:
  """`value` of config field `key` if it is at most the named limit of this module."""
  limit = globals()[limit_name]
  if value > limit:
    raise CheckpointError(f"{source}: field {key!r} = {value} is over the limit of {limit} "
                          f"(persyn_jax.models.checks.{limit_name})")
  return value


# ---- links ----------------------------------------------------------------------------------

def links_allowed(allow: bool | None = None) -> bool:
  """`allow` if given, else the environment variable PERSYN_JAX_ALLOW_EXTERNAL_LINKS (1/true)."""
  if allow is not None:
    return bool(allow)
  return os.environ.get(ALLOW_LINKS_ENV, "").strip().lower() in ("1", "true", "yes")


def link_root(model_dir: str) -> str:
  """The folder links of `model_dir` may lead into: the directory itself or, for a snapshot of
  the Hugging Face hub cache (`models--org--name/snapshots/<rev>/f -> ../../blobs/<hash>`), the
  repository folder that holds its blobs."""
  real = os.path.realpath(model_dir)
  d = real
  while True:
    parent = os.path.dirname(d)
    if parent == d:
      return real
    if os.path.basename(parent) == "snapshots" and \
        os.path.basename(os.path.dirname(parent)).startswith("models--"):
      return os.path.dirname(parent)
    d = parent


def check_inside(model_dir: str, path: str, allow: bool | None = None) -> str:
  """`path` (a file of `model_dir`), after checking that it resolves to a place inside it."""
  if links_allowed(allow):
    return path
  root = link_root(model_dir)
  target = os.path.realpath(path)
  if os.path.commonpath([root, target]) != root:
    raise CheckpointError(
        f"{path}: a link to {target}, outside the model directory {model_dir}. The files of a "
        f"model are read only from inside it; to follow such links, set {ALLOW_LINKS_ENV}=1 "
        "(or pass allow_external_links=True)")
  return path


def check_tree(model_dir: str, allow: bool | None = None) -> None:
  """Every link in `model_dir` (at any depth) leads inside it: for readers such as transformers'
  tokenizer loader, which open files of the directory by themselves."""
  if links_allowed(allow):
    return
  for top, dirs, files in os.walk(model_dir):
    for name in dirs + files:
      p = os.path.join(top, name)
      if os.path.islink(p):
        check_inside(model_dir, p, allow)


def check_tokenizer_dir(path: str, allow: bool | None = None) -> None:
  """Links and file sizes of a tokenizer directory, checked before transformers reads it."""
  check_tree(path, allow)
  for name, limit in TOKENIZER_FILES.items():
    if os.path.isfile(os.path.join(path, name)):
      check_size(os.path.join(path, name), limit)
  extra = os.path.join(path, "additional_chat_templates")
  if os.path.isdir(extra):
    for name in sorted(os.listdir(extra)):
      check_size(os.path.join(extra, name), "MAX_CHAT_TEMPLATE_BYTES")


def check_chat_template(tokenizer, path: str) -> None:
  """The loaded chat template's length (one inside tokenizer_config.json has no file of its own)."""
  template = getattr(tokenizer, "chat_template", None)
  texts = template.values() if isinstance(template, dict) else [template]
  n = sum(len(t) for t in texts if isinstance(t, str))
  if n > MAX_CHAT_TEMPLATE_BYTES:
    raise CheckpointError(f"{path}: its chat template has {n} characters, over the limit of "
                          f"{MAX_CHAT_TEMPLATE_BYTES} (persyn_jax.models.checks."
                          "MAX_CHAT_TEMPLATE_BYTES)")


# ---- config.json against the weights ---------------------------------------------------------

def check_config_against_weights(cfg, shape: Callable[[str], tuple[int, ...] | None],
                                 names: Mapping | list, source: str) -> None:
  """The sizes of ModelConfig `cfg` (read from `source`) against the weights' shapes, before any
  weight is read: `shape(name)` is a tensor's shape (None if absent), `names` all tensor names.
  Each disagreement names the config.json keys, the tensor and its shape."""
  D = cfg.hidden_size

  def expect(name: str, rows: int, keys: str) -> None:
    s = shape(name)
    if s is not None and tuple(s) != (rows, D):
      raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(s)}, expected "
                            f"{(rows, D)} from {keys}, hidden_size = {D}")

  expect("model.embed_tokens.weight", cfg.vocab_size, f"vocab_size = {cfg.vocab_size}")
  layers = {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
  if layers and layers != set(range(cfg.num_layers)):
    raise CheckpointError(f"{source}: num_hidden_layers = {cfg.num_layers}, but the weights hold "
                          f"{len(layers)} layers (model.layers.{min(layers)} to "
                          f"model.layers.{max(layers)})")
  N, K, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  p = "model.layers.0."
  if cfg.model_type == "phi3":
    expect(p + "self_attn.qkv_proj.weight", (N + 2 * K) * H,
           f"(num_attention_heads + 2 * num_key_value_heads) * head_dim = ({N} + 2 * {K}) * {H}")
    expect(p + "mlp.gate_up_proj.weight", 2 * F, f"2 * intermediate_size = 2 * {F}")
    return
  expect(p + "self_attn.q_proj.weight", N * H, f"num_attention_heads * head_dim = {N} * {H}")
  expect(p + "self_attn.k_proj.weight", K * H, f"num_key_value_heads * head_dim = {K} * {H}")
  expect(p + "mlp.gate_proj.weight", F, f"intermediate_size = {F}")
