"""Frozen dataclass configs: built from YAML (`yaml.safe_load`) plus dotted command-line overrides.

Every stage has its own dataclass (defined beside the code that uses it and collected in
`RunConfig` by the pipeline). Unknown keys and wrong types are errors naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
  pass


# The dtype names configs use most; `check_dtype` takes any floating dtype that
# persyn_jax.models.as_dtype accepts (these, numpy's names such as float64, and the short forms).
DTYPE_NAMES = ("bfloat16", "float32", "float16", "bf16", "fp32", "f32", "fp16")


def check_dtype(value: Any, key: str, *, also: Sequence[str] = ()) -> None:
  """Raises ValueError naming `key` when `value` is not a floating dtype name that
  models.as_dtype accepts (or one of `also`, e.g. "auto"): caught when the config is built, not
  as a raw `unknown dtype` deep inside a stage."""
  if isinstance(value, str) and value in also:
    return
  allowed = [*also, *DTYPE_NAMES]
  if isinstance(value, str) and value:
    import jax.numpy as jnp  # here, not at the top: this module stays importable without jax
    from persyn_jax.models.loading import as_dtype
    try:
      if jnp.issubdtype(as_dtype(value), jnp.floating):
        return
    except (TypeError, ValueError):
      pass
  raise ValueError(f"{key}={value!r}: unknown dtype; expected a floating dtype such as "
                   f"{', '.join(allowed)}")


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# PyYAML follows YAML 1.1, where a float needs a dot: `1e-3` and `5E4` load as strings. A numeric
# string is taken for a float field (and an integer string for an int field); nothing else is.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")


def _coerce(value: Any, tp: Any, where: str) -> Any:
  """`value` checked (and gently converted: int -> float, list -> tuple, a numeric string -> a
  number) against annotation `tp`."""
  origin = typing.get_origin(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None:
      if type(None) in args:
        return None
      raise ConfigError(f"{where}: null is not allowed (expected {_type_name(tp)})")
    # One candidate only (`X | None`, or a mapping meeting a single dataclass member): its own
    # error says what is wrong (a missing key, a bad value), not "matches none of X | None".
    members = [a for a in args if a is not type(None)]
    if isinstance(value, Mapping):
      members = [a for a in members if dataclasses.is_dataclass(a)] or members
    if len(members) == 1:
      return _coerce(value, members[0], where)
    errors = []
    # A member of exactly the value's type first: `stop: int | str` keeps the string "42".
    args = sorted(args, key=lambda a: a is not type(value))
    for a in args:
      if a is type(None):
        continue
      try:
        return _coerce(value, a, where)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
  if origin is typing.Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
    return value
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
    return from_dict(tp, value, where)
  if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {value!r}")
    args = typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple and args:
      if len(args) != len(value):
        raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
      return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    inner = args[0] if args else Any
    return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
  if origin in (dict, Mapping) or tp is dict:
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    args = typing.get_args(tp)
    vt = args[1] if len(args) == 2 else Any
    return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
  if tp is float:
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
      return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)
  if tp is int:
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
      return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value
  if isinstance(tp, type) and not isinstance(value, tp):
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
  return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
  """Builds dataclass `cls` from a (nested) mapping; unknown keys and bad types raise ConfigError."""
  data = dict(data or {})
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
  missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"{where}: missing required key(s) {missing}")
  kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> Any:
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, (list, tuple)):
    return [to_dict(v) for v in cfg]
  if isinstance(cfg, dict):
    return {k: to_dict(v) for k, v in cfg.items()}
  return cfg


def config_hash(cfg: Any) -> str:
  return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_override(item: str) -> tuple[list[str], Any]:
  """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML: 3 -> int, [1,2] -> list, x -> str)."""
  if "=" not in item:
    raise ConfigError(f"override {item!r}: expected key.sub=value")
  key, raw = item.split("=", 1)
  if not key or any(not p for p in key.split(".")):
    raise ConfigError(f"override {item!r}: bad key {key!r}")
  try:
    value = yaml.safe_load(raw) if raw != "" else ""
  except yaml.YAMLError:
    value = raw
  return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
  data = dict(data)
  for item in overrides:
    path, value = parse_override(item)
    node = data
    for p in path[:-1]:
      nxt = node.get(p)
      if nxt is None:
        nxt = {}
      elif not isinstance(nxt, dict):
        raise ConfigError(f"override {item!r}: {p!r} is not a mapping")
      else:
        nxt = dict(nxt)
      node[p] = nxt
      node = nxt
    node[path[-1]] = value
  return data


class _DuplicateKey(yaml.YAMLError):
  def __init__(self, key, line: int, first: int):
    super().__init__(f"line {line}: key {key!r} is given twice (first on line {first})")


class _UniqueKeyLoader(yaml.SafeLoader):
  """yaml.SafeLoader whose mappings refuse a key given twice (PyYAML keeps the last silently, so
  a second `sft:` block would replace the first without a word). Keys a `<<` merge brings in may
  still be overridden, as YAML means them to be."""

  def construct_mapping(self, node, deep=False):
    if isinstance(node, yaml.MappingNode):
      seen: dict = {}
      for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
          continue
        key = self.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
          if key in seen:
            raise _DuplicateKey(key, line, seen[key])
          seen[key] = line
        except TypeError:  # an unhashable key: SafeLoader's own error names it
          continue
    return super().construct_mapping(node, deep=deep)


def load_yaml(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.load(f, Loader=_UniqueKeyLoader)
  except FileNotFoundError:
    raise ConfigError(f"{path}: config file not found") from None
  except IsADirectoryError:
    raise ConfigError(f"{path}: a directory, not a config file") from None
  except _DuplicateKey as e:
    raise ConfigError(f"{path}: {e}") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: invalid YAML ({e})") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: the top level must be a mapping")
  return data


def load(cls: type[T], path: str | None = None, overrides: Sequence[str] = (), *,
         base: Mapping | None = None) -> T:
  """`cls` from `base`, then the YAML file at `path`, then dotted `overrides` (later wins)."""
  data = _deep_merge(dict(base or {}), load_yaml(path) if path else {})
  data = apply_overrides(data, overrides)
  try:
    return from_dict(cls, data, where=_ROOT)
  except ConfigError as e:
    raise ConfigError(_blame(str(e), path or "config", overrides)) from None


_ROOT = "\0root"  # `where` of a whole config in load(), replaced by _blame


def _blame(msg: str, source: str, overrides: Sequence[str]) -> str:
  """The message of a ConfigError raised at `where` = _ROOT + ".key.sub" blamed on its cause: the
  `--set` override that gave the key (`--set sft.lr=fast: expected a number`), else the file
  (`run.yaml.sft.lr: ...`, as before), naming the overrides of the section it fails in."""
  if not msg.startswith(_ROOT):
    return msg
  key, _, problem = msg[len(_ROOT):].partition(": ")
  key = key.lstrip(".")
  segs = [p for p in re.sub(r"\[\d+\]", "", key).split(".") if p]
  below = []  # overrides of keys inside the failing section: a __post_init__ check failed there
  for item in reversed(overrides):  # the last override of a key is the one that counts
    path = item.split("=", 1)[0].split(".")
    if segs[:len(path)] == path:  # the override set this key, or a section holding it
      inner = "" if key == ".".join(path) else f"{key}: "
      return f"--set {item}: {inner}{problem}"
    if path[:len(segs)] == segs:
      # a section-level check naming the key (`sft.lr=nan: ...`, `unknown key(s) ['lorra']`)
      last = re.escape(path[-1])
      if re.search(rf"(?<!\w){last}=|'{last}'", problem):
        return f"--set {item}: {problem}"
      below.append(item)
  where = f"{source}.{key}" if key else source
  if below:
    where += " (with " + ", ".join(f"--set {b}" for b in reversed(below)) + ")"
  return f"{where}: {problem}"


def _deep_merge(a: dict, b: Mapping) -> dict:
  out = dict(a)
  for k, v in b.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = _deep_merge(dict(out[k]), v)
    else:
      out[k] = v
  return out
