"""The run directory as bad input: a second run on it, a stale lock, a damaged DONE.json, a file
or read-only place where the directory should be; and the CLI's one error handler (one line for
known errors, exit 2 for bad input and 1 for failures; a traceback plus what the run was doing
for anything else). docs/FAILURES.md lists each case with its test."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import yaml

from persyn_jax import config as C
from persyn_jax.stages import GRAPH, Run, stage_key
from persyn_jax.stages.lock import RunDirError, RunLock, RunLockedError


def explicit_config(model_dir, tmp_path, prompts: str = "", **over):
  """A run of two tiny teachers and a tiny student over a prompt file with `prompts` (empty by
  default: the probe stage then stops at once with 'no usable prompts', which shows it ran)."""
  from persyn_jax.run_config import RunConfig
  p = tmp_path / "prompts.jsonl"
  p.write_text(prompts)
  path = model_dir("llama")[0]
  data = {"world": None, "run_dir": str(tmp_path / "run"),
          "teachers": [{"name": "t1", "path": path}, {"name": "t2", "path": path}],
          "student": {"name": "s", "path": path},
          "prompts": {"source": {"path": str(p)}, "probe": 1.0}}
  data.update(over)
  return C.from_dict(RunConfig, data)


def hold_lock(run_dir: str) -> subprocess.Popen:
  """Another process that takes the run directory's lock and keeps it until killed."""
  code = textwrap.dedent(f"""
      import sys, time
      from persyn_jax.stages.lock import RunLock
      lock = RunLock({run_dir!r}); lock.acquire()
      print("locked", flush=True); time.sleep(600)""")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
  assert proc.stdout.readline().strip() == "locked"
  return proc


NO_PROMPTS = r"prompts.jsonl: no usable prompts"


def test_a_second_run_on_the_same_run_dir_is_refused_naming_the_holder(model_dir, tmp_path):
  cfg = explicit_config(model_dir, tmp_path)
  os.makedirs(cfg.run_dir)
  holder = hold_lock(cfg.run_dir)
  try:
    with pytest.raises(RunLockedError, match=rf"{cfg.run_dir}: another run is using this run "
                                             rf"directory \(pid {holder.pid} on host "
                                             rf"{socket.gethostname()}, started "):
      Run(cfg, log=lambda m: None).run(["probe"])
    assert not os.path.exists(os.path.join(cfg.run_dir, "config.json"))  # refused before anything
  finally:
    holder.kill()
    holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_and_logged(model_dir, tmp_path):
  cfg = explicit_config(model_dir, tmp_path)
  os.makedirs(cfg.run_dir)
  holder = hold_lock(cfg.run_dir)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  logs = []
  with pytest.raises(ValueError, match=NO_PROMPTS):  # the run went on to its first stage
    Run(cfg, log=logs.append).run(["probe"])
  assert any(f"taking over the lock of an earlier run (pid {holder.pid} on host "
             f"{socket.gethostname()}" in m and "no longer running" in m for m in logs), logs
  assert open(os.path.join(cfg.run_dir, ".lock")).read() == ""  # a run that ended leaves no note
  with RunLock(cfg.run_dir) as lock:  # released when the run ended, even by an error
    note = json.load(open(lock.path))
    assert note["pid"] == os.getpid() and note["host"] == socket.gethostname()
  logs = []
  with pytest.raises(ValueError, match=NO_PROMPTS):
    Run(cfg, log=logs.append).run(["probe"])
  assert not any("taking over" in m for m in logs), logs


@pytest.mark.parametrize("content", [b'{"format": 2, "stage": "probe", "ke', b"\x00\xff\xfe junk",
                                     b"[]", b""])
def test_a_damaged_done_json_makes_its_stage_run_again(model_dir, tmp_path, content):
  cfg = explicit_config(model_dir, tmp_path)
  done = os.path.join(cfg.run_dir, "probe", "DONE.json")
  os.makedirs(os.path.dirname(done))
  key = stage_key(GRAPH[0], cfg, {})
  json.dump({"format": 2, "stage": "probe", "key": key, "counts": {}, "seconds": 1.0}, open(done, "w"))
  logs = []
  Run(cfg, log=logs.append).run(["probe"])  # a good manifest: skipped
  assert logs == ["[probe] done earlier (1.0 s); skipped"]
  open(done, "wb").write(content)
  logs = []
  with pytest.raises(ValueError, match=NO_PROMPTS):  # not a JSONDecodeError: the stage ran again
    Run(cfg, log=logs.append).run(["probe"])
  assert any(m.startswith(f"[probe] {done} is unreadable (") and "treating probe as incomplete" in m
             for m in logs), logs


