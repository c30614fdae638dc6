"""Keeps XLA:CPU's per-call scratch memory mapped from one call to the next (glibc malloc settings).

XLA:CPU gives every call of a compiled program one scratch buffer for its temporaries (about 200
MB for the SFT step of `bench/sft.py --preset cpu`), allocated with posix_memalign by one of the
CPU client's worker threads. glibc serves a request above 64 MB in a worker thread's arena with a
fresh mmap, and frees it with munmap, so every call faults its whole scratch in again: 50,000
minor page faults and 0.17 s of kernel time per step of that benchmark, about a fifth of the
step's CPU time. With one malloc arena (M_ARENA_MAX = 1), no mmap for large requests
(M_MMAP_MAX = 0) and no trimming of the heap's top (M_TRIM_THRESHOLD), the scratch comes from the
main heap and stays mapped: no page faults after the first call, and the CPU SFT step about a
fifth faster (docs/PERFORMANCE.md).

The settings are made when the package is imported, and only where they help and can work:
  - Linux with glibc;
  - JAX will compute on the CPU: JAX_PLATFORMS names cpu alone, or (unset) no accelerator is
    installed (no libtpu, no JAX CUDA/ROCm plugin);
  - before JAX has started a backend: a thread picks its arena at its first allocation, so a
    setting made after the CPU client's threads exist does not reach them.
PERSYN_JAX_HOST_MALLOC=auto (the default), on or off overrides the second condition (off: never).
The price: memory the process frees stays with it (its resident size is its high-water mark),
which on a CPU run is the size of its largest stage.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys

ENV_VAR = "PERSYN_JAX_HOST_MALLOC"
# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = {"M_ARENA_MAX": (M_ARENA_MAX, 1), "M_MMAP_MAX": (M_MMAP_MAX, 0),
            "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1)}
ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin")

# what `apply` did: {"applied": bool, "reason": str}; read by the benchmarks, which record it
STATE: dict = {"applied": False, "reason": "not tried"}


def accelerator_installed() -> bool:
  """Whether a JAX accelerator backend is installed (found without importing it)."""
  if any(importlib.util.find_spec(m) is not None for m in ACCELERATOR_MODULES):
    return True
  try:
    import jax_plugins  # namespace package of the PJRT plugins (e.g. jax_plugins.xla_cuda12)
  except ImportError:
    return False
  import pkgutil
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def decide(mode: str, jax_platforms: str | None, accelerator: bool, backends_started: bool,
           glibc: bool) -> tuple[bool, str]:
  """(apply?, why) for the setting `mode` of PERSYN_JAX_HOST_MALLOC and the process's facts."""
  mode = (mode or "auto").strip().lower()
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"{ENV_VAR}={mode!r}: expected auto, on or off")
  if mode == "off":
    return False, f"{ENV_VAR}=off"
  if not glibc:
    return False, "not glibc"
  if backends_started:
    return False, "a JAX backend had started before persyn_jax was imported"
  if mode == "on":
    return True, f"{ENV_VAR}=on"
  platforms = [p.strip() for p in (jax_platforms or "").split(",") if p.strip()]
  if platforms:
    return (platforms == ["cpu"],
            f"JAX_PLATFORMS={jax_platforms}" + ("" if platforms == ["cpu"] else ": not CPU only"))
  if accelerator:
    return False, "an accelerator backend is installed"
  return True, "CPU only (no accelerator backend installed)"


def _backends_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # a JAX without that function: assume the worst
    return True


def apply() -> dict:
  """Makes the settings when `decide` says so; returns (and keeps in STATE) what it did."""
  glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
  ok, why = decide(os.environ.get(ENV_VAR, "auto"), os.environ.get("JAX_PLATFORMS"),
                   accelerator_installed() if glibc else False,
                   _backends_started(), glibc)
  if ok:
    mallopt = ctypes.CDLL(None).mallopt
    failed = [name for name, (param, value) in SETTINGS.items() if mallopt(param, value) != 1]
    if failed:
      ok, why = False, f"mallopt refused {failed}"
  STATE.update(applied=ok, reason=why)
  return dict(STATE)
