"""tpu/*.sh drive gcloud, which cannot run here: a stand-in `gcloud` on PATH records each call
(one JSON list of its arguments per line), and the tests check what every script asks of it.
The remote commands (`--command ...`) are then run through bash -n to be sure they parse."""
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["GCLOUD_CALLS"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["config", "get-value"]:
  print("recorded-project")
elif "describe" in sys.argv:
  print("4")
"""


def stand_ins(bin_dir, **scripts):
  """Writes each stand-in command (name: script text) into bin_dir, executable; returns bin_dir,
  to go first on PATH."""
  bin_dir.mkdir(exist_ok=True)
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return bin_dir


@pytest.fixture
def tpu(tmp_path):
  bin_dir = stand_ins(tmp_path / "bin", gcloud=RECORDER)
  calls = tmp_path / "calls.jsonl"

  def run(script, *args, **env):
    calls.write_text("")
    e = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             GCLOUD_CALLS=str(calls), TPU_NAME="pj", ZONE="us-east5-a", ACCELERATOR="v5p-64")
    e.update(env)
    e.pop("PROJECT", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "tpu", script), *args], env=e,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()]
  return run


def remote(call):
  """The command a `tpu-vm ssh` call runs on the workers (checked to parse as bash)."""
  assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in call
  cmd = call[call.index("--command") + 1]
  subprocess.run(["bash", "-n", "-c", cmd], check=True)
  return cmd


def test_create_a_vm_or_a_queued_resource(tpu):
  (call,) = [c for c in tpu("create.sh") if c[0] == "compute"]
  assert call[:5] == ["compute", "tpus", "tpu-vm", "create", "pj"]
  assert call[call.index("--accelerator-type") + 1] == "v5p-64"
  assert call[call.index("--version") + 1] == "v2-alpha-tpuv5"  # the runtime of the type
  assert call[call.index("--project") + 1] == "recorded-project"
  (call,) = [c for c in tpu("create.sh", QUEUED="1", SPOT="1", ACCELERATOR="v6e-16")
             if c[0] == "compute"]
  assert call[:5] == ["compute", "tpus", "queued-resources", "create", "pj-qr"]
  assert call[call.index("--node-id") + 1] == "pj" and "--spot" in call
  assert call[call.index("--runtime-version") + 1] == "v2-alpha-tpuv6e"


def test_an_unknown_accelerator_is_refused_by_name(tmp_path):
  proc = subprocess.run(["bash", os.path.join(ROOT, "tpu", "create.sh")], capture_output=True,
                        text=True, env=dict(os.environ, ACCELERATOR="v3-8", PROJECT="p"))
  assert proc.returncode == 2 and "unknown accelerator type v3-8" in proc.stderr


def test_setup_installs_on_every_worker(tpu):
  calls = [c for c in tpu("setup.sh", REPO_URL="https://example.org/persyn_jax.git")
           if c[0] == "compute"]
  cmds = [remote(c) for c in calls]
  assert "git clone --depth 1 https://example.org/persyn_jax.git persyn_jax" in cmds[0]
  assert "pip install -q -e '.[tpu]'" in cmds[1]


def test_launch_copies_the_config_and_starts_train_on_every_worker(tpu):
  calls = [c for c in tpu("launch.sh", "configs/math.yaml", "--run-dir", "/mnt/shared/runs/a b",
                          "--set", "mesh.fsdp=8") if c[0] == "compute"]
  scp, ssh = calls
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[4:6] == ["configs/math.yaml", "pj:persyn_jax/run_config.yaml"]
  cmd = remote(ssh)
  assert "{ nohup python -m persyn_jax.train --config run_config.yaml --run-dir " \
         "/mnt/shared/runs/a\\ b --set mesh.fsdp=8 >> run.log 2>&1 < /dev/null & }" in cmd


def test_logs_stop_and_delete(tpu):
  scps = [c for c in tpu("logs.sh") if "scp" in c]  # the recorder describes 4 workers
  assert [c[-1] for c in scps] == [f"--worker={i}" for i in range(4)]
  assert scps[3][4:6] == ["pj:persyn_jax/run.log", "logs/pj/worker-3.log"]
  (stop,) = [c for c in tpu("stop.sh") if c[0] == "compute"]
  assert "pkill -TERM -f '[p]ersyn_jax[.]train'" in remote(stop)
  calls = [c for c in tpu("delete.sh") if c[0] == "compute"]
  assert "pkill" in remote(calls[0])
  assert calls[1][:5] == ["compute", "tpus", "tpu-vm", "delete", "pj"] and "--quiet" in calls[1]
  calls = [c for c in tpu("delete.sh", QUEUED="1") if c[0] == "compute"]
  assert calls[1][:5] == ["compute", "tpus", "queued-resources", "delete", "pj-qr"]


# -- the remote commands, run here: a stand-in gcloud whose `ssh` runs the command with bash and,
# as sshd does, returns once the command's stdout and stderr are closed --------------------------

LOCAL_SSH = """#!/usr/bin/env python3
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_CALLS"], "a") as f:
  f.write(json.dumps(args) + "\\n")
if args[:2] == ["config", "get-value"]:
  print("recorded-project")
elif "ssh" in args:
  p = subprocess.run(["bash", "-c", args[args.index("--command") + 1]], capture_output=True)
  sys.stdout.buffer.write(p.stdout)
  sys.exit(p.returncode)
"""


@pytest.fixture
def local_ssh(tmp_path):
  bin_dir = stand_ins(tmp_path / "bin", gcloud=LOCAL_SSH)
  token = f"persyn_stand_in_{os.getpid()}_{tmp_path.name}"
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             GCLOUD_CALLS=str(tmp_path / "calls.jsonl"), TPU_NAME="pj", ZONE="z",
             ACCELERATOR="v5p-8", TRAIN_PATTERN=f"[{token[0]}]{token[1:]}[.]train")
  env.pop("PROJECT", None)
  procs = []
  yield env, token, bin_dir, procs
  for p in procs:
    p.kill()
    p.wait()


def test_the_run_checks_find_the_run_and_not_themselves(local_ssh, tmp_path):
  """run_alive (tpu/run.sh's check) and stop.sh run pgrep/pkill -f in a shell whose own command
  line holds the pattern's text: the bracketed pattern matches the run only."""
  env, token, _, procs = local_ssh
  alive = lambda: subprocess.run(["bash", "-c", f"source {ROOT}/tpu/common.sh; run_alive"],
                                 env=env, timeout=60).returncode == 0
  assert not alive()  # nothing runs: the shell running pgrep does not count
  stand_in = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal("
                               "signal.SIGTERM, signal.SIG_IGN); time.sleep(120)",
                               f"{token}.train"])
  procs.append(stand_in)
  for _ in range(50):  # until the stand-in's command line is there
    if alive():
      break
  assert alive()
  proc = subprocess.run(["bash", os.path.join(ROOT, "tpu", "stop.sh")], env=dict(env, GRACE="1"),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr  # stop.sh's own shell survived its pkill
  assert "stopped the run" in proc.stdout
  assert stand_in.wait(timeout=10) == -9  # it ignored SIGTERM: killed after GRACE
  assert not alive()


def test_launch_returns_at_once_and_the_run_goes_on(local_ssh, tmp_path):
  env, token, bin_dir, procs = local_ssh
  remote_dir = tmp_path / "remote"
  (remote_dir / ".venv" / "bin").mkdir(parents=True)
  (remote_dir / ".venv" / "bin" / "activate").write_text("")
  marker = tmp_path / "ran"
  # the workers' python: it runs for a while, then leaves a mark
  stand_ins(bin_dir, python=f"#!/usr/bin/env bash\nsleep 4\necho \"$*\" > {marker}\n")
  (tmp_path / "run.yaml").write_text("name: x\n")
  import time
  t0 = time.monotonic()
  proc = subprocess.run(["bash", os.path.join(ROOT, "tpu", "launch.sh"), str(tmp_path / "run.yaml"),
                         "--run-dir", "/runs/r"], env=dict(env, REMOTE_DIR=str(remote_dir)),
                        cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
  took = time.monotonic() - t0
  assert proc.returncode == 0, proc.stderr
  assert took < 3.0, took  # the ssh session closed before the run ended
  assert not marker.exists()
  for _ in range(100):
    if marker.exists():
      break
    time.sleep(0.1)
  assert marker.read_text().split() == ["-m", "persyn_jax.train", "--config", "run_config.yaml",
                                        "--run-dir", "/runs/r"]


# -- the workers' Python: uv brings 3.11+, whatever the image's python3 is  ------------------------

def test_setup_makes_the_venv_with_uv_not_the_system_python3(tpu):
  calls = [c for c in tpu("setup.sh", REPO_URL="https://example.org/persyn_jax.git")
           if c[0] == "compute"]
  cmd = remote(calls[-1])
  assert "PYTHON_VERSION=3.11 bash tpu/remote_venv.sh && . .venv/bin/activate" in cmd
  assert "python3 -m venv" not in cmd and "uv pip install -q -e '.[tpu]'" in cmd
  calls = [c for c in tpu("setup.sh", REPO_URL="u", PYTHON_VERSION="3.12") if c[0] == "compute"]
  assert "PYTHON_VERSION=3.12 bash tpu/remote_venv.sh" in remote(calls[-1])
  script = open(os.path.join(ROOT, "tpu", "remote_venv.sh")).read()
  assert 'uv venv --python "${PYTHON_VERSION}" --python-preference "${PYTHON_PREFERENCE}" .venv' \
      in script and ': "${PYTHON_PREFERENCE:=only-managed}"' in script


PYTHON3_310 = """#!/bin/sh
echo "$*" >> "$PYTHON3_CALLS"
if [ "$1" = "--version" ]; then echo "Python 3.10.12"; exit 0; fi
echo "python3 3.10 stand-in: not used for the venv" >&2; exit 1
"""
# Records every uv call; `uv pip install` (jax[tpu] from the network) is recorded, not run.
UV_WRAPPER = """#!/bin/sh
echo "$*" >> "$UV_CALLS"
if [ "$1" = pip ]; then echo "VIRTUAL_ENV=$VIRTUAL_ENV" >> "$UV_CALLS"; exit 0; fi
exec {uv} "$@"
"""


def managed_python(folder):
  """uv's own Python install as uv lays it out (cpython-X.Y.Z-<os>-<arch>-gnu/bin), made from this
  interpreter: a stand-in for the download uv makes on a TPU VM, as this machine has no network."""
  v = sys.version_info
  name = f"cpython-{v.major}.{v.minor}.{v.micro}-linux-{platform.machine()}-gnu"
  bin_dir = folder / name / "bin"
  bin_dir.mkdir(parents=True)
  real = os.path.realpath(os.path.join(sys.base_prefix, "bin", f"python{v.major}.{v.minor}"))
  (bin_dir / f"python{v.major}.{v.minor}").symlink_to(real)
  (bin_dir / "python3").symlink_to(f"python{v.major}.{v.minor}")
  return folder / name


def test_the_remote_setup_ignores_a_python3_of_3_10(tpu, tmp_path):
  assert sys.version_info >= (3, 11)
  (call,) = [c for c in tpu("setup.sh", REPO_URL="u") if c[0] == "compute"][-1:]
  cmd = remote(call)
  worker = tmp_path / "worker"  # the VM's home directory, with the checkout in persyn_jax/
  (worker / "persyn_jax" / "tpu").mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "tpu", "remote_venv.sh"), worker / "persyn_jax" / "tpu")
  uv = shutil.which("uv") or os.path.join(os.path.dirname(sys.executable), "uv")
  stubs = stand_ins(tmp_path / "stubs", python3=PYTHON3_310, uv=UV_WRAPPER.format(uv=uv))
  managed = managed_python(tmp_path / "uv_pythons")
  env = {"HOME": str(worker), "PATH": f"{stubs}:/usr/bin:/bin",
         "PYTHON3_CALLS": str(tmp_path / "python3.log"), "UV_CALLS": str(tmp_path / "uv.log"),
         "UV_PYTHON_INSTALL_DIR": str(tmp_path / "uv_pythons"), "UV_PYTHON_DOWNLOADS": "never",
         "UV_CACHE_DIR": str(tmp_path / "uv_cache")}
  proc = subprocess.run(["bash", "-c", cmd], cwd=worker, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  venv = worker / "persyn_jax" / ".venv"
  version = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import sys; print(*sys.version_info[:2])"],
                           capture_output=True, text=True, check=True).stdout
  assert tuple(map(int, version.split())) >= (3, 11)
  home = [l.split("=", 1)[1].strip() for l in (venv / "pyvenv.cfg").read_text().splitlines()
          if l.startswith("home")][0]
  assert home == str(managed / "bin")  # uv's own Python, not /usr/bin's
  uv_calls = (tmp_path / "uv.log").read_text().splitlines()
  assert uv_calls == ["venv --python 3.11 --python-preference only-managed .venv",
                      "pip install -q -e .[tpu]", f"VIRTUAL_ENV={venv}"]
  assert not (tmp_path / "python3.log").exists()  # the 3.10 python3 was never asked
  env["PYTHON_VERSION"] = "3.10"
  proc = subprocess.run(["bash", "tpu/remote_venv.sh"], cwd=worker / "persyn_jax", env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "PYTHON_VERSION=3.10: persyn_jax needs Python 3.11" in proc.stderr


# -- preemption: tpu/run.sh recreates the slice and relaunches into the same run dir ---------------

# A stand-in gcloud with a slice that lives in a JSON file: created READY (a queued resource
# ACTIVE), preempted the first time it is described while the first launch runs (PREEMPT=always:
# every launch), and done - the report exists - once a second launch has run.
SLICE = """#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_CALLS"], "a") as f:
  f.write(json.dumps(args) + "\\n")
path = os.environ["SLICE"]
s = json.load(open(path)) if os.path.exists(path) else {
    "exists": False, "state": None, "launches": 0, "preempted": 0}
queued = "queued-resources" in args
lost = "SUSPENDED" if os.environ.get("QUEUED") == "1" else "PREEMPTED"
code = 0
if args[:2] == ["config", "get-value"]:
  print("recorded-project")
elif "create" in args:
  s["creates"] = s.get("creates", 0) + 1
  if s["creates"] <= int(os.environ.get("CREATE_FAILS", "0")):  # no capacity
    print("ERROR: there is no more capacity in the zone", file=sys.stderr)
    code = 1
  else:
    s.update(exists=True, state="ACTIVE" if queued else "READY")
elif "delete" in args:
  s.update(exists=False, state=None)
elif "describe" in args:
  if not s["exists"]:
    print("NOT_FOUND", file=sys.stderr)
    code = 1
  else:
    if s["launches"] > s["preempted"] and (os.environ.get("PREEMPT") == "always"
                                           or s["preempted"] == 0):
      s.update(state=lost, preempted=s["preempted"] + 1)
    print(s["state"])
elif args[:2] == ["storage", "ls"]:
  code = 0 if s["launches"] >= 2 and os.environ.get("PREEMPT") != "always" else 1
elif "ssh" in args:
  cmd = args[args.index("--command") + 1]
  if not s["exists"] or s["state"] not in ("READY", "ACTIVE"):
    code = 255
  elif "persyn_jax.train --config" in cmd:
    s["launches"] += 1
  elif cmd.startswith("test -f"):
    code = 0 if s["launches"] >= 2 and os.environ.get("PREEMPT") != "always" else 1
json.dump(s, open(path, "w"))
sys.exit(code)
"""


def run_loop(tmp_path, **env):
  bin_dir = stand_ins(tmp_path / "bin", gcloud=SLICE)
  calls = tmp_path / "calls.jsonl"
  e = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GCLOUD_CALLS=str(calls),
           SLICE=str(tmp_path / "slice.json"), TPU_NAME="pj", ZONE="us-east5-a",
           ACCELERATOR="v5p-64", REPO_URL="https://example.org/persyn_jax.git", POLL_S="0",
           RUN_DIR="/mnt/shared/runs/r1", SPOT="1")
  e.pop("PROJECT", None)
  e.update(env)
  proc = subprocess.run(["bash", os.path.join(ROOT, "tpu", "run.sh"), "configs/math.yaml",
                         "--set", "mesh.fsdp=8"], env=e, cwd=str(tmp_path), capture_output=True,
                        text=True, timeout=120)
  return proc, [json.loads(line) for line in calls.read_text().splitlines()]


def commands(calls):
  return [c[c.index("--command") + 1] for c in calls if "ssh" in c and "--worker=all" in c]


MOUNT = "sudo mkdir -p /mnt/shared && sudo mount -t nfs 10.0.0.2:/vol1 /mnt/shared"


def test_run_loop_recreates_a_preempted_slice_and_resumes_the_same_run(tmp_path):
  proc, calls = run_loop(tmp_path, PREPARE=MOUNT)
  assert proc.returncode == 0, proc.stderr
  assert "attempt 1: the slice is PREEMPTED" in proc.stdout
  assert "run finished: /mnt/shared/runs/r1/report/report.json (2 launch(es))" in proc.stdout
  creates = [c for c in calls if c[3:4] == ["create"]]
  assert [c[:5] for c in creates] == [["compute", "tpus", "tpu-vm", "create", "pj"]] * 2
  assert all("--spot" in c for c in creates)
  deletes = [c for c in calls if c[3:4] == ["delete"]]
  assert [c[:5] for c in deletes] == [["compute", "tpus", "tpu-vm", "delete", "pj"]]
  assert calls.index(deletes[0]) > calls.index(creates[0])  # the preempted slice, not a new one
  launches = [c for c in commands(calls) if "persyn_jax.train --config" in c]
  assert len(launches) == 2 and all(
      "--config run_config.yaml --run-dir /mnt/shared/runs/r1 --set mesh.fsdp=8" in c
      for c in launches)  # the same run dir: the second launch resumes the first
  setups = [c for c in commands(calls) if "remote_venv.sh" in c]
  assert len(setups) == 2  # a recreated slice is a fresh VM: installed and mounted again
  assert [c for c in commands(calls) if c == MOUNT] == [MOUNT, MOUNT]
  checks = [c for c in calls if "--worker=0" in c]
  assert checks and all(c[c.index("--command") + 1] ==
                        "test -f /mnt/shared/runs/r1/report/report.json" for c in checks)


def test_run_loop_with_queued_resources(tmp_path):
  proc, calls = run_loop(tmp_path, QUEUED="1")
  assert proc.returncode == 0, proc.stderr
  assert "attempt 1: the slice is SUSPENDED" in proc.stdout
  assert [c[:5] for c in calls if c[3:4] in (["create"], ["delete"])] == [
      ["compute", "tpus", "queued-resources", "create", "pj-qr"],
      ["compute", "tpus", "queued-resources", "delete", "pj-qr"],
      ["compute", "tpus", "queued-resources", "create", "pj-qr"]]


def test_run_loop_tries_again_when_a_create_fails(tmp_path):
  """No spot capacity: the create fails; the loop waits and tries again instead of exiting."""
  proc, calls = run_loop(tmp_path, CREATE_FAILS="2", MAX_ATTEMPTS="6")
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.count("creating the slice failed; trying again") == 2
  assert len([c for c in calls if c[3:4] == ["create"]]) == 4  # 2 refused, then 2 slices
  assert "run finished: /mnt/shared/runs/r1/report/report.json (2 launch(es))" in proc.stdout


def test_run_loop_gives_up_after_max_attempts(tmp_path):
  proc, calls = run_loop(tmp_path, PREEMPT="always", MAX_ATTEMPTS="3")
  assert proc.returncode == 1
  assert "gave up after 3 attempts; the run dir /mnt/shared/runs/r1 keeps" in proc.stderr
  assert len([c for c in commands(calls) if "persyn_jax.train --config" in c]) == 3


def test_run_loop_on_a_gs_run_dir_asks_the_bucket_for_the_report(tmp_path):
  proc, calls = run_loop(tmp_path, RUN_DIR="gs://bucket/runs/r1/")
  assert proc.returncode == 0, proc.stderr
  lookups = [c for c in calls if c[:2] == ["storage", "ls"]]
  assert lookups and all(c == ["storage", "ls", "gs://bucket/runs/r1/report/report.json"]
                         for c in lookups)
  assert not [c for c in calls if "--worker=0" in c]


def test_run_loop_needs_a_run_dir(tmp_path):
  proc, _ = run_loop(tmp_path, RUN_DIR="")
  assert proc.returncode != 0 and "set RUN_DIR" in proc.stderr


# -- SLURM: one task per node, the first node coordinates ----------------------------------------

# (a shell script: a python one run through pyenv would see pyenv's PATH, not the job's)
SRUN = """#!/usr/bin/env bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$SRUN_CALLS"
while [[ "$1" == --* ]]; do shift; done
for ((rank = 0; rank < SLURM_NNODES; rank++)); do  # one task per node, as srun would start
  SLURM_PROCID=$rank "$@" || exit
done
"""
SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu[07-08]" ] && printf 'gpu07\\ngpu08\\n'
"""
PYTHON = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["PYTHON_CALLS"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def test_the_sbatch_script_parses_and_starts_one_process_per_node(tmp_path):
  script = os.path.join(ROOT, "tpu", "slurm.sbatch")
  subprocess.run(["bash", "-n", script], check=True)
  text = open(script).read()
  assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --requeue" in text
  bin_dir = stand_ins(tmp_path / "bin", srun=SRUN, scontrol=SCONTROL, python=PYTHON)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             SRUN_CALLS=str(tmp_path / "srun.jsonl"), PYTHON_CALLS=str(tmp_path / "python.jsonl"),
             SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2", SLURM_SUBMIT_DIR=str(tmp_path),
             CONFIG="configs/math.yaml", RUN_DIR="/shared/runs/math one")
  proc = subprocess.run(["bash", script, "--set", "sft.steps=10"], env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  (srun,) = [json.loads(l) for l in (tmp_path / "srun.jsonl").read_text().splitlines()]
  assert srun[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert srun[-7:] == ["python", "configs/math.yaml", "/shared/runs/math one", "gpu07:12355", "2",
                       "--set", "sft.steps=10"]
  ranks = [json.loads(l) for l in (tmp_path / "python.jsonl").read_text().splitlines()]
  assert ranks == [["-m", "persyn_jax.train", "--config", "configs/math.yaml",
                    "--run-dir", "/shared/runs/math one", "--coordinator", "gpu07:12355",
                    "--num-processes", "2", "--process-id", str(rank), "--set", "sft.steps=10"]
                   for rank in range(2)]
