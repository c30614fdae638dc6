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
# The tiny toy world's pipeline, cut to what multi-host correctness needs and to few compiles: two
# teachers of one architecture (their sampler compiles are shared), one length bucket per stage,
# short answers, one router epoch, and one SFT step whose global batch holds the whole dataset
# (16 rows x 512 tokens for 48 examples of ~80 tokens), so that the step sees the same examples
# whatever the number of hosts (each host packs only its own slice of the records).
TEACHERS = ("stepwise-Q", "sloppy-Q")
POLICIES = ("persyn", "random")  # random: both teachers generate
RUN_SETS = ["sampling.max_new_tokens=16", "sampling.batch_size=16", "sampling.min_bucket=64",
            "sampling.max_prompt_len=64", "scoring.min_bucket=160", "scoring.max_len=160",
            "router.epochs=1", "router.min_bucket=64", "router.max_len=64",
            "sft.max_steps=1", "sft.batch_size=16", "sft.seq_len=512", "sft.checkpoint_every=1",
            "sft.tensorboard=false", "sft.progress=false", "records_per_shard=32"]


def run_config(run_dir: str):
  """The tiny world (already built: PERSYN_JAX_CACHE) as an explicit config (world: null)."""
  from persyn_jax import config as C
  from persyn_jax import toyworld
  from persyn_jax.run_config import RunConfig
  from persyn_jax.train import DEFAULT_CONFIG
  w = toyworld.build("tiny", 0, log=lambda m: None)
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


TIMEOUT_S = 300


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
  args = ap.parse_args(argv)
  from persyn_jax import distributed as dist
  dist.initialize(args.coordinator if args.num_processes > 1 else None, args.num_processes,
                  args.process_id)
  import jax
  assert jax.process_count() == args.num_processes, (jax.process_count(), args.num_processes)
  if args.model:
    load_check(args)
  if args.stages:
    from persyn_jax.pipeline import Run
    Run(run_config(args.run_dir), log=lambda m: None).run(args.stages.split(","))
  dist.barrier("worker:end")
  return 0


def load_check(args) -> None:
  """Loads one model sharded over every process' devices, from safetensors (recording which
  blocks this process read) and from its orbax conversion; one sharded forward and a short greedy
  generation. Writes load-<process>.json into the run directory."""
  import jax
  import numpy as np

  from persyn_jax import convert
  from persyn_jax import distributed as dist
  from persyn_jax import sharding as shd
  from persyn_jax.models import from_pretrained, hf
  from persyn_jax.sampler import SamplingConfig, generate

  reads = []
  real = hf.read_slice

  def counting(src, layout, index, shape):
    out = real(src, layout, index, shape)
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
  restored, _ = convert.from_orbax(args.orbax, dtype="float32", mesh=mesh, tokenizer=False)
  same = all(np.array_equal(dist.to_host(a), dist.to_host(b)) for a, b in
             zip(jax.tree.leaves(_params(model)), jax.tree.leaves(_params(restored))))
  logits = dist.to_host(_forward(model, mesh, tok, PROMPTS))
  results = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0.0,
                                                         batch_size=4), mesh=mesh)
  out = {"process": jax.process_index(), "devices": jax.local_device_count(),
         "reads": sorted(map(list, reads)), "held": sorted(map(list, held)),
         "read_bytes": sum(r[2] for r in reads), "total_bytes": int(total),
         "orbax_equal": bool(same), "logits": np.asarray(logits, np.float64).tolist(),
         "texts": [r.text for r in results]}
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

