"""What every benchmark here does the same way, so that its figures hold up on a shared machine.

1. Load: `check_load` reads os.getloadavg() against the core count before (and after) measuring;
   above one runnable task per core it warns, and the JSON records it as "loaded". A figure taken
   on a loaded machine says little about either side (the earlier committed CPU ratios were).
2. Threads: `pin_threads(n)` gives both sides the same intra-op thread count - XLA's CPU client
   (XLA_FLAGS, read when the backend starts, so call it before the first jax computation) and
   torch.set_num_threads - so neither side wins by taking more cores.
3. Alternation: `alternate` runs the sides in turns (A B, then B A, ...) over >= 3 repeats, so
   slow drift of the machine hits both alike.
4. Summary: `spread` gives the median with min, max and the quartiles; `write_json` stores them
   with the device, date, versions, load and the exact command.
5. Host malloc: importing this module imports persyn_jax before any JAX backend starts, so that
   on a CPU-only host our side runs with its malloc settings (persyn_jax/host_malloc.py), as
   `python -m persyn_jax.train` does; they are process-wide, so torch's side, in the same
   process, runs with them too. `write_json` records whether they were made ("host_malloc").
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from typing import Callable

import persyn_jax.host_malloc  # noqa: F401  (persyn_jax's import makes the settings; see 5.)

MIN_REPEATS = 3


def pin_threads(n: int | None = None) -> int:
  """Pins XLA (CPU) and torch to n intra-op threads (default: all cores); returns n."""
  n = int(n or os.cpu_count() or 1)
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith(("--xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads"))]
  flags += [f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'}",
            f"intra_op_parallelism_threads={n}"]
  os.environ["XLA_FLAGS"] = " ".join(flags)
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(n)
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      warnings.warn("pin_threads after the JAX backend started: XLA keeps its thread count")
  try:
    import torch
    torch.set_num_threads(n)
  except ImportError:
    pass
  return n


def machine_load() -> dict:
  one, five, fifteen = os.getloadavg()
  cpus = os.cpu_count() or 1
  return {"loadavg_1_5_15": [round(one, 2), round(five, 2), round(fifteen, 2)], "cpus": cpus,
          "loaded": one > cpus}


def check_load(when: str = "before") -> dict:
  """The load now; warns when the 1-minute load average exceeds the core count."""
  m = machine_load()
  if m["loaded"]:
    msg = (f"machine loaded {when} measuring: load average {m['loadavg_1_5_15'][0]} > "
           f"{m['cpus']} cores; these figures are not comparable with an idle machine's")
    warnings.warn(msg)
    print("WARNING:", msg, flush=True)
  return m


def spread(xs: list[float]) -> dict:
  """Median with min, max and quartiles (inclusive method, so 3 samples give q1 <= med <= q3)."""
  xs = sorted(float(x) for x in xs)
  q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
  return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3,
          "n": len(xs), "values": xs}


def alternate(sides: dict[str, Callable[[], float]], repeats: int = MIN_REPEATS
              ) -> dict[str, dict]:
  """Calls each side's measurement (returns seconds) `repeats` times, alternating the order
  every round (A B, B A, A B, ...); returns {side: spread(seconds)}."""
  if repeats < MIN_REPEATS:
    raise ValueError(f"repeats={repeats}: at least {MIN_REPEATS} are needed for a spread")
  names = list(sides)
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(repeats):
    for n in (names if r % 2 == 0 else names[::-1]):
      times[n].append(float(sides[n]()))
  return {n: spread(t) for n, t in times.items()}


def timer(fn: Callable[[], object]) -> Callable[[], float]:
  """A measurement from a callable that blocks until its work is done: its wall seconds."""
  def run() -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
  return run


def versions() -> dict:
  out = {"python": platform.python_version()}
  for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
    try:
      out[mod] = __import__(mod).__version__
    except (ImportError, AttributeError):
      out[mod] = None
  return out


def cpu_model() -> str | None:
  """The host CPU's model name (Linux: /proc/cpuinfo), e.g. "AMD EPYC"; CPU ratios move with it."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_vector_isa() -> list[str]:
  """The host CPU's wide-vector extensions (Linux: /proc/cpuinfo flags: avx2, avx512f, amx_*):
  XLA:CPU's and torch's kernels, and so the CPU ratios, change with them."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          flags = line.split(":", 1)[1].split()
          wide = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni")
          return sorted(flag for flag in flags if flag in wide or flag.startswith("amx"))
  except OSError:
    pass
  return []


def device() -> dict:
  import jax
  d = jax.devices()[0]
  return {"platform": d.platform, "kind": d.device_kind, "count": jax.device_count(),
          "host": platform.node(), "cpu": platform.processor() or platform.machine(),
          "cpu_model": cpu_model(), "cpu_isa": cpu_vector_isa(), "cpus": os.cpu_count()}


def environment(load_before: dict, threads: int | None) -> dict:
  """The header every result carries: device, date, versions, load, threads, command."""
  return {"command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable),
                                                        *sys.argv]),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "device": device(), "versions": versions(), "threads": threads,
          "load": {"before": load_before, "after": check_load("after")}}


def spec_peaks(required: bool = True) -> tuple[float | None, float | None]:
  """(dense bf16 FLOP/s, HBM bytes/s) of one device of this machine, from the spec sheets
  (persyn_jax/device_peaks.py); (None, None) on CPU, which has no spec peak. An accelerator whose
  kind is not in the table stops the benchmark when `required` (its MFU would have no
  denominator), else gets (None, None) with a warning (the figures that need a spec are left
  out; e.g. the sampler's roofline on the measured bandwidth still stands)."""
  import jax
  from persyn_jax.device_peaks import device_peaks
  d = jax.devices()[0]
  if d.platform == "cpu":
    return None, None
  flops, hbm = device_peaks(d.device_kind)
  if flops is None:
    msg = (f"device kind {d.device_kind!r} ({d.platform}) has no spec peak in "
           "persyn_jax/device_peaks.py PEAKS: add its dense bf16 FLOP/s and HBM bytes/s there")
    if required:
      raise SystemExit(msg + ", or its MFU cannot be computed")
    warnings.warn(msg)
    print("WARNING:", msg + "; the figures that need them are left out", flush=True)
  return flops, hbm


def measured_matmul_peak(dtype="float32", n: int = 1024, reps: int = 10) -> float:
  """FLOP/s of a square n x n matmul in JAX on this machine: the MFU denominator of a CPU, which
  has no spec-sheet peak."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def torch_device_for(jax_platform: str, cuda_available: bool) -> str:
  """The device of the torch anchor: the one JAX measures on. A GPU run whose torch has no CUDA
  (the CPU wheel of pyproject.toml's test extra) stops here, rather than timing torch on the host
  CPU against JAX on the GPU; a TPU host has no torch device (--no-torch)."""
  if jax_platform == "cpu":
    return "cpu"
  if jax_platform == "gpu" and cuda_available:
    return "cuda"
  why = ("this torch has no CUDA (torch.cuda.is_available() is False): install a CUDA build"
         if jax_platform == "gpu" else "torch has no device here")
  raise SystemExit(f"JAX runs on {jax_platform!r} but {why}, or pass --no-torch")


def torch_device() -> str:
  """torch_device_for this machine's JAX platform and torch."""
  import jax
  import torch
  return torch_device_for(jax.devices()[0].platform, torch.cuda.is_available())


def write_json(path: str, result: dict) -> str:
  result = {**result, "host_malloc": dict(persyn_jax.host_malloc.STATE)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=str)
  print(f"wrote {path}")
  return path


def results_path(name: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def fmt_spread(s: dict | None, scale: float = 1.0, unit: str = "") -> str:
  """'median [min-max]' of a spread, times scale."""
  if not s:
    return "-"
  return f"{s['median'] * scale:.3g}{unit} [{s['min'] * scale:.3g}-{s['max'] * scale:.3g}]"
