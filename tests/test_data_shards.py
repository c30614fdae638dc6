"""Sharded ArrayRecord: round trip, host split, crash safety, and clear errors on damage."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from persyn_jax.data import batches, records as R, shards

N = 10_000


def make_records(n, start=0):
  return [R.make(f"r{i}", f"prompt {i}", teacher=f"t{i % 3}", response=f"answer {i}", sample=0,
                 scores={"quality": i / n, "learnability": -float(i), "reward": None},
                 provenance={"run": "test", "stage": "probe", "config_hash": "abc", "seed": 0})
          for i in range(start, start + n)]


@pytest.fixture(scope="module")
def ten_k(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tenk"))
  recs = make_records(N)
  shards.write_records(out, "probe", recs, num_shards=8, host=0, fmt="msgpack")
  return out, recs


def test_10k_records_round_trip_across_8_shards(ten_k):
  out, recs = ten_k
  manifest = shards.read_manifest(out, "probe")
  assert [s["file"] for s in manifest["shards"]] == [
      f"probe-0-{i:05d}-of-00008.array_record" for i in range(8)]
  assert sum(s["records"] for s in manifest["shards"]) == manifest["records"] == N
  assert list(shards.read_records(out, "probe")) == recs
  assert shards.complete_shards(out, "probe", 8, host=0) == set(range(8))


def ids(ds):
  return [ds[i]["id"] for i in range(len(ds))]


def test_four_hosts_see_every_record_once_per_epoch(ten_k):
  out, _ = ten_k
  for epoch in (0, 1):
    seen = [ids(batches.host_records(out, seed=3, epoch=epoch, host=h, num_hosts=4))
            for h in range(4)]
    assert all(len(s) == N // 4 for s in seen)
    flat = [i for s in seen for i in s]
    assert len(set(flat)) == len(flat) == N  # no overlap, no gap
    if epoch == 0:
      first = seen[0]
  assert seen[0] != first  # reshuffled per epoch
  again = ids(batches.host_records(out, seed=3, epoch=0, host=0, num_hosts=4))
  assert again == first  # and deterministic


def test_shards_per_host_and_manifest_over_hosts(tmp_path):
  out = str(tmp_path)
  for host in range(2):
    shards.write_records(out, "gen", make_records(10, start=100 * host), num_shards=3, host=host,
                         manifest=False)
  manifest = shards.write_manifest(out, "gen", extra={"config_hash": "x"})
  assert [(s["host"], s["index"]) for s in manifest["shards"]] == [(h, i) for h in (0, 1)
                                                                   for i in range(3)]
  assert [r["id"] for r in shards.read_records(out, "gen")] == (
      [f"r{i}" for i in range(10)] + [f"r{i}" for i in range(100, 110)])


def test_manifest_refuses_shards_of_other_host_counts(tmp_path):
  """A stage rerun with fewer processes finds the shards of hosts it no longer has (left by the
  earlier run): the manifest refuses them, naming them, instead of mixing two layouts."""
  out = str(tmp_path)
  for host in range(3):
    shards.write_records(out, "gen", make_records(4, start=10 * host), num_shards=1, host=host,
                         manifest=False)
  with pytest.raises(shards.ShardError, match=r"hosts \[2\] \(gen-2-00000-of-00001"):
    shards.write_manifest(out, "gen", num_hosts=2)
  with pytest.raises(shards.ShardError, match=r"no shards of hosts \[3\] \(of 4\)"):
    shards.write_manifest(out, "gen", num_hosts=4)
  assert shards.write_manifest(out, "gen", num_hosts=3)["records"] == 12


def test_stage_records_on_one_process_are_one_hosts_shards(tmp_path):
  recs = make_records(10)
  manifest = shards.write_stage_records(str(tmp_path), "score", recs, records_per_shard=4)
  assert [(s["host"], s["index"], s["records"]) for s in manifest["shards"]] == [
      (0, 0, 3), (0, 1, 3), (0, 2, 4)]
  assert [r["id"] for r in shards.read_records(str(tmp_path), "score")] == [r["id"] for r in recs]
  # a rerun keeps the complete shards and writes the same manifest
  assert shards.write_stage_records(str(tmp_path), "score", recs, records_per_shard=4) == manifest


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from persyn_jax.data import records as R, shards
    out, marker = sys.argv[1], sys.argv[2]
    recs = [R.make(f"r{i}", f"prompt {i}") for i in range(40)]
    for i, part in enumerate(shards.split_evenly(recs, 4)):
      def gen(part=part, i=i):
        for j, r in enumerate(part):
          if i == 2 and j == 5:
            open(marker, "w").close()
            time.sleep(600)  # killed here, mid-shard
          yield r
      shards.write_shard(out, "gen", gen(), index=i, count=4, host=0)
""")


