"""The record: one dict per prompt, generation, score or route (docs/DATA.md, "Records").

A record is serialized as JSON (UTF-8, a leading `{`) or msgpack (a map, first byte 0x80-0x8f or
0xde/0xdf), never pickle, so any program can read our shards. `decode` tells the two apart by the
first byte and validates the result: a record written by another schema version, or with a field
of the wrong type, fails with the field name and value in the message.

Known fields are typed; other top-level fields are allowed (stages may add their own) as long as
they hold plain JSON values (no NaN or infinity, which JSON lacks: json.dumps would write them as
the non-JSON tokens NaN / Infinity).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

import msgpack

SCHEMA_VERSION = 1
FORMATS = ("json", "msgpack")
REQUIRED = ("schema", "id", "prompt")
# every field the schema types (docs/DATA.md); stages set them, a prompt source keeps none of them
FIELDS = (*REQUIRED, "messages", "reference", "teacher", "sample", "response", "finish_reason",
          "tokens", "scores", "route", "policy", "provenance")
SCORE_KEYS = ("quality", "learnability", "reward")


class RecordError(ValueError):
  """A record that does not match the schema (the message names the field and value)."""


def _short(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _fail(field: str, value: Any, why: str, where: str | None) -> None:
  at = f" ({where})" if where else ""
  raise RecordError(f"record field {field!r} = {_short(value)}: {why}{at}")


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


# A str holding a lone surrogate (a JSON escape like backslash-ud800 decodes to one) is not
# Unicode text: it has no UTF-8 encoding, and tokenizers fail on it deep inside.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_plain(value: Any, field: str, where: str | None) -> None:
  """JSON-compatible: None, bool, int, finite float, str, lists of these, dicts with str keys."""
  if isinstance(value, str):
    if _SURROGATE.search(value):
      _fail(field, value, "is not valid Unicode text (a lone surrogate; it has no UTF-8 "
            "encoding)", where)
    return
  if isinstance(value, float) and not math.isfinite(value):
    _fail(field, value, "has no JSON form (RFC 8259 has no NaN or infinity; a missing number is "
          "None)", where)
  if value is None or isinstance(value, (bool, int, float)):
    return
  if isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      _check_plain(v, f"{field}[{i}]", where)
    return
  if isinstance(value, Mapping):
    for k, v in value.items():
      if not isinstance(k, str):
        _fail(field, k, "dict keys must be strings", where)
      _check_plain(v, f"{field}.{k}", where)
    return
  _fail(field, value, f"{type(value).__name__} is not a JSON value", where)


def _check_messages(msgs: Any, where: str | None) -> None:
  if not isinstance(msgs, (list, tuple)) or not msgs:
    _fail("messages", msgs, "must be a non-empty list of {'role', 'content'} dicts", where)
  for i, m in enumerate(msgs):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
        or not isinstance(m.get("content"), str):
      _fail(f"messages[{i}]", m, "must be a dict with str 'role' and 'content'", where)


def validate(record: Any, where: str | None = None) -> dict:
  """Raise RecordError unless `record` matches schema SCHEMA_VERSION; return it unchanged.

  `where` (e.g. "shard X, record 12") is appended to the message.
  """
  if not isinstance(record, Mapping):
    raise RecordError(f"a record must be a dict, got {type(record).__name__}: "
                      f"{_short(record)}{' (' + where + ')' if where else ''}")
  for key in REQUIRED:
    if key not in record:
      _fail(key, None, "missing (required: " + ", ".join(REQUIRED) + ")", where)
  schema = record["schema"]
  if schema != SCHEMA_VERSION or not _is_int(schema):
    _fail("schema", schema, f"unsupported schema version (this code reads {SCHEMA_VERSION})", where)
  for key in ("id", "prompt"):
    if not isinstance(record[key], str):
      _fail(key, record[key], "must be a string", where)
  if not record["id"]:
    _fail("id", record["id"], "must be non-empty", where)
  for key in ("teacher", "response", "finish_reason", "policy", "reference"):
    if record.get(key) is not None and not isinstance(record[key], str):
      _fail(key, record[key], "must be a string or None", where)
  if record.get("messages") is not None:
    _check_messages(record["messages"], where)
  if record.get("sample") is not None and not (_is_int(record["sample"]) and record["sample"] >= 0):
    _fail("sample", record["sample"], "must be a non-negative int", where)
  if record.get("tokens") is not None:
    tokens = record["tokens"]
    if not isinstance(tokens, Mapping):
      _fail("tokens", tokens, "must be a dict of counts or id lists", where)
    for k, v in tokens.items():
      ok = _is_int(v) or (isinstance(v, (list, tuple)) and all(_is_int(t) for t in v))
      if not isinstance(k, str) or not ok:
        _fail(f"tokens.{k}", v, "must be an int or a list of ints", where)
  if record.get("scores") is not None:
    scores = record["scores"]
    if not isinstance(scores, Mapping):
      _fail("scores", scores, "must be a dict " + str(SCORE_KEYS), where)
    for k, v in scores.items():
      if v is not None and not _is_num(v):
        _fail(f"scores.{k}", v, "must be a number or None", where)
  if record.get("route") is not None:
    route = record["route"]
    if not isinstance(route, Mapping) or not isinstance(route.get("teacher"), str):
      _fail("route", route, "must be a dict with a str 'teacher' (and 'scores')", where)
    rs = route.get("scores")
    if rs is not None and (not isinstance(rs, Mapping) or not all(_is_num(v) for v in rs.values())):
      _fail("route.scores", rs, "must be a dict of teacher -> number", where)
  if record.get("provenance") is not None:
    prov = record["provenance"]
    if not isinstance(prov, Mapping):
      _fail("provenance", prov, "must be a dict {run, stage, config_hash, seed}", where)
    for k in ("run", "stage", "config_hash"):
      if prov.get(k) is not None and not isinstance(prov[k], str):
        _fail(f"provenance.{k}", prov[k], "must be a string", where)
    if prov.get("seed") is not None and not _is_int(prov["seed"]):
      _fail("provenance.seed", prov["seed"], "must be an int", where)
  for key, value in record.items():
    if not isinstance(key, str):
      _fail(str(key), value, "field names must be strings", where)
    _check_plain(value, key, where)
  return record


def make(id: str, prompt: str, **fields: Any) -> dict:
  """A validated record of the current schema; fields given as None are left out."""
  rec = {"schema": SCHEMA_VERSION, "id": id, "prompt": prompt}
  rec.update({k: v for k, v in fields.items() if v is not None})
  return validate(rec)


def encode(record: Mapping[str, Any], fmt: str = "json") -> bytes:
  """Validated record -> bytes (compact UTF-8 JSON, or msgpack)."""
  validate(record)
  if fmt == "json":
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  if fmt == "msgpack":
    return msgpack.packb(record, use_bin_type=True)
  raise ValueError(f"record format {fmt!r}: expected one of {FORMATS}")


def sniff(data: bytes) -> str:
  """'json' or 'msgpack', from the first byte of an encoded record."""
  if not data:
    raise RecordError("empty record bytes")
  first = data[0]
  if first == 0x7B:  # "{"
    return "json"
  if first == 0x80:  # an empty msgpack map cannot be a record; pickle protocols 2+ start so
    raise RecordError("record bytes start with 0x80: a pickle (refused) or an empty map")
  if 0x81 <= first <= 0x8F or first in (0xDE, 0xDF):  # msgpack map headers
    return "msgpack"
  raise RecordError(f"record bytes start with 0x{first:02x}: neither a JSON object nor a msgpack "
                    "map (pickle and other formats are refused)")


def decode(data: bytes, where: str | None = None, check: bool = True) -> dict:
  """bytes -> record dict, validated unless check=False."""
  fmt = sniff(data)
  try:
    if fmt == "json":
      record = json.loads(data.decode("utf-8"))
    else:
      record = msgpack.unpackb(data, raw=False, strict_map_key=True)
  except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
    at = f" ({where})" if where else ""
    raise RecordError(f"undecodable {fmt} record{at}: {e}") from None
  return validate(record, where) if check else record


def finite(x: float | None) -> bool:
  return x is not None and math.isfinite(x)
