"""gs:// run paths against a real GCS JSON API emulator (gcp-storage-emulator, in memory, on a free
localhost port; started and stopped by the `gcs` fixture): the fs layer's operations, shards and
manifests, a whole tiny pipeline whose run directory and world cache are on gs:// (the same
records as the same run on local disk), and SIGKILLed runs resumed on gs://."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from persyn_jax import fs
from persyn_jax import io_utils as io
from persyn_jax.data import shards
from persyn_jax.run_config import STAGES  # every stage: a run of them all ends with its report

BUCKET = "persyn-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """The emulator's base URL gs://persyn-test; STORAGE_EMULATOR_HOST points there meanwhile."""
  port = _free_port()
  host = f"http://127.0.0.1:{port}"
  # the emulator's own CLI, plus the generation headers real GCS sends (see gcs_emulator.py)
  launcher = os.path.join(os.path.dirname(__file__), "gcs_emulator.py")
  proc = subprocess.Popen([sys.executable, launcher, "start", "--host",
                           "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket",
                           BUCKET, "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{host}/storage/v1/b/{BUCKET}", timeout=1).read()
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        raise RuntimeError("gcp-storage-emulator did not start")
      time.sleep(0.1)
  # gcsfs reads the first, tensorstore (orbax's gs:// writer) the second
  names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")
  old = {k: os.environ.get(k) for k in names}
  os.environ.update({k: host for k in names})
  try:
    yield f"gs://{BUCKET}"
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def gdir(gcs, request):
  """A fresh gs:// directory for one test."""
  return f"{gcs}/{request.node.name}-{time.time_ns()}"


def test_fs_round_trip(gdir, tmp_path):
  a = fs.join(gdir, "sub", "a.json")
  io.atomic_write_json(a, {"x": 1})
  assert fs.exists(a) and fs.isfile(a) and fs.isdir(fs.join(gdir, "sub"))
  assert fs.read_text(a) == '{\n  "x": 1\n}\n'
  io.atomic_write_text(a, "replaced")  # a second write replaces the object whole
  assert fs.read_text(a) == "replaced" and fs.getsize(a) == 8
  io.atomic_write_bytes(fs.join(gdir, "sub", "b.bin"), b"\x00\x01")
  assert fs.listdir(fs.join(gdir, "sub")) == ["a.json", "b.bin"]
  assert fs.glob(fs.join(gdir, "sub", "*.json")) == [a]
  fs.rename(a, fs.join(gdir, "sub", "c.json"))
  assert not fs.exists(a) and fs.read_text(fs.join(gdir, "sub", "c.json")) == "replaced"
  fs.rename(fs.join(gdir, "sub"), fs.join(gdir, "moved"))  # a "directory": every object under it
  assert fs.listdir(fs.join(gdir, "moved")) == ["b.bin", "c.json"]
  assert not fs.exists(fs.join(gdir, "sub"))
  fs.remove(fs.join(gdir, "moved", "b.bin"))
  with pytest.raises(FileNotFoundError):
    fs.remove(fs.join(gdir, "moved", "b.bin"))
  with pytest.raises(FileNotFoundError):
    fs.getsize(fs.join(gdir, "nothing"))
  with pytest.raises(FileNotFoundError):
    fs.listdir(fs.join(gdir, "nothing"))
  ref = _local(tmp_path, b"replaced")
  assert io.sha256_file(fs.join(gdir, "moved", "c.json")) == io.sha256_file(ref)
  # a local copy of a remote file follows its versions
  c = fs.join(gdir, "moved", "c.json")
  first = fs.local_copy(c)
  assert open(first, "rb").read() == b"replaced"
  io.atomic_write_text(c, "v2")
  assert open(fs.local_copy(c), "rb").read() == b"v2"
  fs.rmtree(fs.join(gdir, "moved"))
  assert not fs.exists(fs.join(gdir, "moved"))
  # local paths keep the os calls
  assert fs.join(str(tmp_path), "x") == os.path.join(str(tmp_path), "x")
  assert fs.local_copy(str(tmp_path)) == str(tmp_path)


def _local(tmp_path, data: bytes) -> str:
  p = tmp_path / "ref.bin"
  p.write_bytes(data)
  return str(p)


def test_local_dir_copies_a_remote_directory(gdir, tmp_path):
  src = tmp_path / "model"
  (src / "tok").mkdir(parents=True)
  (src / "config.json").write_text("{}")
  (src / "tok" / "vocab.txt").write_text("a\nb\n")
  fs.put(str(src), fs.join(gdir, "model"))
  local = fs.local_dir(fs.join(gdir, "model"))
  assert open(os.path.join(local, "tok", "vocab.txt")).read() == "a\nb\n"
  assert sorted(os.listdir(local)) == ["config.json", "tok"]
  assert fs.local_dir(fs.join(gdir, "model")) == local  # same version: no new copy


def test_orbax_trees_and_checkpoints_on_gcs(gdir):
  import jax.numpy as jnp
  import numpy as np

  from persyn_jax.checkpoints import CheckpointManager, restore_tree, save_tree
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": {"x": jnp.ones(3, jnp.int32)}}
  save_tree(fs.join(gdir, "tree"), tree)
  back = restore_tree(fs.join(gdir, "tree"), tree)
  assert np.array_equal(back["w"], tree["w"]) and np.array_equal(back["b"]["x"], tree["b"]["x"])
  mgr = CheckpointManager(fs.join(gdir, "ckpt"), keep=1, async_save=False)
  for step in (1, 2):
    mgr.save(step, {"w": tree["w"] * step}, {"step": step})
  mgr.wait()
  state, meta, step = mgr.restore({"w": tree["w"]})
  mgr.close()
  assert step == 2 and meta == {"step": 2} and np.array_equal(state["w"], tree["w"] * 2)
  assert "2" in fs.listdir(fs.join(gdir, "ckpt")) and "1" not in fs.listdir(fs.join(gdir, "ckpt"))


def test_run_lock_note_on_gcs(gdir):
  import json
  import socket

  from persyn_jax.stages.lock import RunLock, RunLockedError, prepare_run_dir
  prepare_run_dir(gdir)
  note = fs.join(gdir, ".lock")
  logs = []
  # a live process of this host holds the note: refused, naming it
  io.atomic_write_json(note, {"pid": os.getppid(), "host": socket.gethostname(), "started": "t0"})
  with pytest.raises(RunLockedError, match=f"pid {os.getppid()} on this host"):
    RunLock(gdir, logs.append).acquire()
  # another host's note cannot be checked: taken over, with a warning in the log
  io.atomic_write_json(note, {"pid": 1, "host": "elsewhere", "started": "t0"})
  with RunLock(gdir, logs.append):
    assert json.loads(fs.read_bytes(note))["pid"] == os.getpid()
  assert not fs.exists(note)  # released: the note is gone
  assert "on another host: whether it still runs cannot be told on gs://" in logs[-1]
  # an object where the run directory should be
  io.atomic_write_text(fs.join(gdir, "file"), "x")
  with pytest.raises(Exception, match="is an object, not a directory"):
    prepare_run_dir(fs.join(gdir, "file"))


def _recs(n):
  return [shards.rec.make(f"r{i}", f"prompt {i}", teacher="T", response=f"answer {i}", sample=0)
          for i in range(n)]


def test_shards_and_manifest_on_gcs(gdir, tmp_path):
  recs = _recs(10)
  out = fs.join(gdir, "probe")
  metas = shards.write_records(out, "probe", recs, num_shards=3, host=0)
  local = str(tmp_path / "probe")
  assert metas == shards.write_records(local, "probe", recs, num_shards=3, host=0)
  assert list(shards.read_records(out, "probe")) == list(shards.read_records(local, "probe"))
  assert (fs.read_bytes(shards.manifest_path(out, "probe"))
          == open(shards.manifest_path(local, "probe"), "rb").read())
  assert shards.complete_shards(out, "probe", 3, host=0) == {0, 1, 2}
  # a shard whose upload never happened (killed after its sidecar) is not complete; the rerun
  # writes it again and keeps the others
  name = shards.shard_name("probe", 0, 1, 3)
  fs.remove(fs.join(out, name))
  assert shards.complete_shards(out, "probe", 3, host=0) == {0, 2}
  with pytest.raises(shards.ShardError, match="missing"):
    list(shards.read_records(out, "probe"))
  shards.write_records(out, "probe", recs, num_shards=3, host=0)
  assert list(shards.read_records(out, "probe")) == recs
  paths = shards.shard_paths(out, "probe")
  assert all(os.path.exists(p) for p in paths)  # local copies, for grain
  # a corrupt object is named
  io.atomic_write_bytes(fs.join(out, name), b"x" * fs.getsize(fs.join(out, name)))
  with pytest.raises(shards.ShardError, match=f"{name}: sha256 differs"):
    list(shards.read_records(out, "probe"))


# -- a whole run on gs:// -------------------------------------------------------------------------

# The tiny toy world with shards of 4 records (many commit points), PerSyn and the oracle, one
# SFT epoch with a checkpoint every step.
SETS = ["world.scale=tiny", "seeds=[]", "records_per_shard=4", "compare=[persyn,oracle]",
        "sampling.max_new_tokens=32", "sampling.min_bucket=64", "sft.epochs=1",
        "sft.checkpoint_every=1", "sft.keep_checkpoints=1"]


def run_args(run_dir: str, stages, cache: str) -> list[str]:
  args = ["--run-dir", run_dir, "--stages", ",".join(stages), "--set", f"world.cache_dir={cache}"]
  for s in SETS:
    args += ["--set", s]
  return args


def kill(target: str, match: str, n: int = 1, when: str = "before") -> dict:
  return {"kill_at": {"target": target, "n": n, "match": match, "when": when}}


# Where each launch of the resumed run is SIGKILLed (the stages it runs end at its stage): while a
# shard is uploaded, while a manifest and a DONE.json are put, after an upload, and when a trained
# student is about to be uploaded (its checkpoints are on gs://: the next launch resumes from them).
KILLS = [
    ("probe", kill("persyn_jax.fs.put", "/probe/", 2)),
    ("probe", kill("persyn_jax.data.shards.atomic_write_json", ".manifest.json")),
    ("score", kill("persyn_jax.fs.put", "/score/", 3, "after")),
    ("generate", kill("persyn_jax.fs.put", "/data/", 2)),
    ("generate", kill("persyn_jax.stages.runner.atomic_write_json", "/generate/DONE.json")),
    ("sft", kill("persyn_jax.fs.put", "/sft/", 1)),
]


def records_by_stage(run: str) -> dict[str, list[dict]]:
  """Every stage's records (each manifest's shards, read and verified), by manifest path."""
  out = {}
  for man in fs.glob(fs.join(run, "**", "*.manifest.json")):
    d, name = man.rsplit("/", 1)
    stage = name[:-len(".manifest.json")]
    out[d[len(run):] + "/" + stage] = list(shards.read_records(d, stage))
  return out


def untimed(x):
  if isinstance(x, dict):
    return {k: untimed(v) for k, v in x.items() if k not in ("seconds", "finished")}
  return [untimed(v) for v in x] if isinstance(x, list) else x


@pytest.mark.slow
def test_run_on_gcs_killed_and_resumed_equals_a_local_run(gcs, tiny_world, tmp_path):
  import json

  import faults  # tests/faults.py
  from persyn_jax.toyworld.build import upload_world
  local_cache = os.path.dirname(os.path.dirname(tiny_world.root))  # <cache>/toyworld/<key>
  remote_cache = f"{gcs}/cache-{time.time_ns()}"
  # the world on gs://, as a run that builds it leaves it (built once per session, here)
  upload_world(tiny_world, fs.join(remote_cache, "toyworld", os.path.basename(tiny_world.root)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             TENSORSTORE_GCS_HTTP_URL=os.environ["STORAGE_EMULATOR_HOST"],
             PERSYN_JAX_LOCAL_CACHE=str(tmp_path / "local-cache"))
  clean, run = str(tmp_path / "clean"), f"{gcs}/run-{time.time_ns()}"
  logs = tmp_path / "logs"
  logs.mkdir()
  killed = []
  with faults.Launcher(env) as la:
    pid = la.start("persyn_jax.train", run_args(clean, STAGES, local_cache),
                   log=str(logs / "clean"))
    assert la.wait(pid) == 0, (logs / "clean").read_text()[-3000:]
    for i, (stage, spec) in enumerate(KILLS):
      log = logs / f"launch-{i}"
      pid = la.start("persyn_jax.train", run_args(run, STAGES[:STAGES.index(stage) + 1],
                                                  remote_cache), log=str(log), faults=spec)
      rc = la.wait(pid)
      assert rc in (0, -9), (i, rc, log.read_text()[-3000:])
      if rc == -9:
        killed.append(stage)
        # a killed run leaves its lock note; the next launch (same host, pid gone) takes it over
        assert json.loads(fs.read_bytes(fs.join(run, ".lock")))["pid"] == pid
    pid = la.start("persyn_jax.train", run_args(run, STAGES, remote_cache), log=str(logs / "final"))
    assert la.wait(pid) == 0, (logs / "final").read_text()[-3000:]
  final = (logs / "final").read_text()
  assert "taking over the lock note of an earlier run" in (logs / "launch-1").read_text()
  assert f"Report: {run}/report/report.md" in final
  assert killed == [s for s, _ in KILLS], killed  # every launch died where it was meant to
  assert not fs.exists(fs.join(run, ".lock"))  # a finished run leaves no note
  # the same records, stage by stage, nothing lost or twice; the same manifests and students
  a, b = records_by_stage(clean), records_by_stage(run)
  assert sorted(a) == sorted(b) and len(a) >= 10, (sorted(a), sorted(b))
  for key in a:
    assert a[key] == b[key], key
    ids = [(r["id"], r.get("teacher"), r.get("sample"), r.get("policy")) for r in b[key]]
    assert len(ids) == len(set(ids)), key
  for rel in [m[len(clean):] for m in fs.glob(f"{clean}/**/*.manifest.json")] + [
      "/sft/persyn/student/model.safetensors", "/sft/oracle/student/model.safetensors",
      "/route/assignments.json", "/export/toy_persyn/messages.jsonl"]:
    assert fs.read_bytes(run + rel) == open(clean + rel, "rb").read(), rel
  # the same counts in every DONE.json (timings aside; paths of the world's files name its copy)
  world = fs.join(remote_cache, "toyworld", os.path.basename(tiny_world.root))
  for stage in STAGES:
    x, y = (fs.read_text(fs.join(d, stage, "DONE.json")) for d in (clean, run))
    y = y.replace(run, clean).replace(world, tiny_world.root)
    assert untimed(json.loads(x)["counts"]) == untimed(json.loads(y)["counts"]), stage
  report = json.loads(fs.read_bytes(fs.join(run, "report", "report.json")))
  assert report["run_dir"] == run
  assert report["plots"]["eval"] == f"{run}/report/eval.png" and fs.exists(report["plots"]["eval"])


def test_sft_resumes_from_gcs_checkpoints_on_another_machine(gcs, model_dir, tmp_path):
  """Checkpoints on gs://, metrics and export local: a run that dies mid-training resumes on a
  machine with an empty local directory from the gs:// checkpoints, with the losses and weights
  of an uninterrupted run."""
  import jax
  import numpy as np
  from flax import nnx

  from persyn_jax import sharding as shd
  from persyn_jax.models import from_pretrained
  from persyn_jax.sft import train
  from test_sft import RESUME, SEQ, _interrupting
  from test_sft_batches import batches
  path, _ = model_dir("llama")
  model, tok = from_pretrained(path, dtype="float32")
  mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), jax.devices()[:1])
  data = batches(tok, 6, 2, SEQ)
  full = train(model, tok, data, RESUME.replace(export=False), out_dir=str(tmp_path / "a"),
               mesh=mesh)
  ckpt = f"{gcs}/sft-{time.time_ns()}/checkpoints"
  with pytest.raises(RuntimeError, match="injected crash"):
    train(model, tok, _interrupting(data, fail_at=6), RESUME, out_dir=str(tmp_path / "machine1"),
          mesh=mesh, checkpoint_dir=ckpt)
  assert not os.path.exists(tmp_path / "machine1" / "checkpoints")  # nothing of them is local
  resumed = train(model, tok, _interrupting(data, fail_at=-1), RESUME,
                  out_dir=str(tmp_path / "machine2"), mesh=mesh, checkpoint_dir=ckpt)
  assert resumed.resumed_from == 2 and sorted(resumed.losses) == [3, 4, 5]
  for s in (3, 4, 5):
    assert resumed.losses[s] == full.losses[s], s
  pa, pb = (jax.tree.leaves(jax.device_get(nnx.state(r.model, nnx.Param))) for r in (full, resumed))
  assert all(np.array_equal(a, b) for a, b in zip(pa, pb))
  assert os.path.exists(tmp_path / "machine2" / "student" / "model.safetensors")
