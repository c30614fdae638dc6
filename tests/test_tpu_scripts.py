"""tpu/*.sh drive gcloud, which cannot run here: a stand-in `gcloud` on PATH records each call
(one JSON list of its arguments per line), and the tests check what every script asks of it.
The remote commands (`--command ...`) are then run through bash -n to be sure they parse."""
import json
import os
import subprocess

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


@pytest.fixture
def tpu(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(RECORDER)
  (bin_dir / "gcloud").chmod(0o755)
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
  assert "python -m persyn_jax.train --config run_config.yaml --run-dir /mnt/shared/runs/a\\ b " \
         "--set mesh.fsdp=8 > run.log 2>&1 < /dev/null &" in cmd  # flags quoted, detached


def test_logs_stop_and_delete(tpu):
  scps = [c for c in tpu("logs.sh") if "scp" in c]  # the recorder describes 4 workers
  assert [c[-1] for c in scps] == [f"--worker={i}" for i in range(4)]
  assert scps[3][4:6] == ["pj:persyn_jax/run.log", "logs/pj/worker-3.log"]
  (stop,) = [c for c in tpu("stop.sh") if c[0] == "compute"]
  assert "pkill -TERM -f persyn_jax.train" in remote(stop)
  calls = [c for c in tpu("delete.sh") if c[0] == "compute"]
  assert "pkill" in remote(calls[0])
  assert calls[1][:5] == ["compute", "tpus", "tpu-vm", "delete", "pj"] and "--quiet" in calls[1]
  calls = [c for c in tpu("delete.sh", QUEUED="1") if c[0] == "compute"]
  assert calls[1][:5] == ["compute", "tpus", "queued-resources", "delete", "pj-qr"]
