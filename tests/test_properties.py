"""Property tests (hypothesis) that complete test_data_records.py (codec round trip),
test_data_pipeline.py (first-fit packing) and test_scoring_rewards.py (normalizers): hostile bytes
and text for the record codec, safe file names, and the reward's symmetry and monotonicity."""
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from persyn_jax import rewards
from persyn_jax.data import records as R
from persyn_jax.io_utils import safe_name

# Any code point, lone surrogates included (hypothesis leaves them out of st.text() by default).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
valid_text = st.text(max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_gives_a_record_or_a_record_error(data):
  """Whatever a shard holds, the decoder answers with a validated record or RecordError: never
  another exception, never code execution (there is no pickle path to reach)."""
  try:
    out = R.decode(data)
  except R.RecordError:
    return
  assert isinstance(out, dict) and out["schema"] == R.SCHEMA_VERSION


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["{", b"\x81".decode("latin-1")]), st.binary(max_size=60))
def test_truncated_or_garbled_records_are_record_errors(prefix, tail):
  data = prefix.encode("latin-1") + tail
  try:
    R.decode(data)
  except R.RecordError:
    pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["id", "prompt", "response", "teacher", "policy", "extra"]), any_text,
       st.sampled_from(R.FORMATS))
def test_any_text_round_trips_or_is_refused_naming_the_field(field, text, fmt):
  record = {"schema": R.SCHEMA_VERSION, "id": "x", "prompt": "p", field: text or "t"}
  try:
    data = R.encode(record, fmt)
  except R.RecordError as e:
    assert f"record field {field!r}" in str(e)
    assert any(0xD800 <= ord(c) <= 0xDFFF for c in record[field])  # only non-Unicode text fails
    return
  assert R.decode(data) == record


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["teacher", "response", "policy", "reference"]), valid_text),
       st.text(min_size=1, max_size=20), valid_text, st.integers(0, 5))
def test_json_and_msgpack_agree_and_encoding_is_canonical(extra, rid, prompt, protocol):
  record = {"schema": R.SCHEMA_VERSION, "id": rid, "prompt": prompt, **extra}
  j, m = R.encode(record, "json"), R.encode(record, "msgpack")
  assert R.decode(j) == R.decode(m) == record
  assert R.encode(R.decode(j), "json") == j and R.encode(R.decode(m), "msgpack") == m
  with pytest.raises(R.RecordError):
    R.decode(pickle.dumps(record, protocol=protocol))


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_safe_name_never_leaves_the_directory(name):
  try:
    s = safe_name(name)
  except ValueError as e:
    assert "name" in str(e)
    return
  assert s and len(s) <= 100 and os.sep not in s and "/" not in s and "\\" not in s
  assert not s.startswith(".") and s not in (".", "..") and "\0" not in s
  root = os.path.join(os.sep, "run", "probe")
  assert os.path.dirname(os.path.normpath(os.path.join(root, s))) == root
  assert safe_name(s) == s  # idempotent: a sanitized name maps to itself


values = hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 6)),
                    elements=st.integers(-200, 200).map(lambda v: v / 8))


@settings(max_examples=150, deadline=None)
@given(values, values, st.randoms(use_true_random=False), st.sampled_from(rewards.NORMALIZERS),
       st.sampled_from([0.0, 0.4, 1.0]))
def test_the_reward_does_not_depend_on_the_order_of_the_teachers(q, l, rnd, method, alpha):
  if q.shape != l.shape:
    return
  perm = list(range(q.shape[1]))
  rnd.shuffle(perm)
  r = rewards.combine(q, l, alpha, method)
  np.testing.assert_allclose(rewards.combine(q[:, perm], l[:, perm], alpha, method), r[:, perm],
                             atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(values, values, st.integers(0, 5), st.sampled_from(rewards.NORMALIZERS))
def test_more_quality_never_lowers_a_teachers_reward_rank(q, l, j, method):
  """Raising one teacher's quality (learnability unchanged) never makes it lose its place to
  another teacher on that prompt."""
  if q.shape != l.shape:
    return
  j %= q.shape[1]
  better = q.copy()
  better[:, j] += 1.0
  r0, r1 = rewards.combine(q, l, 0.4, method), rewards.combine(better, l, 0.4, method)
  for row0, row1 in zip(r0, r1):
    beaten_before = set(np.flatnonzero(row0 > row0[j] + 1e-12))
    beaten_after = set(np.flatnonzero(row1 > row1[j] + 1e-12))
    assert beaten_after <= beaten_before
