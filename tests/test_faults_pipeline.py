"""Kill the pipeline with SIGKILL at seeded points across probe, score, generate and sft, and fail
its writes like a full disk; after resuming, the run equals a clean run of the same config file
by file: the same records, no duplicate, no gap, the same manifests, the same SFT losses.

One clean reference run and one chain of launches on the tiny toy world. Each launch of the chain
resumes what the previous one left and is itself killed (or made to fail a write) at the next
point of a seeded plan; the last launch is a plain `python -m persyn_jax.train` to the end. The
chain's launches are forked from a warm process (tests/faults.py: Launcher) so that 25 launches
cost seconds each rather than a Python + JAX + transformers start-up each.
"""
import collections
import glob
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

import faults  # tests/faults.py
from persyn_jax.data import shards

SEED = 1234
MIN_KILLS = 20
STAGE_ORDER = ("probe", "score", "router", "route", "generate", "sft")
STAGES_TO_SFT = ",".join(STAGE_ORDER)
# The tiny toy world with shards of 4 records (many commit points); PerSyn and the oracle (every
# teacher answers every prompt, so the generate stage's size does not hang on the routing); a
# checkpoint every SFT step; one prompt bucket (one compile per teacher).
SETS = ["world.scale=tiny", "seeds=[]", "records_per_shard=4", "compare=[persyn,oracle]",
        "sampling.max_new_tokens=32", "sampling.min_bucket=64", "sft.epochs=4", "sft.checkpoint_every=1",
        "sft.keep_checkpoints=1", "sft.log_every=1"]


def run_args(run_dir: str, stages: str) -> list[str]:
  args = ["--run-dir", run_dir, "--stages", stages]
  for s in SETS:
    args += ["--set", s]
  return args


def stage_at(run_dir: str) -> str | None:
  """The stage a run is in: the first without its DONE.json (None when all are done)."""
  for s in STAGE_ORDER:
    if not os.path.exists(os.path.join(run_dir, s, "DONE.json")):
      return s
  return None


@pytest.fixture(scope="module")
def fault_world(request, tmp_path_factory):
  """The cache directory (PERSYN_JAX_CACHE: the toy world, and the XLA compilation cache) of this
  module's runs: $PERSYN_JAX_TEST_WORLD if set (kept across sessions), else the one holding the
  session's shared `tiny_world` (conftest.py), else a fresh directory (the clean run then builds
  the world, about a minute on 2 cores)."""
  cache = os.environ.get("PERSYN_JAX_TEST_WORLD")
  if not cache:
    try:
      world = request.getfixturevalue("tiny_world")
      cache = os.path.dirname(os.path.dirname(world.root))  # <cache>/toyworld/<key>
    except pytest.FixtureLookupError:
      cache = str(tmp_path_factory.mktemp("fault_cache"))
  os.makedirs(cache, exist_ok=True)
  return cache


