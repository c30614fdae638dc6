"""Multi-host runs, tested with several CPU processes on this machine.

Each test launches N processes of this file (`python tests/test_multihost.py --process-id i ...`)
that find each other through jax.distributed (coordinator 127.0.0.1:<free port>, gloo collectives
on CPU), each with its own fake CPU devices, so that every model is sharded across processes and
every jitted call is a cross-process collective, as on a TPU pod. The tiny toy world is built once,
before any process starts; the reference is one process with the same total number of devices.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = "probe,score,router,route,generate,sft"
# The tiny toy world's pipeline, cut to what multi-host correctness needs and to few compiles
# (each job compiles everything; the budget is 2 CPU cores): two teachers of one architecture
# (their sampler compiles are shared), one batch shape and length bucket per stage, short answers,
# one router epoch on a frozen backbone, and two SFT steps of 4 packed rows (about a quarter of
# the dataset each: which examples a step sees is decided by the packing, so its loss tells
# whether every host packed the same global batches), 8 records per shard so that each host
# writes several shards.
TEACHERS = ("stepwise-Q", "sloppy-Q")
POLICIES = ("persyn", "random")  # random: both teachers generate
SFT_STEPS = 2
RUN_SETS = ["seeds=[]",
            "sampling.max_new_tokens=16", "sampling.batch_size=4", "sampling.min_bucket=64",
            "sampling.max_prompt_len=64", "scoring.min_bucket=160", "scoring.max_len=160",
            "scoring.max_batch_size=4", "router.epochs=1", "router.min_bucket=64",
            "router.max_len=64", "router.max_batch_size=4", "router.freeze_backbone=true",
            f"sft.max_steps={SFT_STEPS}", "sft.batch_size=4", "sft.seq_len=256",
            "sft.checkpoint_every=1", "sft.log_every=1", "sft.tensorboard=false",
            "sft.progress=false",
            "records_per_shard=8"]


def run_config(run_dir: str):
  """The tiny world (already built: PERSYN_JAX_CACHE) as an explicit config (world: null)."""
  from persyn_jax import config as C
  from persyn_jax.run_config import RunConfig
  from persyn_jax.toyworld.build import build
  from persyn_jax.train import DEFAULT_CONFIG
  w = build("tiny", 0, log=lambda m: None)
  data = C.load_yaml(DEFAULT_CONFIG)
  data.update(world=None, run_dir=run_dir, compare=list(POLICIES),
              teachers=[{"name": n, "path": p, "family": f, "dtype": "float32"}
                        for n, p, f in w.teachers if n in TEACHERS],
              student={"name": w.student[0], "path": w.student[1], "family": w.student[2],
                       "dtype": "float32"},
              prompts={"source": {"path": w.prompts_path, "reference_field": "reference"},
                       "probe": w.probe, "eval": w.eval})
  data["router"] = dict(data["router"], backbone=w.student[1])
  return C.from_dict(RunConfig, C.apply_overrides(data, RUN_SETS))


def world_config(run_dir: str, cache_dir: str):
  """The default config's toy world (`world:` set) at the tiny scale, cached in cache_dir: the
  run builds the world itself when cache_dir has none."""
  from persyn_jax import config as C
  from persyn_jax.run_config import RunConfig
  from persyn_jax.train import DEFAULT_CONFIG
  data = C.load_yaml(DEFAULT_CONFIG)
  data.update(run_dir=run_dir, compare=list(POLICIES))
  data["world"] = dict(data["world"], scale="tiny", cache_dir=cache_dir)
  return C.from_dict(RunConfig, C.apply_overrides(data, RUN_SETS))


TIMEOUT_S = 600


# -- the worker (one process of a multi-process run) ---------------------------------------------

def worker(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--coordinator")
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--run-dir", required=True)
  ap.add_argument("--stages", default=STAGES)
  ap.add_argument("--model", default="", help="first load this HF directory (load_check)")
  ap.add_argument("--orbax", default="", help="and its persyn_jax.convert output")
  ap.add_argument("--world-cache", default="", help="run the toy world config cached here")
  args = ap.parse_args(argv)
  from persyn_jax import distributed as dist
  dist.initialize(args.coordinator if args.num_processes > 1 else None, args.num_processes,
                  args.process_id)
  import jax
  assert jax.process_count() == args.num_processes, (jax.process_count(), args.num_processes)
  if args.model:
    load_check(args)
  if args.stages:
    from persyn_jax import toyworld
    from persyn_jax.stages import Run
    cfg = (world_config(args.run_dir, args.world_cache) if args.world_cache
           else run_config(args.run_dir))
    cfg = toyworld.resolve(cfg, log=lambda m: None)  # as the CLI does
    Run(cfg, log=lambda m: None).run(args.stages.split(","))
  dist.barrier("worker:end")
  return 0


def load_check(args) -> None:
  """Loads one model sharded over every process' devices, from safetensors (recording which
  blocks this process read) and from its orbax conversion; one sharded forward.
  Writes load-<process>.json into the run directory."""
  import jax
  import numpy as np

  from persyn_jax import distributed as dist
  from persyn_jax import models
  from persyn_jax import sharding as shd
  from persyn_jax.models import from_pretrained, hf

  reads = []
  real = hf.read_slice

  depth = [0]

  def counting(src, layout, index, shape):
    # a stacked weight's block is one call, which reads its layers by calling itself: count the
    # outer call (the block a device holds), not the per-layer ones inside it
    depth[0] += 1
    try:
      out = real(src, layout, index, shape)
    finally:
      depth[0] -= 1
    if depth[0] == 0:
      reads.append((tuple(shape), _block(index, shape), out.nbytes))
    return out

  hf.read_slice = counting
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=-1, tensor=1))
  try:
    model, tok = from_pretrained(args.model, dtype="float32", mesh=mesh)
  finally:
    hf.read_slice = real
  held, total = [], 0  # the blocks this process' devices hold
  for x in jax.tree.leaves(_params(model)):
    total += x.size * x.dtype.itemsize
    held += [(tuple(x.shape), _block(sh.index, x.shape), sh.data.nbytes)
             for sh in x.addressable_shards]
  restored, _ = models.from_orbax(args.orbax, dtype="float32", mesh=mesh, tokenizer=False)
  same = all(np.array_equal(dist.to_host(a), dist.to_host(b)) for a, b in
             zip(jax.tree.leaves(_params(model)), jax.tree.leaves(_params(restored))))
  logits = dist.to_host(_forward(model, mesh, tok, PROMPTS))
  out = {"process": jax.process_index(), "devices": jax.local_device_count(),
         "reads": sorted(map(list, reads)), "held": sorted(map(list, held)),
         "read_bytes": sum(r[2] for r in reads), "total_bytes": int(total),
         "orbax_equal": bool(same), "logits": np.asarray(logits, np.float64).tolist()}
  with open(os.path.join(args.run_dir, f"load-{jax.process_index()}.json"), "w") as f:
    json.dump(out, f)


PROMPTS = ["12 + 30 =", "7 * 6 =", "9 - 4 =", "3 + 3 ="]


def _block(index, shape) -> list:
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return [list(s.indices(n)[:2]) for s, n in zip(index, shape)]


def _params(model):
  from flax import nnx
  return nnx.state(model, nnx.Param)


def _forward(model, mesh, tok, prompts):
  """Logits of the left-padded prompts, the batch sharded over the mesh."""
  import jax
  import numpy as np
  from flax import nnx

  from persyn_jax import sharding as shd
  rows = [tok(p)["input_ids"] for p in prompts]
  n = max(map(len, rows))
  ids = np.asarray([[0] * (n - len(r)) + r for r in rows], np.int32)
  mask = np.asarray([[0] * (n - len(r)) + [1] * len(r) for r in rows], np.int32)
  graphdef, state = nnx.split(model)
  put = lambda x: jax.device_put(x, shd.batch_sharding(mesh, x.shape))  # noqa: E731
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    return fn(state, put(ids), put(mask))


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(worker())


# -- the tests -------------------------------------------------------------------------------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """This file run as `num_processes` processes of one jax.distributed job (started at once)."""

  def __init__(self, num_processes: int, devices_each: int, args: list[str], cache: str):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PERSYN_JAX_CACHE=cache,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
               TOKENIZERS_PARALLELISM="false", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    self.procs, self.logs, self.t0 = [], [], time.time()
    for i in range(num_processes):
      log = open(os.path.join(cache, f"worker-{port}-{i}.log"), "w+")
      cmd = [sys.executable, os.path.abspath(__file__), "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", str(num_processes), "--process-id", str(i)] + args
      self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=ROOT))
      self.logs.append(log)

  def wait(self, timeout: float = TIMEOUT_S) -> float:
    """Seconds the job took; when one process fails, the others (which would wait for it at the
    next collective) are killed and the error names every process' last lines."""
    procs, failed = self.procs, []
    try:
      while any(p.poll() is None for p in procs) and not failed:
        failed = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if time.time() - self.t0 > timeout:
          failed = [(i, "timeout") for i, p in enumerate(procs) if p.poll() is None]
        time.sleep(0.2)
      failed = failed or [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    tails, self.output = [], []
    for i, log in enumerate(self.logs):
      log.seek(0)
      self.output.append(log.read())
      tails.append(f"--- process {i} ---\n" + "\n".join(self.output[-1].splitlines()[-30:]))
      log.close()
    if failed:
      raise AssertionError(f"processes {failed} failed:\n" + "\n".join(tails))
    return time.time() - self.t0


@pytest.fixture(scope="module")
def world_cache(tiny_world):
  """The tiny toy world (conftest: built once per test run) so that no worker process builds it."""
  return os.environ["PERSYN_JAX_TEST_WORLDS"]


@pytest.fixture(scope="module")
def orbax_teacher(world_cache, tmp_path_factory):
  """A teacher of the tiny world, converted for the 4-device mesh of the 4-process run."""
  from persyn_jax import convert
  from persyn_jax.toyworld.build import build
  from persyn_jax import sharding as shd
  teachers = build("tiny", 0, world_cache, log=lambda m: None).teachers
  path = {n: p for n, p, _ in teachers}[TEACHERS[0]]
  out = str(tmp_path_factory.mktemp("orbax") / TEACHERS[0])
  convert.convert(path, out, shd.MeshConfig(1, 4, 1))
  return path, out


# The stages each split of the 4-device mesh runs: 2 x 2 the whole pipeline; 4 x 1 the sampler
# and scoring (the stages whose records are split over the hosts), to keep the 9 processes of the
# four jobs within what 2 CPU cores finish in a few minutes.
SPLIT_STAGES = {2: STAGES, 4: "probe,score"}


@pytest.fixture(scope="module")
def runs(world_cache, orbax_teacher, tmp_path_factory):
  """The tiny pipeline (probe -> score -> router -> route -> generate -> SFT) run at the same time
  by one process with 4 devices (the reference) and 2 processes with 2 devices each; its probe and
  score stages by 4 processes with one device each: the same 4-device mesh, split over 1, 2 and 4
  processes. The 4-process job first loads a teacher from safetensors and from its orbax
  conversion (load_check)."""
  dirs = {n: str(tmp_path_factory.mktemp(f"run{n}")) for n in (1, 2, 4)}
  hf_dir, orbax_dir = orbax_teacher
  fresh = str(tmp_path_factory.mktemp("fresh_cache"))
  dirs["world"] = (str(tmp_path_factory.mktemp("run_world")), fresh)
  jobs = [Job(1, 4, ["--run-dir", dirs[1]], world_cache),
          Job(2, 2, ["--run-dir", dirs[2], "--stages", SPLIT_STAGES[2]], world_cache),
          Job(4, 1, ["--run-dir", dirs[4], "--stages", SPLIT_STAGES[4], "--model", hf_dir,
                     "--orbax", orbax_dir], world_cache),
          Job(2, 1, ["--run-dir", dirs["world"][0], "--world-cache", fresh, "--stages", "probe"],
              world_cache)]
  seconds = [job.wait() for job in jobs]
  print("1 x 4, 2 x 2 and 4 x 1 processes x devices, and the world build job, at once: "
        + ", ".join(f"{t:.1f} s" for t in seconds))
  dirs["world_output"] = jobs[-1].output
  return dirs


def records(run_dir: str, stage_dir: str, stage: str) -> list[dict]:
  from persyn_jax.data import shards
  return list(shards.read_records(os.path.join(run_dir, stage_dir), stage))


def summary(run_dir: str, stages: str = STAGES) -> dict:
  """What a run produced that must not depend on how many processes ran it (records in the order
  a reader sees them: shards in (host, index) order), for the stages it ran."""
  out = {}
  out["probe"] = [(r["id"], r["teacher"], r["sample"], r["response"])
                  for t in TEACHERS for r in records(run_dir, "probe", f"probe-{t}")]
  out["scores"] = {(r["id"], r["teacher"]): r["scores"] for r in records(run_dir, "score", "score")}
  if stages == "probe,score":
    return out
  routes = records(run_dir, "route", "route")
  out["routes"] = [(r["id"], r["route"]["teacher"]) for r in routes]
  out["route_scores"] = {r["id"]: [r["route"]["scores"][t] for t in TEACHERS] for r in routes}
  out["data"] = {p: [(r["id"], r["teacher"], r["response"])
                     for r in records(run_dir, os.path.join("data", p), "data")] for p in POLICIES}
  out["loss"] = {p: losses(os.path.join(run_dir, "sft", p, "metrics.jsonl")) for p in POLICIES}
  return out


def losses(path: str) -> list[float]:
  rows = [json.loads(line) for line in open(path)]
  return [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if "loss" in r]


def assert_close(got: dict, want: dict, rel: float) -> None:
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-6, nan_ok=True), k


