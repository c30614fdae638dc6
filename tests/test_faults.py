"""Faults without a model (seconds): the shard writer SIGKILLed at every commit point, a full disk,
failing fsync/rename; checkpoints left half-written. After each, nothing partial is accepted and a
rerun writes exactly what a clean run writes. (The whole pipeline killed at >= 20 points:
test_faults_pipeline.py.)"""
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import faults  # tests/faults.py (conftest puts tests/ on sys.path)
from persyn_jax.data import records as R
from persyn_jax.data import shards

N_RECORDS, N_SHARDS = 40, 5
TESTS = os.path.dirname(os.path.abspath(__file__))


def python_c(code: str) -> list[str]:
  """A fresh interpreter running `code`, with tests/ importable (for `import faults`)."""
  return [sys.executable, "-c", f"import sys; sys.path.insert(0, {TESTS!r})\n" + code]


def make_records(n=N_RECORDS):
  # ~400 bytes each: an ArrayRecord shard of 8 is ~4 KiB
  return [R.make(f"r{i}", f"prompt {i} " + "x" * 400, teacher="t", sample=0, response=f"answer {i}")
          for i in range(n)]


def write_all(out):
  return shards.write_records(out, "gen", make_records(), num_shards=N_SHARDS, host=0)


def snapshot(out):
  """Final files (not temp files) and their bytes."""
  return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))
          if not n.startswith(".") and ".tmp-" not in n}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("clean"))
  write_all(out)
  return out, snapshot(out)


# Runs in a fresh interpreter (no JAX, no threads): forks one child per kill point; each child
# installs faults.kill_at and writes the stage; the parent then resumes (reruns) in its own process.
KILLER = textwrap.dedent("""
    import json, os, sys
    import faults
    from persyn_jax.data import records as R, shards
    root, n_records, n_shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    recs = [R.make(f"r{i}", f"prompt {i} " + "x" * 400, teacher="t", sample=0,
                   response=f"answer {i}") for i in range(n_records)]
    out = []
    for target in ("os.replace", "os.fsync"):
      for when in ("before", "after"):
        for n in range(1, 200):
          d = os.path.join(root, f"{target}-{when}-{n}")
          pid = os.fork()
          if pid == 0:
            faults.kill_at(target, n, match=d, when=when)
            shards.write_records(d, "gen", recs, num_shards=n_shards, host=0)
            os._exit(0)
          _, status = os.waitpid(pid, 0)
          if not os.WIFSIGNALED(status):  # the n-th call never came: every point was covered
            break
          left = {"complete": sorted(shards.complete_shards(d, "gen", n_shards, host=0)),
                  "files": sorted(os.listdir(d)) if os.path.isdir(d) else []}
          shards.write_records(d, "gen", recs, num_shards=n_shards, host=0)  # the rerun
          out.append({"dir": d, "target": target, "when": when, "n": n, **left})
    print(json.dumps(out))
""")