def world_env(cache: str) -> dict:
  env = dict(os.environ, PERSYN_JAX_CACHE=cache, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("PERSYN_JAX_XLA_CACHE", None)
  return env


def kill_plan(seed: int) -> list[dict]:
  """The seeded plan, one entry per launch: where to kill it ("watch": the k-th new file matching
  a pattern appears, then a random delay; "kill_at": inside the process, at the n-th rename of a
  path of the stage, just before or after it) or which write to fail. A launch runs the stages up
  to its entry's stage only, so a kill that comes too late never skips a later stage's points."""
  rng = random.Random(seed)
  delay = lambda: round(rng.uniform(0.0, 0.25), 3)  # noqa: E731

  def watch(stage, patterns, k, d=None):
    return {"stage": stage, "watch": patterns, "k": k, "delay": delay() if d is None else d}

  def replace(stage, where, hi):
    return {"stage": stage, "faults": {"kill_at": {
        "target": "os.replace", "n": rng.randint(1, hi), "match": f"/{where}/",
        "when": rng.choice(["before", "after"])}}}

  def kill(stage, target, match):
    return {"stage": stage, "faults": {"kill_at": {"target": target, "n": 1, "match": match,
                                                   "when": "before"}}}

  probe_shard, gen_shard = ["probe/probe-*.array_record"], ["generate/gen-*.array_record"]
  data_shard, ckpt = ["data/*/data-*.array_record"], ["sft/*/checkpoints/*"]
  return [
      # a disk that is full for shard-sized files: the first probe shard cannot be written
      {"stage": "probe", "write_fault": "disk_full"},
      watch("probe", probe_shard, rng.randint(1, 2)),
      replace("probe", "probe", 4),
      watch("probe", ["probe/*.stats.json"], rng.randint(1, 2)),
      # while a teacher's shard manifest is put in place
      kill("probe", "os.replace", ".manifest.json"),
      watch("probe", probe_shard, rng.randint(1, 2)),
      watch("probe", ["probe/*.manifest.json"], 1),
      # score writes its shards in one burst at the end: exact points rather than delays
      replace("score", "score", 8),
      watch("score", ["score/score-*.array_record"], rng.randint(1, 3), 0.0),
      replace("score", "score", 8),
      # an fsync that fails with ENOSPC while a generation shard is committed
      {"stage": "generate", "write_fault": "fsync", "n": rng.randint(1, 3)},
      watch("generate", gen_shard, rng.randint(1, 2)),
      replace("generate", "generate", 4),
      watch("generate", gen_shard, rng.randint(1, 2)),
      watch("generate", data_shard, rng.randint(1, 3), 0.0),
      replace("generate", "data", 6),
      # while the stage's DONE.json manifest is put in place
      kill("generate", "os.replace", "/generate/DONE.json"),
      watch("sft", ckpt, 1),
      # during an orbax async save: its temp dir is there and its files are being written
      watch("sft", ["sft/*/checkpoints/*.orbax-checkpoint-tmp*"], 1, 0.0),
      # checkpoint files too large for the disk: the save fails, the last good one stays
      {"stage": "sft", "write_fault": "disk_full_sft"},
      watch("sft", ["sft/*/tb/*"], 1),
      watch("sft", ckpt, 2),
      watch("sft", ["sft/*/student*"], 1, 0.0),
      # as the async save commits (the background thread renames its temp dir into place)
      kill("sft", "os.rename", ".orbax-checkpoint-tmp"),
      watch("sft", ckpt, 1),
      watch("sft", ["sft/*/DONE.json"], 1),
  ]


def complete_steps(ckpt_dir: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []


def sft_bar_start(log_text: str, policy: str) -> int | None:
  """The step at which `policy`'s SFT progress bar started in a launch's log (tqdm's initial
  count), None if it did not train in that launch."""
  text = log_text.replace("\r", "\n")
  m = re.search(rf"^\[sft\] {re.escape(policy)}: \d+ batches per epoch$", text, re.M)
  if m is None:
    return None
  rest = text[m.end():]
  nxt = re.search(r"^\[", rest, re.M)
  bar = re.search(r"^sft:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", rest[:nxt.start() if nxt else None], re.M)
  return int(bar.group(1)) if bar else None


def tail(path: str, n: int = 3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-n:]


# -- comparison -----------------------------------------------------------------------------------

COMPARED = ("*.array_record", "*.manifest.json", "*.meta.json", "*.stats.json", "*.plan.json",
            "assignments.json", "model.safetensors", "config.json", "metrics.jsonl")


def compared_files(run: str) -> dict[str, str]:
  out = {}
  for pat in COMPARED:
    for path in glob.glob(os.path.join(run, "**", pat), recursive=True):
      rel = os.path.relpath(path, run)
      if rel == "config.json" or "/checkpoints/" in rel or rel.startswith("router/checkpoint"):
        continue  # the run's config names its directory; orbax files have random names
      out[rel] = path
  return out


def strip_volatile(x, run: str):
  if isinstance(x, dict):
    return {k: strip_volatile(v, run) for k, v in x.items() if k not in ("seconds", "finished")}
  if isinstance(x, list):
    return [strip_volatile(v, run) for v in x]
  if isinstance(x, str):
    return x.replace(run, "<run>")
  return x


def losses(path: str) -> dict[int, float]:
  rows = [json.loads(line) for line in open(path)]
  steps = [r["step"] for r in rows if r.get("split") == "train"]
  assert len(steps) == len(set(steps)), f"{path}: a step logged twice: {steps}"
  return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def assert_same_run(clean: str, resumed: str) -> dict:
  """Asserts that `resumed` equals `clean` file by file and record by record; returns the counts
  compared (files, records) and found (records lost, duplicated)."""
  counts = {"files_compared": 0, "records_compared": 0, "lost": 0, "duplicated": 0}
  a, b = compared_files(clean), compared_files(resumed)
  assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
  counts["files_compared"] = len(a)
  for man in sorted(glob.glob(os.path.join(clean, "**", "*.manifest.json"), recursive=True)):
    d, stage = os.path.dirname(man), os.path.basename(man)[:-len(".manifest.json")]
    key = lambda r: (r["id"], r.get("teacher"), r.get("sample"), r.get("policy"))  # noqa: E731
    ka = collections.Counter(key(r) for r in shards.read_records(d, stage))
    kb = collections.Counter(key(r) for r in shards.read_records(d.replace(clean, resumed, 1), stage))
    counts["records_compared"] += sum(ka.values())
    counts["lost"] += sum((ka - kb).values())
    counts["duplicated"] += sum(c - 1 for c in kb.values() if c > 1)
  for rel in a:
    if rel.endswith("metrics.jsonl"):
      # timings differ; the loss of every step must not
      assert losses(a[rel]) == losses(b[rel]), rel
      continue
    assert open(a[rel], "rb").read() == open(b[rel], "rb").read(), f"{rel} differs from the clean run"
  # every stage's records: same ids and contents, nothing twice, nothing missing
  for man in sorted(glob.glob(os.path.join(clean, "**", "*.manifest.json"), recursive=True)):
    d, stage = os.path.dirname(man), os.path.basename(man)[:-len(".manifest.json")]
    ra = list(shards.read_records(d, stage))
    rb = list(shards.read_records(d.replace(clean, resumed, 1), stage))
    keys = [(r["id"], r.get("teacher"), r.get("sample"), r.get("policy")) for r in rb]
    assert len(keys) == len(set(keys)), f"{stage}: duplicated records"
    assert ra == rb, f"{os.path.relpath(d, clean)}/{stage}: records differ"
  for done in glob.glob(os.path.join(clean, "**", "DONE.json"), recursive=True):
    other = done.replace(clean, resumed, 1)
    x, y = strip_volatile(json.load(open(done)), clean), strip_volatile(json.load(open(other)), resumed)
    if os.path.relpath(done, clean) == os.path.join("sft", "DONE.json"):
      for pol, summary in y["counts"].items():  # stages/sft.py: final_loss, docs/FAILURES.md
        assert summary["final_loss"] is not None, (
            f"sft/DONE.json: {pol} resumed after its last step reports final_loss None")
    assert x == y, os.path.relpath(done, clean)
  for policy_dir in glob.glob(os.path.join(clean, "sft", "*", "checkpoints")):
    other = policy_dir.replace(clean, resumed, 1)
    assert complete_steps(policy_dir)[-1:] == complete_steps(other)[-1:]
  return counts


# -- the test -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_and_resumed_run_equals_a_clean_run(fault_world, tmp_path):
  env = world_env(fault_world)
  clean, run = str(tmp_path / "clean"), str(tmp_path / "killed")
  logs = tmp_path / "logs"
  logs.mkdir()
  with faults.Launcher(env) as la:
    pid = la.start("persyn_jax.train", run_args(clean, STAGES_TO_SFT), log=str(logs / "clean.log"))
    t0 = time.time()
    assert la.wait(pid) == 0, tail(str(logs / "clean.log"))
    print(f"\nclean run: {time.time() - t0:.1f} s")
    shard_bytes = min(os.path.getsize(p) for p in glob.glob(os.path.join(clean, "probe", "*.array_record")))

    kills, late, faults_seen, resumes, timings = [], [], [], [], []
    for i, step in enumerate(kill_plan(SEED)):
      log = str(logs / f"launch-{i:02d}.log")
      spec = dict(step.get("faults") or {})
      wf = step.get("write_fault")
      if wf == "disk_full":  # files of a shard's size cannot be written
        spec["limit_file_size"] = shard_bytes // 2
      elif wf == "disk_full_sft":  # checkpoint and weight files larger than 16 KiB cannot
        spec["limit_file_size"] = 16 << 10
      elif wf == "fsync":
        spec["fail_at"] = {"target": "os.fsync", "n": step["n"], "match": "/generate/gen-"}
      ckpt_before = {p: complete_steps(os.path.join(p, "checkpoints"))
                     for p in glob.glob(os.path.join(run, "sft", "*"))}
      stages = ",".join(STAGE_ORDER[:STAGE_ORDER.index(step["stage"]) + 1])
      t0 = time.time()
      pid = la.start("persyn_jax.train", run_args(run, stages), log=log, faults=spec)
      trigger = None
      if "watch" in step:
        trigger = faults.watch_and_kill(pid, run, step["watch"], step["k"], delay=step["delay"])
      rc = la.wait(pid)
      where = stage_at(run)
      timings.append(round(time.time() - t0, 1))
      # a policy whose SFT was under way resumes from its newest complete checkpoint
      for pdir, before in ckpt_before.items():
        pol = os.path.basename(pdir)
        start = sft_bar_start(open(log, errors="replace").read(), pol)
        if start is not None and before:
          resumes.append((pol, before[-1], start))
          assert start == before[-1], (i, pol, before, start, tail(log))
      if wf:
        assert rc == 1, (i, step, rc, tail(log))
        # the CLI's handler: the error's traceback, and a line saying what the run was doing
        # (orbax's background thread may still print after it: found by content, not position)
        lines = open(log, errors="replace").read().strip().splitlines()
        assert any(x.startswith(f"persyn_jax.train failed while running: run_dir {run}, stage ")
                   for x in lines), tail(log)
        last = [x for x in lines if "File too large" in x or "No space left on device" in x][-1:]
        last = last[0] if last else lines[-1]
        faults_seen.append((wf, where, last))
        if wf == "fsync":
          assert re.search(r"No space left on device: '.*/generate/", last), last
        else:
          assert "File too large" in last and run in last, last
        continue
      if rc == -9 and where == step["stage"]:
        kills.append((step["stage"], trigger or step.get("faults")))
      elif rc == -9:  # killed after its stage had finished: resumed all the same, not counted
        late.append((i, step["stage"], where))
      else:
        assert rc == 0, (i, step, rc, tail(log))
        late.append((i, step["stage"], "not killed"))
    # the last launch: the real command line, to the end
    final = subprocess.run([sys.executable, "-m", "persyn_jax.train"] + run_args(run, STAGES_TO_SFT),
                           env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]

  by_stage = {s: sum(1 for k in kills if k[0] == s) for s in ("probe", "score", "generate", "sft")}
  print(f"\n{len(kills)} kills {by_stage}, late or missed {late}, write faults "
        f"{[(w, s) for w, s, _ in faults_seen]}, SFT resumes (policy, checkpoint, started at) "
        f"{resumes}, launch seconds {timings}")
  assert len(kills) >= MIN_KILLS, kills
  assert all(by_stage[s] >= 2 for s in by_stage), by_stage
  assert len(faults_seen) == 3
  assert resumes, "no launch resumed an SFT run from a checkpoint"
  compared = assert_same_run(clean, run)
  # the figures of docs/FAILURES.md: $PERSYN_JAX_FAULT_REPORT, or next to the test's runs
  report = {"seed": SEED, "launches": len(kill_plan(SEED)) + 1, "kills": len(kills),
            "kills_by_stage": by_stage, "write_faults": len(faults_seen),
            "late_or_missed": len(late), "resumed": len(kills) + len(faults_seen),
            "sft_resumed_from_a_checkpoint": len(resumes), **compared,
            "kill_points": [k[1] if isinstance(k[1], str) else json.dumps(k[1]) for k in kills]}
  out = os.environ.get("PERSYN_JAX_FAULT_REPORT") or str(tmp_path / "fault_report.json")
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"fault report: {out}: " + json.dumps({k: v for k, v in report.items() if k != "kill_points"}))
  assert compared["lost"] == 0 and compared["duplicated"] == 0, compared