@pytest.mark.parametrize("n", [2, 4])
def test_several_processes_run_the_pipeline_like_one(runs, n):
  """probe -> score -> router -> route -> generate -> 2 SFT steps on n processes: the same
  generations, scores, router scores, routes, datasets (in the same order) and losses as one
  process (4 processes: probe and score). Float results agree to float32 rounding (cross-process
  sums run in another order)."""
  ref, got = summary(runs[1]), summary(runs[n], SPLIT_STAGES[n])
  assert got["probe"] == ref["probe"] and len(ref["probe"]) == 2 * 16
  assert_close(got["scores"], ref["scores"], rel=1e-4)
  assert len(got["scores"]) == len(ref["scores"]) == 2 * 16
  if SPLIT_STAGES[n] != STAGES:
    return
  assert_close(got["route_scores"], ref["route_scores"], rel=1e-3)
  assert got["routes"] == ref["routes"] and len(ref["routes"]) == 32
  for p in POLICIES:
    assert got["data"][p] == ref["data"][p], p
  assert len({t for _, t, _ in ref["data"]["random"]}) == 2  # both teachers generated
  for p in POLICIES:
    assert len(ref["loss"][p]) == SFT_STEPS
    # the steps saw the same packed rows; only the order of float sums differs
    assert got["loss"][p] == pytest.approx(ref["loss"][p], rel=1e-5), p