def read_only_dir(tmp_path) -> str:
  """A place where no run directory can be made: a read-only directory (root writes through
  permission bits, so for root a sysfs path, where no one may create a directory)."""
  if os.geteuid() == 0:
    return "/sys/persyn-jax-test-run"
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  return str(ro / "run")


def test_a_run_dir_that_is_a_file_or_read_only_is_named(model_dir, tmp_path):
  cfg = explicit_config(model_dir, tmp_path)
  open(cfg.run_dir, "w").write("not a directory")
  # the preflight names it (with --dry-run too), before the run takes the directory
  with pytest.raises(C.ConfigError, match=rf"{cfg.run_dir}: the run directory is a file"):
    Run(cfg, log=lambda m: None).run(["probe"])
  ro = read_only_dir(tmp_path)
  cfg = explicit_config(model_dir, tmp_path, run_dir=ro)
  with pytest.raises(RunDirError, match=rf"{ro}: cannot create the run directory \((Permission "
                                        rf"denied|Operation not permitted)"):
    Run(cfg, log=lambda m: None).run(["probe"])


# -- the CLI's error handler -----------------------------------------------------------------------

def write_yaml(cfg, tmp_path) -> str:
  y = tmp_path / "run.yaml"
  y.write_text(yaml.safe_dump(C.to_dict(cfg)))
  return str(y)