def test_writer_killed_mid_shard_leaves_no_partial_shard(tmp_path):
  out, marker = str(tmp_path / "gen"), str(tmp_path / "marker")
  proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, out, marker])
  try:
    deadline = time.time() + 60
    while not os.path.exists(marker):
      assert proc.poll() is None and time.time() < deadline, "writer never reached shard 2"
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  names = os.listdir(out)
  finals = sorted(n for n in names if n.endswith(".array_record") and not n.startswith("."))
  assert finals == ["gen-0-00000-of-00004.array_record", "gen-0-00001-of-00004.array_record"]
  assert any(n.startswith(".gen-0-00002") for n in names)  # the killed temp file
  assert shards.complete_shards(out, "gen", 4, host=0) == {0, 1}
  with pytest.raises(shards.ShardError, match="missing shards \\[2, 3\\]"):
    shards.write_manifest(out, "gen")
  before = os.path.getmtime(os.path.join(out, finals[0]))
  recs = [R.make(f"r{i}", f"prompt {i}") for i in range(40)]
  shards.write_records(out, "gen", recs, num_shards=4, host=0)  # the rerun
  assert os.path.getmtime(os.path.join(out, finals[0])) == before  # complete shards kept
  assert list(shards.read_records(out, "gen")) == recs  # no duplicates, no gaps
  assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_exception_during_write_leaves_nothing(tmp_path):
  def gen():
    yield R.make("a", "p")
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    shards.write_shard(str(tmp_path), "s", gen(), index=0, count=1, host=0)
  assert os.listdir(tmp_path) == []
  with pytest.raises(R.RecordError, match="'id'"):  # an invalid record is caught before writing
    shards.write_shard(str(tmp_path), "s", [{"schema": 1, "prompt": "p"}], index=0, count=1, host=0)
  assert os.listdir(tmp_path) == []


def _small(tmp_path, n=50):
  out = str(tmp_path)
  shards.write_records(out, "s", make_records(n), num_shards=2, host=0)
  return out, os.path.join(out, "s-0-00001-of-00002.array_record")


def test_corrupted_shard_is_refused_naming_the_file(tmp_path):
  out, path = _small(tmp_path)
  data = bytearray(open(path, "rb").read())
  data[200] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(shards.ShardError, match=r"s-0-00001-of-00002\.array_record: sha256"):
    list(shards.read_records(out, "s"))
  assert shards.complete_shards(out, "s", 2, host=0) == {0}  # a rerun rewrites it
  with pytest.raises(shards.ShardError, match="corrupt shard near record"):
    list(shards.iter_shard(path))  # without the manifest, ArrayRecord's own checksums catch it


def test_truncated_shard_is_refused(tmp_path):
  out, path = _small(tmp_path)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  with pytest.raises(shards.ShardError, match=r"s-0-00001-of-00002\.array_record: \d+ bytes, "
                     "manifest says"):
    list(shards.read_records(out, "s"))


def test_missing_manifest_or_shard(tmp_path):
  out, path = _small(tmp_path)
  os.remove(path)
  with pytest.raises(shards.ShardError, match="s-0-00001-of-00002.array_record: listed in"):
    list(shards.read_records(out, "s"))
  os.remove(shards.manifest_path(out, "s"))
  with pytest.raises(shards.ShardError, match="no manifest"):
    list(shards.read_records(out, "s"))


def test_a_sidecar_or_manifest_that_is_not_an_object_is_named_or_rewritten(tmp_path):
  """Valid JSON of the wrong shape (a hand edit, another tool's file) failed with a raw
  AttributeError ('list' object has no attribute 'get'): a damaged sidecar now makes its shard
  incomplete, so a rerun writes it again, as a torn one does; a damaged manifest is named."""
  out, path = _small(tmp_path)
  want = list(shards.read_records(out, "s"))
  open(shards.manifest_path(out, "s"), "w").write("[1]")
  with pytest.raises(shards.ShardError, match=r"s\.manifest\.json: unreadable manifest: a JSON "
                                              r"list, not an object"):
    list(shards.read_records(out, "s"))
  open(path + ".meta.json", "w").write("[1, 2]")
  assert shards.complete_shards(out, "s", 2, host=0) == {0}
  with pytest.raises(shards.ShardError, match=r"s-0-00001-of-00002\.array_record: no readable "
                                              r"s-0-00001-of-00002\.array_record\.meta\.json"):
    shards.write_manifest(out, "s")
  shards.write_records(out, "s", want, num_shards=2, host=0)  # the rerun rewrites that shard
  assert list(shards.read_records(out, "s")) == want


def test_wrong_schema_version_in_a_shard(tmp_path):
  out = str(tmp_path)
  path = os.path.join(out, "s-0-00000-of-00001.array_record")
  w = ArrayRecordWriter(path, shards.WRITER_OPTIONS)
  w.write(json.dumps({"schema": 1, "id": "a", "prompt": "p"}).encode())
  w.write(json.dumps({"schema": 99, "id": "b", "prompt": "p"}).encode())
  w.close()
  json.dump({"file": os.path.basename(path), "records": 2, "sha256": shards.sha256_file(path),
             "bytes": os.path.getsize(path)}, open(path + ".meta.json", "w"))
  shards.write_manifest(out, "s")
  with pytest.raises(R.RecordError, match=r"'schema' = 99: unsupported schema version.*"
                     r"s-0-00000-of-00001\.array_record, record 1"):
    list(shards.read_records(out, "s"))


def test_rerun_with_changed_inputs_is_refused(tmp_path):
  out = str(tmp_path)
  shards.write_records(out, "s", make_records(10), num_shards=2, host=0)
  with pytest.raises(shards.ShardError, match="inputs changed"):
    shards.write_records(out, "s", make_records(12), num_shards=2, host=0)