def test_the_sft_steps_see_only_part_of_the_data(runs):
  """The loss check above is only as strong as the packing is decisive: each step's global batch
  holds a fraction of the dataset, so hosts packing on their own would change the losses."""
  from persyn_jax.data.batches import sft_batches
  from persyn_jax.models import load_tokenizer
  from persyn_jax.toyworld.build import build
  c = run_config(runs[1]).sft
  tok = load_tokenizer(build("tiny", 0, log=lambda m: None).student[1])
  it = sft_batches(os.path.join(runs[1], "data", "persyn"), tok, seq_len=c.seq_len,
                   batch_size=c.batch_size, seed=c.seed, stage="data")
  per_batch = [sum(len(set(row[row > 0].tolist())) for row in b["segment_ids"]) for b in it]
  assert it.stats["examples"] == sum(per_batch) == 48
  assert len(per_batch) >= 3 and max(per_batch) <= 20, per_batch


@pytest.mark.parametrize("n", [2, 4])
def test_each_host_writes_its_own_shards(runs, n):
  """Every stage's shards come from every host (`<stage>-<host>-<k>-of-<count>`, host 0..n-1),
  each host holding a contiguous part of the records (4 processes: probe and score), and the
  manifest lists them all; every process wrote its part of the orbax checkpoint."""
  from persyn_jax.data import shards
  run, whole = runs[n], SPLIT_STAGES[n] == STAGES
  stages = [("probe", f"probe-{t}") for t in TEACHERS] + [("score", "score")]
  if whole:
    stages += [("route", "route")] + [(os.path.join("data", p), "data") for p in POLICIES]
    stages += [("generate", f"gen-{t}") for t in TEACHERS]
  for d, stage in stages:
    names = shards.list_shards(os.path.join(run, d), stage)
    hosts = sorted({shards.parse_name(stage, x)[0] for x in names})
    assert hosts == list(range(n)), (d, stage, names)
    manifest = shards.read_manifest(os.path.join(run, d), stage)
    assert [s["file"] for s in manifest["shards"]] == names
    assert sum(s["records"] for s in manifest["shards"]) == manifest["records"] > 0
  for h in range(n):  # the sampler's per-host plans: host h sampled for its part of the prompts
    plan = json.load(open(os.path.join(run, "probe", f"probe-{TEACHERS[0]}-{h}.plan.json")))
    assert plan["hosts"] == n
  if not whole:
    return
  state = os.path.join(run, "sft", "persyn", "checkpoints", str(SFT_STEPS), "state")
  assert sorted(d for d in os.listdir(state) if d.startswith("ocdbt.process_")) == \
      [f"ocdbt.process_{i}" for i in range(n)]