def test_the_cli_prints_known_errors_in_one_line_with_exit_2_or_1(model_dir, tmp_path, capsys):
  from persyn_jax import train
  cfg = explicit_config(model_dir, tmp_path)
  y = write_yaml(cfg, tmp_path)
  capsys.readouterr()  # what making the tiny model printed (run alone, this test makes it)
  ro = read_only_dir(tmp_path)  # bad input: 2
  assert train.main(["--config", y, "--stages", "probe", "--run-dir", ro]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: RunDirError: {ro}: cannot create the run directory (") and \
      err.count("\n") == 1, err
  os.makedirs(cfg.run_dir)
  holder = hold_lock(cfg.run_dir)
  try:  # a failure, not bad input: 1
    assert train.main(["--config", y, "--stages", "probe"]) == 1
  finally:
    holder.kill()
    holder.wait()
  err = capsys.readouterr().err
  assert err.startswith(f"error: RunLockedError: {cfg.run_dir}: another run is using this run "
                        f"directory (pid {holder.pid} ") and err.count("\n") == 1, err
  assert train.main(["--config", y, "--redo", "probing"]) == 2
  assert capsys.readouterr().err.startswith("error: ConfigError: --stages / --redo: unknown "
                                            "['probing']")


def test_the_cli_keeps_the_traceback_of_an_unknown_error_and_says_what_it_was_doing(
    model_dir, tmp_path, capsys):
  from persyn_jax import train
  cfg = explicit_config(model_dir, tmp_path)  # no prompts: a plain ValueError inside the stage
  assert train.main(["--config", write_yaml(cfg, tmp_path), "--stages", "probe"]) == 1
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and "no usable prompts" in err
  assert err.rstrip().splitlines()[-1] == (
      f"persyn_jax.train failed while running: run_dir {cfg.run_dir}, stage probe")


# -- orbax checkpoints replaced by junk ------------------------------------------------------------

def junk(path: str) -> None:
  """Every file under `path` overwritten with random bytes (a checkpoint replaced by junk)."""
  for root, _, files in os.walk(path):
    for f in files:
      open(os.path.join(root, f), "wb").write(os.urandom(100))


def test_a_damaged_sft_checkpoint_step_is_moved_aside_and_the_previous_one_restored(tmp_path):
  import jax
  import jax.numpy as jnp
  from persyn_jax.checkpoints import CheckpointManager
  from persyn_jax.models import CheckpointError
  d = str(tmp_path / "checkpoints")
  target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  ckpts = CheckpointManager(d, keep=3)
  for step in (1, 2):
    ckpts.save(step, {"w": jnp.full((3,), float(step))}, {"step": step})
  ckpts.close()
  junk(os.path.join(d, "2"))
  ckpts = CheckpointManager(d, keep=3)
  state, meta, step = ckpts.restore(target)
  assert (step, meta["step"]) == (1, 1) and state["w"].tolist() == [1.0, 1.0, 1.0]
  assert [s for s, _ in ckpts.skipped] == [2]
  assert ckpts.skipped[0][1].startswith(f"{d}/2: not a readable orbax checkpoint, damaged or "
                                        f"replaced (")
  assert [n for n in os.listdir(d) if n.startswith("corrupt-2-")] and ckpts.all_steps() == [1]
  ckpts.save(2, {"w": jnp.full((3,), 5.0)}, {"step": 2})  # training goes on past the bad step
  ckpts.wait()
  assert ckpts.restore(target)[2] == 2
  ckpts.close()
  junk(os.path.join(d, "1"))
  junk(os.path.join(d, "2"))
  with pytest.raises(CheckpointError, match=rf"{d}: no readable checkpoint \(steps \[2, 1\] are "
                                            rf"damaged"):
    CheckpointManager(d, keep=3).restore(target)


def test_a_checkpoint_dir_or_saved_tree_replaced_by_junk_is_named(tmp_path):
  import jax
  import jax.numpy as jnp
  from persyn_jax.checkpoints import CheckpointManager, restore_tree, save_tree
  from persyn_jax.models import CheckpointError
  path = str(tmp_path / "router" / "state")
  save_tree(path, {"w": jnp.ones((3,))})
  junk(path)
  with pytest.raises(CheckpointError, match=rf"{path}: not a readable orbax checkpoint, damaged"):
    restore_tree(path, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
  f = tmp_path / "checkpoints"
  f.write_bytes(os.urandom(64))
  with pytest.raises(CheckpointError, match=rf"{f}: a file where the checkpoint directory should be"):
    CheckpointManager(str(f), keep=1)


# -- the planner counts host memory ----------------------------------------------------------------

def test_dry_run_refuses_an_sft_batch_that_does_not_fit_host_memory(capsys):
  """On CPU no device reports its memory, so only the host check can refuse this plan."""
  from persyn_jax import plan as planlib
  from persyn_jax import train
  assert train.main(["--dry-run", "--set", "sft.batch_size=1000000000"]) == 3
  out = capsys.readouterr().out
  gb = planlib.host_memory() / planlib.GB
  assert "DOES NOT FIT:\n    sft.batch_size=1000000000 (x sft.seq_len=" in out
  assert "needs " in out and "GB of host memory per process (batches " in out
  assert f"but a host has {gb:.1f} GB" in out
  assert train.main(["--dry-run"]) == 0  # the toy run's own batches fit
  assert "host memory per process" in capsys.readouterr().out


# -- a shard damaged after its stage finished ------------------------------------------------------

def test_a_shard_damaged_after_its_stage_finished_names_the_redo_and_redo_rewrites_only_it(
    model_dir, tmp_path, capsys):
  from persyn_jax import train
  from persyn_jax.data.shards import ShardError
  prompts = "".join(json.dumps({"id": f"p{i}", "prompt": f"count to {i}", "answer": str(i)}) + "\n"
                    for i in range(3))
  cfg = explicit_config(model_dir, tmp_path, prompts, records_per_shard=1,
                        sampling={"max_new_tokens": 4, "batch_size": 4},
                        scoring={"quality": "verifier"})
  # a score stage that could run (the CLI's preflight checks refuse one that could not)
  source = dataclasses.replace(cfg.prompts.source, reference_field="answer")
  cfg = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, source=source))
  Run(cfg, log=lambda m: None).run(["probe"])
  probe = os.path.join(cfg.run_dir, "probe")
  files = sorted(f for f in os.listdir(probe) if f.endswith(".array_record"))
  assert len(files) >= 2  # one record per shard, a shard per probe prompt and teacher
  before = {f: (open(os.path.join(probe, f), "rb").read(), os.stat(os.path.join(probe, f)).st_ino)
            for f in files}
  bad = os.path.join(probe, files[-1])
  data = bytearray(before[files[-1]][0])
  data[len(data) // 2] ^= 0xFF
  open(bad, "wb").write(bytes(data))

  with pytest.raises(ShardError, match=rf"{bad}: .*Stage 'probe' finished earlier, so this file "
                                       rf"was damaged since; to regenerate it, rerun with --redo "
                                       rf"probe") as e:
    Run(cfg, log=lambda m: None).run(["score"])
  assert e.value.redo == "probe"
  y = write_yaml(cfg, tmp_path)
  assert train.main(["--config", y, "--stages", "score"]) == 1
  err = capsys.readouterr().err.splitlines()[-2:]  # after the run's own progress output
  assert err[0].startswith(f"error: ShardError: {bad}: ")
  assert err[1] == f"to regenerate it, run: python -m persyn_jax.train --config {y} --stages score " \
                   f"--redo probe"

  logs = []
  Run(cfg, log=logs.append).run(["score"][:0], redo=["probe"])
  assert "[probe] --redo: checking its shards; the missing or corrupt ones are written again" in logs
  for f in files:  # the damaged shard is written again, as it was; the others are not touched
    path = os.path.join(probe, f)
    assert open(path, "rb").read() == before[f][0], f
    assert (os.stat(path).st_ino == before[f][1]) == (f != files[-1]), f
  assert json.load(open(os.path.join(probe, "DONE.json")))["key"] == stage_key(GRAPH[0], cfg, {})


def test_an_unfinished_stage_resumes_only_under_the_key_it_started_with(model_dir, tmp_path):
  """A probe killed after writing its shards, rerun with another max_new_tokens: its shards are
  moved aside (not resumed) and the stage equals a clean run under the new config."""
  from test_pipeline import read_array_record
  prompts = "".join(json.dumps({"id": f"p{i}", "prompt": f"count to {i}"}) + "\n"
                    for i in range(3))
  short = explicit_config(model_dir, tmp_path, prompts, records_per_shard=1,
                          sampling={"max_new_tokens": 3, "batch_size": 4})
  long = dataclasses.replace(short, sampling=dataclasses.replace(short.sampling,
                                                                 max_new_tokens=6))
  Run(short, log=lambda m: None).run(["probe"])
  probe = os.path.join(short.run_dir, "probe")
  assert json.load(open(os.path.join(probe, "STARTED.json")))["key"] == \
      stage_key(GRAPH[0], short, {})
  os.remove(os.path.join(probe, "DONE.json"))  # as if killed after its last shard
  Run(short, log=lambda m: None).run(["probe"])  # the same key: resumed, nothing moved
  assert not [d for d in os.listdir(short.run_dir) if ".stale-" in d]
  os.remove(os.path.join(probe, "DONE.json"))
  logs = []
  Run(long, log=logs.append).run(["probe"])
  stale = [d for d in os.listdir(short.run_dir) if d.startswith("probe.stale-")]
  assert len(stale) == 1
  assert any("since its unfinished run; moving probe to" in m for m in logs), logs
  clean = dataclasses.replace(long, run_dir=str(tmp_path / "clean"))
  Run(clean, log=lambda m: None).run(["probe"])
  got, want = (read_array_record(os.path.join(d, "probe", "*.array_record"))
               for d in (long.run_dir, clean.run_dir))
  strip = lambda rs: sorted((r["id"], r["teacher"], r["response"]) for r in rs)
  assert strip(got) == strip(want)
  old = read_array_record(os.path.join(short.run_dir, stale[0], "*.array_record"))
  assert strip(old) != strip(want)  # not vacuous: the short answers differ


def test_generate_sets_its_datasets_aside_with_itself(model_dir, tmp_path):
  """generate writes data/<policy>/ besides generate/: a generate whose key changed moves both,
  so neither SFT nor an export ever reads a dataset assembled under the old assignments."""
  gen = next(st for st in GRAPH if st.name == "generate")
  assert gen.outputs == ("data",)
  cfg = explicit_config(model_dir, tmp_path)
  for d in ("generate", os.path.join("data", "persyn")):
    os.makedirs(os.path.join(cfg.run_dir, d))
    open(os.path.join(cfg.run_dir, d, "x"), "w").close()
  logs = []
  Run(cfg, log=logs.append)._set_aside(gen, "finished")
  moved = sorted(os.listdir(cfg.run_dir))
  assert [d.split(".stale-")[0] for d in moved] == ["data", "generate"], moved
  assert os.path.exists(os.path.join(cfg.run_dir, moved[0], "persyn", "x"))
  assert len(logs) == 2 and "moving data to" in logs[0] + logs[1]


@pytest.mark.parametrize("content", [b'{"steps": 4, "final_lo', b"[1, 2]", b""])
def test_a_damaged_student_marker_is_done_again_or_named(model_dir, tmp_path, content):
  """A student's sft DONE.json or an evaluation's result.json that is damaged counts as missing
  (its part is done again, the log names the file); the eval stage's read of a finished sft
  stage's student summary names the file and what to remove, not a JSONDecodeError."""
  from persyn_jax.stages.context import Context
  from persyn_jax.stages.eval import sft_summary
  from persyn_jax.stages.sft import student_dir
  cfg = explicit_config(model_dir, tmp_path)
  logs = []
  ctx = Context(cfg, log=logs.append)
  done = os.path.join(student_dir(ctx, "persyn", None), "DONE.json")
  os.makedirs(os.path.dirname(done))
  json.dump({"steps": 4, "final_loss": 1.5}, open(done, "w"))
  assert ctx.read_marker(done) == {"steps": 4, "final_loss": 1.5} == sft_summary(ctx, "persyn", None)
  open(done, "wb").write(content)
  assert ctx.read_marker(done) is None
  assert any(m.startswith(f"{done} is unreadable (") and "doing its part again" in m
             for m in logs), logs
  with pytest.raises(ValueError, match=rf"{done}: missing or unreadable, though the sft stage "
                                       r"finished; rerun with --redo sft"):
    sft_summary(ctx, "persyn", None)