import pytest  # noqa: E402


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(num_processes: int, devices_each: int, args: list[str], cache: str,
           timeout: float = TIMEOUT_S) -> float:
  """Runs this file as `num_processes` processes of one jax.distributed job; returns seconds.
  When one fails, the others (waiting for it at a collective) are killed."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PERSYN_JAX_CACHE=cache,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
             TOKENIZERS_PARALLELISM="false", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  port = free_port()
  procs, logs = [], []
  t0 = time.time()
  for i in range(num_processes):
    log = open(os.path.join(cache, f"worker-{port}-{i}.log"), "w+")
    cmd = [sys.executable, os.path.abspath(__file__), "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", str(num_processes), "--process-id", str(i)] + args
    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    logs.append(log)
  failed = []
  try:
    while any(p.poll() is None for p in procs) and not failed:
      failed = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if time.time() - t0 > timeout:
        failed = [(i, "timeout") for i, p in enumerate(procs) if p.poll() is None]
      time.sleep(0.2)
    failed = failed or [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  tails = []
  for i, log in enumerate(logs):
    log.seek(0)
    tails.append(f"--- process {i} ---\n" + "".join(log.readlines()[-30:]))
    log.close()
  if failed:
    raise AssertionError(f"processes {failed} failed:\n" + "\n".join(tails))
  return time.time() - t0


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory):
  """The tiny toy world, built once here so that no worker process builds it."""
  from persyn_jax import toyworld
  cache = str(tmp_path_factory.mktemp("multihost_cache"))
  toyworld.build("tiny", 0, cache, log=lambda m: None)
  return cache


def summary(run_dir: str) -> dict:
  """What a run produced that must not depend on how many processes ran it."""
  from persyn_jax.data import shards
  out = {}
  routes = list(shards.read_records(os.path.join(run_dir, "route"), "route"))
  out["routes"] = {r["id"]: r["route"]["teacher"] for r in routes}
  out["route_scores"] = {r["id"]: [r["route"]["scores"][t] for t in TEACHERS] for r in routes}
  out["probe"] = sorted((r["id"], r["teacher"], r["sample"], r["response"])
                        for t in TEACHERS
                        for r in shards.read_records(os.path.join(run_dir, "probe"), f"probe-{t}"))
  out["scores"] = {(r["id"], r["teacher"]): r["scores"] for r in
                   shards.read_records(os.path.join(run_dir, "score"), "score")}
  out["data"] = {p: sorted((r["id"], r["teacher"], r["response"]) for r in
                           shards.read_records(os.path.join(run_dir, "data", p), "data"))
                 for p in POLICIES}
  out["loss"] = {p: json.load(open(os.path.join(run_dir, "sft", p, "DONE.json")))["final_loss"]
                 for p in POLICIES}
  return out


@pytest.fixture(scope="module")
def reference(world_cache, tmp_path_factory):
  """The single-process run: one process with 4 devices (the mesh of both multi-process runs)."""
  run_dir = str(tmp_path_factory.mktemp("run1"))
  seconds = launch(1, 4, ["--run-dir", run_dir], world_cache)
  print(f"1 process x 4 devices: {seconds:.1f} s")
  return run_dir, summary(run_dir)


def assert_close(got: dict, want: dict, rel: float) -> None:
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-6, nan_ok=True), k


def test_two_processes_run_the_pipeline_like_one(world_cache, reference, tmp_path):
  """probe -> score -> router -> route -> generate -> one SFT step, 2 processes x 2 devices: the
  same generations, scores, router coefficients, routes, datasets and loss as one process. Float
  results agree to float32 rounding (the cross-process sums run in another order)."""
  _, ref = reference
  seconds = launch(2, 2, ["--run-dir", str(tmp_path)], world_cache)
  print(f"2 processes x 2 devices: {seconds:.1f} s")
  got = summary(str(tmp_path))
  assert got["probe"] == ref["probe"] and len(ref["probe"]) == 2 * 16
  assert_close(got["scores"], ref["scores"], rel=1e-4)
  assert_close(got["route_scores"], ref["route_scores"], rel=1e-3)
  assert got["routes"] == ref["routes"] and len(ref["routes"]) == 32
  for p in POLICIES:
    assert got["data"][p] == ref["data"][p], p
  assert len({t for _, t, _ in ref["data"]["random"]}) == 2  # both teachers generated
  # the one step saw the same 48 examples; only the order of float sums differs
  assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
  # only process 0 wrote shards (host 0 in every name); both wrote the orbax checkpoint; the
  # student was exported once from the gathered parameters
  names = [os.path.basename(p) for p in glob.glob(str(tmp_path / "**" / "*.array_record"),
                                                  recursive=True)]
  assert names and all(n.rsplit("-", 4)[1] == "0" for n in names), names
  ckpt = tmp_path / "sft" / "persyn" / "checkpoints" / "1"
  assert ckpt.is_dir() and (ckpt / "state").is_dir()
  from persyn_jax.models import from_pretrained
  student, _ = from_pretrained(str(tmp_path / "sft" / "persyn" / "student"), dtype="float32",
                               tokenizer=False)
  assert student.config.num_layers >= 1


@pytest.fixture(scope="module")
def orbax_teacher(world_cache, tmp_path_factory):
  """A teacher of the tiny world, converted for the 4-device mesh of the 4-process run."""
  from persyn_jax import convert, toyworld
  from persyn_jax import sharding as shd
  path = dict((n, p) for n, p, _ in toyworld.build("tiny", 0, world_cache, log=lambda m: None).teachers)[
      TEACHERS[0]]
  out = str(tmp_path_factory.mktemp("orbax") / TEACHERS[0])
  convert.convert(path, out, shd.MeshConfig(1, 4, 1))
  return path, out


def test_four_processes_load_their_slices_sample_and_train_like_one(
    world_cache, reference, orbax_teacher, tmp_path):
  """4 processes x 1 device: each reads from safetensors exactly the blocks its device holds (a
  quarter of every sharded weight), restores the same weights from orbax, gets the same logits
  and greedy answers as one process, and the SFT stage, resumed on the reference run's data,
  takes the same first step."""
  import shutil

  import numpy as np
  ref_dir, ref = reference
  hf_dir, orbax_dir = orbax_teacher
  run = tmp_path / "run"
  shutil.copytree(ref_dir, run, ignore=shutil.ignore_patterns("sft"))
  seconds = launch(4, 1, ["--run-dir", str(run), "--stages", "sft", "--model", hf_dir,
                          "--orbax", orbax_dir], world_cache)
  print(f"4 processes x 1 device: {seconds:.1f} s")
  loads = [json.load(open(run / f"load-{i}.json")) for i in range(4)]
  for r in loads:
    assert r["reads"] and [x[:2] for x in r["reads"]] == [x[:2] for x in r["held"]]
    assert r["read_bytes"] < 0.5 * r["total_bytes"]  # only replicated norms are read whole
    assert r["orbax_equal"]
  blocks = {tuple(map(tuple, x[1])) for r in loads for x in r["reads"]}
  assert len(blocks) > len(loads[0]["reads"])  # the processes read different blocks

  # the same forward and greedy answers as one process on 4 devices
  import jax

  from persyn_jax import sharding as shd
  from persyn_jax.models import from_pretrained
  from persyn_jax.sampler import SamplingConfig, generate
  mesh = shd.make_mesh(shd.MeshConfig(1, 4, 1), jax.devices()[:4])
  model, tok = from_pretrained(hf_dir, dtype="float32", mesh=mesh)
  want = np.asarray(_forward(model, mesh, tok, PROMPTS))
  texts = [r.text for r in generate(model, tok, PROMPTS, SamplingConfig(
      max_new_tokens=8, temperature=0.0, batch_size=4), mesh=mesh)]
  for r in loads:
    np.testing.assert_allclose(np.asarray(r["logits"]), want, rtol=1e-5, atol=1e-5)
    assert r["texts"] == texts
  loss = {p: json.load(open(run / "sft" / p / "DONE.json"))["final_loss"] for p in POLICIES}
  assert loss == pytest.approx(ref["loss"], rel=1e-5)
