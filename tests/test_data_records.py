"""The record codec: JSON / msgpack round trips, schema validation with named fields, no pickle."""
import json
import pickle
import re

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from persyn_jax.data import records as R

text = st.text(max_size=40)
number = st.one_of(st.integers(-2**53, 2**53), st.floats(allow_nan=False, allow_infinity=False))
plain = st.recursive(st.none() | st.booleans() | number | text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                     max_leaves=8)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": text}), min_size=1, max_size=3)
records = st.builds(
    lambda id, prompt, opt: {"schema": R.SCHEMA_VERSION, "id": id, "prompt": prompt,
                             **{k: v for k, v in opt.items() if v is not None}},
    st.text(min_size=1, max_size=20), text,
    st.fixed_dictionaries({}, optional={
        "messages": messages, "teacher": text, "sample": st.integers(0, 100), "response": text,
        "finish_reason": st.sampled_from(["stop", "length"]),
        "tokens": st.dictionaries(text, st.integers(0, 10**6) | st.lists(st.integers(0, 10**6))),
        "scores": st.fixed_dictionaries({}, optional={k: number | st.none() for k in R.SCORE_KEYS}),
        "route": st.fixed_dictionaries({"teacher": text, "scores": st.dictionaries(text, number)}),
        "policy": text, "reference": text,
        "provenance": st.fixed_dictionaries({"run": text, "stage": text, "config_hash": text,
                                             "seed": st.integers(0, 2**31)}),
        "extra_field": plain}))


@settings(max_examples=150, deadline=None)
@given(records, st.sampled_from(R.FORMATS))
def test_codec_round_trip(record, fmt):
  data = R.encode(record, fmt)
  assert R.sniff(data) == fmt
  assert R.decode(data) == record


def test_json_is_plain_json_and_msgpack_plain_msgpack():
  r = R.make("a", "2+2?", response="4", scores={"quality": 1.0, "learnability": -0.5, "reward": None})
  assert json.loads(R.encode(r, "json")) == r
  assert msgpack.unpackb(R.encode(r, "msgpack")) == r


def test_wrong_schema_version_is_named():
  data = json.dumps({"schema": R.SCHEMA_VERSION + 1, "id": "x", "prompt": "p"}).encode()
  with pytest.raises(R.RecordError, match=r"'schema' = 2.*unsupported schema version"):
    R.decode(data, where="f.array_record, record 3")
  with pytest.raises(R.RecordError, match=r"record 3"):
    R.decode(data, where="f.array_record, record 3")


@pytest.mark.parametrize("field,value,match", [
    ("sample", -1, r"'sample' = -1"),
    ("scores", {"quality": "high"}, r"'scores.quality' = 'high'"),
    ("messages", [{"role": "user"}], r"'messages\[0\]'"),
    ("teacher", 3, r"'teacher' = 3"),
    ("tokens", {"response": [1, "x"]}, r"'tokens.response'"),
    ("route", {"scores": {}}, r"'route'"),
    ("provenance", {"seed": 1.5}, r"'provenance.seed' = 1.5"),
    ("whatever", {1: 2}, r"dict keys must be strings"),
])
def test_bad_field_is_named(field, value, match):
  with pytest.raises(R.RecordError, match=match):
    R.validate({"schema": R.SCHEMA_VERSION, "id": "x", "prompt": "p", field: value})


def test_missing_required_field():
  with pytest.raises(R.RecordError, match=r"'prompt'.*missing"):
    R.validate({"schema": R.SCHEMA_VERSION, "id": "x"})


def test_pickle_is_refused():
  with pytest.raises(R.RecordError, match="pickle"):
    R.decode(pickle.dumps({"schema": 1, "id": "x", "prompt": "p"}))


def test_encode_rejects_non_json_values():
  with pytest.raises(R.RecordError, match=r"'extra' = .*set"):
    R.encode({"schema": R.SCHEMA_VERSION, "id": "x", "prompt": "p", "extra": {1, 2}})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("field,make", [
    ("scores.quality", lambda v: {"scores": {"quality": v}}),
    ("route.scores.big", lambda v: {"route": {"teacher": "big", "scores": {"big": v}}}),
    ("extra[1]", lambda v: {"extra": [0.5, v]}),
])
def test_non_finite_numbers_are_refused_as_json_has_none(field, make, value):
  """RFC 8259 has no NaN or infinity: json.dumps would write the non-JSON tokens NaN / Infinity,
  which strict readers of our shards (and of the export's `record` column) refuse."""
  r = {"schema": R.SCHEMA_VERSION, "id": "x", "prompt": "p", **make(value)}
  with pytest.raises(R.RecordError, match=rf"'{re.escape(field)}' = .*(nan|inf).*no JSON form"):
    R.encode(r)
  data = json.dumps(r).encode()  # written by an older version: refused when read, named
  with pytest.raises(R.RecordError, match=rf"'{re.escape(field)}'.*no JSON form.*record 4"):
    R.decode(data, where="f.array_record, record 4")