@pytest.mark.parametrize("n", [2])
def test_the_exported_student_equals_the_one_process_run(runs, n):
  """The student exported after SFT (parameters gathered from every process, written once) holds
  the one-process run's weights, to float32 rounding."""
  from flax import nnx

  from persyn_jax.models import from_pretrained
  for p in POLICIES:
    want, got = (nnx.to_flat_state(nnx.state(from_pretrained(
        os.path.join(runs[k], "sft", p, "student"), dtype="float32", tokenizer=False)[0],
        nnx.Param)) for k in (1, n))
    assert [k for k, _ in got] == [k for k, _ in want]
    for (k, a), (_, b) in zip(got, want):  # bf16 export: one rounding step apart at most
      a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
      np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * float(np.abs(b).max()),
                                 err_msg=str(k))


def test_a_multi_process_run_builds_the_toy_world_once(runs):
  """The default config's `world:` on 2 processes with an empty cache: one process builds the
  world (in a one-process subprocess, holding the lock), the other waits and loads it, and the
  probe runs. The world is the one a one-process build makes (its checkpoints' sha256)."""
  from persyn_jax.toyworld.build import build, cache_root
  run_dir, cache = runs["world"]
  built = [out.count("[toyworld] building the tiny world") for out in runs["world_output"]]
  assert sorted(built) == [0, 1], built
  assert len(glob.glob(os.path.join(cache_root(cache), "*", "world.json"))) == 1
  world = build("tiny", 0, cache, log=lambda m: None)
  # the reference: the same world built by a plain one-process run (one CPU device, no forced
  # device count) in a cache of its own
  ref_cache = os.path.join(os.path.dirname(run_dir), "reference-world")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run([sys.executable, "-c", "import sys; from persyn_jax.toyworld.build import build; "
                  "build('tiny', 0, sys.argv[1], log=lambda m: None)", ref_cache],
                 env=dict(env, JAX_PLATFORMS="cpu", PERSYN_JAX_DISTRIBUTED="0"), check=True)
  ref = build("tiny", 0, ref_cache, log=lambda m: None)
  assert world.info["hashes"] == ref.info["hashes"]
  from persyn_jax.data import shards
  for name, _, _ in world.teachers:
    assert shards.read_manifest(os.path.join(run_dir, "probe"), f"probe-{name}")["records"] == 16


