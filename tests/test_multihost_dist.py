"""persyn_jax.distributed with one process (8 fake CPU devices): when it initializes, and that
every helper is the identity or a no-op. The multi-process behaviour is tests/test_multihost.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persyn_jax import distributed as dist
from persyn_jax import sharding as shd

CLUSTER_VARS = ("PERSYN_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def clean_env(monkeypatch):
  for v in CLUSTER_VARS:
    monkeypatch.delenv(v, raising=False)
  monkeypatch.setattr(dist, "_on_cloud_tpu_vm", lambda: False)
  return monkeypatch


def test_initializes_only_when_one_of_several(clean_env):
  assert not dist.should_initialize()
  assert not dist.should_initialize(None, 1)
  assert dist.should_initialize("10.0.0.1:1234", 2)
  assert dist.should_initialize(None, 4)
  clean_env.setenv("SLURM_NTASKS", "1")
  assert not dist.should_initialize()
  clean_env.setenv("SLURM_NTASKS", "8")
  assert dist.should_initialize()
  clean_env.setenv("PERSYN_JAX_DISTRIBUTED", "off")  # the override wins over everything
  assert not dist.should_initialize("10.0.0.1:1234", 2)
  clean_env.delenv("SLURM_NTASKS")
  clean_env.setenv("PERSYN_JAX_DISTRIBUTED", "1")
  assert dist.should_initialize()


def test_tpu_vm_initializes_without_arguments(clean_env):
  clean_env.setattr(dist, "_on_cloud_tpu_vm", lambda: True)
  assert dist.should_initialize()
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
  assert dist._cluster_size_hint() == 4


def test_single_process_is_left_alone_and_bad_flags_are_named(clean_env):
  assert dist.initialize() is False  # nothing to join: jax is not touched
  with pytest.raises(ValueError, match="--num-processes and --process-id"):
    dist.initialize("127.0.0.1:1234", None, None)
  with pytest.raises(ValueError, match=r"process_id=2 is not in \[0, 2\)"):
    dist.initialize("127.0.0.1:1234", 2, 2)


@pytest.mark.parametrize("flags,want", [
    (["--coordinator", "localhost:1234"], "--coordinator needs --num-processes and --process-id"),
    (["--num-processes", "2", "--process-id", "5"], "process_id=5 is not in [0, 2)")])
def test_the_cli_reports_flags_that_do_not_fit_as_bad_input(clean_env, capsys, flags, want):
  """They were ValueError tracebacks; now one line and exit 2, before any config is read."""
  from persyn_jax import train
  assert train.main([*flags, "--config", "/no/such/config.yaml"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: ConfigError: {want}") and err.count("\n") == 1, err


def test_explicit_flags_turn_jax_cluster_detection_off(clean_env):
  """tpu/slurm.sbatch passes --coordinator/--num-processes/--process-id inside srun: jax must not
  detect SLURM on top of them (it would take local_device_ids from SLURM_LOCALID: GPU 0 alone)."""
  calls = []

  def fake(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None,
           cluster_detection_method=None, initialization_timeout=300):
    calls.append(dict(locals()))
  clean_env.setattr(jax.distributed, "is_initialized", lambda: False)
  clean_env.setattr(jax.distributed, "initialize", fake)
  clean_env.setenv("SLURM_NTASKS", "2")
  clean_env.setenv("SLURM_LOCALID", "0")
  assert dist.initialize("gpu07:12355", 2, 1) is True
  assert calls[-1]["cluster_detection_method"] == "deactivate"
  assert calls[-1]["local_device_ids"] is None and calls[-1]["process_id"] == 1
  assert dist.initialize() is True  # no flags (SLURM, a TPU pod): jax detects the cluster
  assert calls[-1]["cluster_detection_method"] is None


def test_helpers_are_identities_with_one_process():
  assert dist.is_writer() and not dist.is_multiprocess() and dist.process_count() == 1
  dist.barrier("nothing to wait for")
  obj = {"stage": "probe", "counts": [1, 2], "key": None}
  assert dist.broadcast_json(obj) == obj
  mesh = shd.make_mesh(shd.MeshConfig(1, 8, 1))
  x = jax.device_put(jnp.arange(32.0).reshape(8, 4), shd.batch_sharding(mesh, (8, 4)))
  np.testing.assert_array_equal(dist.to_host(x), np.arange(32.0).reshape(8, 4))
  tree = dist.tree_to_host({"a": x, "b": [np.ones(2)]})
  assert isinstance(tree["a"], np.ndarray) and tree["b"][0].tolist() == [1.0, 1.0]
