"""Several processes, one run: start-up, barriers, and what only process 0 does.

Every process runs every stage (the models are sharded over all devices, so every jitted call is
collective); each host writes its own shards of a stage (data/shards.write_stage_records,
sampling/records.py), process 0 alone writes manifests and reports, and a barrier between stages
makes each stage's files visible before the next one reads them. With one process every function
here is a no-op or the identity.

    from persyn_jax import distributed as dist
    dist.initialize()                     # TPU pod / SLURM / OpenMPI: found automatically
    dist.initialize("10.0.0.1:1234", 4, rank)   # GPU or CPU cluster: explicit
    if dist.is_writer(): write(...)
    dist.barrier("probe:done")
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from persyn_jax.config import ConfigError

# Environment variables under which a launcher tells a process it is one of several; with any of
# them present, jax.distributed.initialize() finds the rest itself.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _on_cloud_tpu_vm() -> bool:
  try:  # jax's own test (PCI vendor id of the accelerators), private but stable for years
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    return bool(running_in_cloud_tpu_vm)
  except Exception:  # noqa: BLE001 - an import layout change must not stop a single-host run
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def _cluster_size_hint() -> int:
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
    v = os.environ.get(name, "")
    if v.isdigit():
      return int(v)
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) or 1


def should_initialize(coordinator: str | None = None, num_processes: int | None = None) -> bool:
  """Whether this process is one of several: explicit arguments, a cluster launcher's environment
  variables, or a Cloud TPU VM (a pod slice has one process per host; jax finds the others)."""
  if os.environ.get("PERSYN_JAX_DISTRIBUTED", "").lower() in ("0", "off", "false", "no"):
    return False
  if coordinator or (num_processes or 1) > 1:
    return True
  if os.environ.get("PERSYN_JAX_DISTRIBUTED", "").lower() in ("1", "on", "true", "yes"):
    return True
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or _cluster_size_hint() > 1:
    return True
  return _on_cloud_tpu_vm()


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None,
               timeout_s: int = 300) -> bool:
  """`jax.distributed.initialize()` when this process is one of several (see should_initialize);
  must run before anything touches a device. Returns whether it initialized. Flags that do not
  fit together are bad input: a ConfigError (a ValueError; the CLI prints one line, exit 2).

  On a TPU pod and under SLURM or OpenMPI every argument is optional. On a GPU or CPU cluster give
  the coordinator `host:port` (process 0's address), the number of processes and this one's id.
  On CPU the collectives go through gloo (the default of jax >= 0.5; set here for older ones).
  """
  if not should_initialize(coordinator, num_processes):
    return False
  if coordinator and (num_processes is None or process_id is None) and _cluster_size_hint() == 1:
    raise ConfigError("--coordinator needs --num-processes and --process-id (outside SLURM, "
                     f"OpenMPI and TPU pods); got num_processes={num_processes}, "
                     f"process_id={process_id}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"process_id={process_id} is not in [0, {num_processes})")
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - an older jax without the option: its default is used
      pass
  if jax.distributed.is_initialized():
    return True
  # Every argument given: jax's cluster detection must not fill in the rest. Under srun it would
  # take local_device_ids from SLURM_LOCALID (0 with one task per node), so each process of
  # tpu/slurm.sbatch would see its node's GPU 0 alone instead of all of them.
  explicit = bool(coordinator) and num_processes is not None and process_id is not None
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             cluster_detection_method="deactivate" if explicit else None,
                             initialization_timeout=timeout_s)
  return True


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_writer() -> bool:
  """True on the one process that writes manifests, reports and shared files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op with one process). `name` must be
  the same on every process and differ between barriers (it is checked by the coordinator)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def raise_if_any(error: str | None, exc: type[Exception] = RuntimeError, what: str = "") -> None:
  """Raises `exc(error)` on every process when any process has an error (collective with several
  processes; every process must call it): a check that fails on one host must not leave the
  others waiting for it at the next collective. The others' message names the failed hosts."""
  if jax.process_count() == 1:
    if error:
      raise exc(error)
    return
  from jax.experimental import multihost_utils
  failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
  bad = [int(i) for i in np.nonzero(failed.reshape(-1))[0]]
  if error:
    raise exc(error)
  if bad:
    raise exc(f"{what}: processes {bad} failed a check (their logs say why)")


def to_host(x) -> np.ndarray:
  """The whole value of a (possibly multi-host, sharded) jax.Array as numpy, on every process.
  Collective when the array spans other processes' devices: every process must call it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:  # every process already holds a full copy
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def tree_to_host(tree):
  return jax.tree.map(to_host, tree)


def broadcast_json(obj: Any) -> Any:
  """Process 0's value of a JSON-able object, on every process (collective). Lets all processes
  take the same decision (run or skip a stage) from what process 0 read."""
  if jax.process_count() == 1:
    return obj
  from jax.experimental import multihost_utils
  blob = json.dumps(obj, sort_keys=True).encode("utf-8") if is_writer() else b""
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(blob))))
  buf = np.zeros((max(n, 1),), np.uint8)
  if is_writer():
    buf[:n] = np.frombuffer(blob, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return json.loads(bytes(buf[:n]).decode("utf-8"))