def test_four_processes_load_only_their_slices(runs, orbax_teacher):
  """4 processes x 1 device: each reads from safetensors exactly the blocks its device holds (a
  quarter of every sharded weight), restores the same weights from orbax, and computes the same
  logits as one process."""
  import jax

  from persyn_jax import sharding as shd
  from persyn_jax.models import from_pretrained
  hf_dir, _ = orbax_teacher
  loads = [json.load(open(os.path.join(runs[4], f"load-{i}.json"))) for i in range(4)]
  for r in loads:
    assert r["reads"] and [x[:2] for x in r["reads"]] == [x[:2] for x in r["held"]]
    assert r["read_bytes"] < 0.5 * r["total_bytes"]  # only the replicated norms are read whole
    assert r["orbax_equal"]
  blocks = [{json.dumps(x[:2]) for x in r["reads"]} for r in loads]
  assert all(a != b for i, a in enumerate(blocks) for b in blocks[i + 1:])  # 4 different quarters
  mesh = shd.make_mesh(shd.MeshConfig(1, 4, 1), jax.devices()[:4])
  model, tok = from_pretrained(hf_dir, dtype="float32", mesh=mesh)
  want = np.asarray(_forward(model, mesh, tok, PROMPTS))
  for r in loads:
    np.testing.assert_allclose(np.asarray(r["logits"]), want, rtol=1e-5, atol=1e-5)