def test_shard_writer_killed_at_every_commit_point_resumes_exactly(clean, tmp_path):
  """SIGKILL before and after every rename and every fsync of write_records (shards, sidecars,
  manifest): the rerun keeps the complete shards, rewrites the rest, removes the dead writer's
  temp files, and the stage is identical to an uninterrupted write."""
  ref_dir, ref = clean
  proc = subprocess.run(python_c(KILLER) + [str(tmp_path), str(N_RECORDS), str(N_SHARDS)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  points = json.loads(proc.stdout.strip().splitlines()[-1])
  # 5 shards x (sidecar + shard) renames + the manifest, before and after: 22; fsyncs: more
  assert sum(p["target"] == "os.replace" for p in points) >= 22
  assert len(points) >= 60
  for p in points:
    # what a kill leaves is never taken for a shard: a complete shard is exactly the clean one
    for i in p["complete"]:
      name = shards.shard_name("gen", 0, i, N_SHARDS)
      assert name in ref
    assert snapshot(p["dir"]) == ref, p
    assert [r["id"] for r in shards.read_records(p["dir"], "gen")] == [f"r{i}" for i in range(N_RECORDS)]
    # the killed writer's temp files (shard, sidecar, manifest) are gone after the rerun
    assert not [n for n in os.listdir(p["dir"]) if ".tmp-" in n], p
  assert any(".tmp-" in n for p in points for n in p["files"])  # kills did leave temp files


def test_a_full_disk_fails_the_shard_clearly_and_leaves_nothing(clean, tmp_path):
  ref_dir, ref = clean
  out = str(tmp_path / "gen")
  script = textwrap.dedent(f"""
      import faults
      from persyn_jax.data import records as R, shards
      recs = [R.make(f"r{{i}}", f"prompt {{i}} " + "x" * 400, teacher="t", sample=0,
                     response=f"answer {{i}}") for i in range({N_RECORDS})]
      faults.limit_file_size(8 << 10)  # the disk fills up at 8 KiB
      shards.write_records({out!r}, "gen", recs, num_shards={N_SHARDS}, host=0)
  """)
  proc = subprocess.run(python_c(script), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  # the error names the cause and the file being written
  assert "File too large" in last and os.path.join(out, ".gen-0-") in last, last
  names = os.listdir(out)
  assert not any(".tmp-" in n for n in names), names  # the temp file is removed
  assert shards.complete_shards(out, "gen", N_SHARDS, host=0) == set()
  with pytest.raises(shards.ShardError, match="no manifest"):
    list(shards.read_records(out, "gen"))
  write_all(out)  # space again: the rerun
  assert snapshot(out) == ref


@pytest.mark.parametrize("target,n", [("os.fsync", 1), ("os.fsync", 4), ("os.fsync", 9),
                                      ("os.replace", 2), ("os.replace", 5)])
def test_a_failing_write_names_the_file_and_commits_nothing(clean, tmp_path, target, n):
  """ENOSPC from fsync (which, like a failed write(), names no file by itself) or from a rename:
  the error says which file, no shard is half-committed, and a rerun completes the stage."""
  ref_dir, ref = clean
  out = str(tmp_path / "gen")
  undo = faults.fail_at(target, n, match=out + os.sep)  # files in it (a directory's fsync may fail)
  try:
    with pytest.raises(OSError) as info:
      write_all(out)
  finally:
    undo()
  e = info.value
  assert e.errno == errno.ENOSPC and "No space left on device" in str(e)
  assert e.filename and str(e.filename).startswith(out), str(e)
  done = shards.complete_shards(out, "gen", N_SHARDS, host=0)
  assert done == set(range(len(done)))  # a prefix of the shards, each complete
  with pytest.raises(shards.ShardError):
    list(shards.read_records(out, "gen"))
  write_all(out)
  assert snapshot(out) == ref


def test_a_shard_truncated_after_its_commit_is_refused_and_rewritten(clean, tmp_path):
  """A committed shard that later loses its tail (a disk error, a bad copy): the reader refuses
  it naming the file; the rerun does not keep it."""
  ref_dir, ref = clean
  out = str(tmp_path / "gen")
  shutil.copytree(ref_dir, out)
  victim = os.path.join(out, shards.shard_name("gen", 0, 2, N_SHARDS))
  data = open(victim, "rb").read()
  open(victim, "wb").write(data[:len(data) // 2])
  with pytest.raises(shards.ShardError, match=os.path.basename(victim)):
    list(shards.read_records(out, "gen"))
  assert 2 not in shards.complete_shards(out, "gen", N_SHARDS, host=0)
  write_all(out)
  assert snapshot(out) == ref


def test_a_half_written_checkpoint_is_never_restored(tmp_path):
  """An orbax save that died midway leaves `<step>.orbax-checkpoint-tmp*`: the newest complete
  step is restored, with its values."""
  import jax.numpy as jnp
  from persyn_jax.checkpoints import CheckpointManager
  d = str(tmp_path / "ckpt")
  c = CheckpointManager(d, keep=3, async_save=False)
  for step in (1, 2):
    c.save(step, {"w": jnp.full((4,), float(step))}, {"step": step, "position": step})
  c.close()
  shutil.copytree(os.path.join(d, "2"), os.path.join(d, "3.orbax-checkpoint-tmp-1234"))
  os.makedirs(os.path.join(d, "4.orbax-checkpoint-tmp-99", "state"))
  c = CheckpointManager(d, keep=3, async_save=False)
  assert c.latest_step() == 2 and c.all_steps() == [1, 2]
  import jax
  state, meta, step = c.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  c.close()
  assert step == 2 and meta["position"] == 2
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4,), 2.0))


def test_a_half_written_checkpoint_does_not_keep_its_step_past_keep(tmp_path):
  """A save of step 3 killed midway, then step 3 saved again after the resume: the newest `keep`
  steps stay, no more (orbax deleted a step through its leftover tmp dir, keeping the step)."""
  import jax.numpy as jnp
  from persyn_jax.checkpoints import CheckpointManager
  d = str(tmp_path / "ckpt")
  c = CheckpointManager(d, keep=2, async_save=False)
  for step in (1, 2):
    c.save(step, {"w": jnp.full((4,), float(step))}, {"step": step})
  c.close()
  shutil.copytree(os.path.join(d, "2"), os.path.join(d, "3.orbax-checkpoint-tmp-1234"))
  c = CheckpointManager(d, keep=2, async_save=False)
  assert c.latest_step() == 2
  for step in (3, 4, 5):
    c.save(step, {"w": jnp.full((4,), float(step))}, {"step": step})
  c.close()
  assert sorted(os.listdir(d)) == ["4", "5"]
  assert CheckpointManager(d, keep=2).all_steps() == [4, 5]


def test_fault_helpers_are_exact_and_undoable(tmp_path):
  calls = []
  real = os.replace
  undo = faults.fail_at("os.replace", 2, match=str(tmp_path), errno=errno.EIO)
  try:
    for i in range(3):
      src, dst = tmp_path / f"a{i}", tmp_path / f"b{i}"
      src.write_text("x")
      try:
        os.replace(src, dst)
        calls.append("ok")
      except OSError as e:
        calls.append((e.errno, e.filename))
  finally:
    undo()
  assert os.replace is real
  assert calls == ["ok", (errno.EIO, str(tmp_path / "b1")), "ok"]
  faults.apply(None)  # no faults: nothing to do
  with pytest.raises(ValueError, match="counting starts at 1"):
    faults.kill_at("os.replace", 0)
