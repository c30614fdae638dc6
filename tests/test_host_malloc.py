"""persyn_jax.host_malloc: XLA:CPU's per-call scratch stays mapped on a CPU-only host, and the
rule for when the malloc settings are made."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap

import pytest

from persyn_jax import host_malloc as hm

# one compiled call with a scratch buffer of 128 MB (above glibc's 64 MB per-thread heap), run
# 41 times; the minor page faults of each call after the first
PROGRAM = textwrap.dedent("""
  import json, resource
  import persyn_jax
  from persyn_jax import host_malloc
  import jax, jax.numpy as jnp
  f = jax.jit(lambda x: (x * 2.0 + 1.0).T @ jnp.ones((8192, 2), jnp.float32))
  x = jnp.ones((8192, 4096), jnp.float32)
  temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
  first = f(x).block_until_ready()
  faults = []
  for _ in range(40):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    again = f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
  print(json.dumps({"state": host_malloc.STATE, "temp_bytes": temp, "faults": faults,
                    "sum": float(again.sum()), "same": bool((first == again).all())}))
""")


def run_program(**env) -> dict:
  full = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
  out = subprocess.run([sys.executable, "-c", PROGRAM], env=full, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hm.platform.libc_ver()[0] == "glibc"),
                    reason="the settings are glibc's")
def test_a_cpu_only_process_does_not_fault_its_scratch_in_again_on_every_call():
  on, off = run_program(), run_program(PERSYN_JAX_HOST_MALLOC="off")
  assert on["state"] == {"applied": True, "reason": "JAX_PLATFORMS=cpu"}
  assert off["state"] == {"applied": False, "reason": "PERSYN_JAX_HOST_MALLOC=off"}
  pages = on["temp_bytes"] / 4096
  assert on["temp_bytes"] > 64 * 2**20
  # without the settings each call maps its scratch afresh and touches every page of it; with
  # them the heap grows over some of the first calls (a call's scratch may be freed only after
  # the next call has taken its own), then the calls reuse what is mapped
  assert min(off["faults"]) > 0.5 * pages
  assert statistics.median(on["faults"]) < 0.01 * pages
  assert sum(on["faults"]) < 0.5 * sum(off["faults"])
  assert on["same"] and off["same"] and on["sum"] == off["sum"] == 2 * 4096 * 8192 * 3.0


@pytest.mark.parametrize("mode, platforms, accel, started, glibc, applied, why", [
    ("off", "cpu", False, False, True, False, "PERSYN_JAX_HOST_MALLOC=off"),
    ("auto", None, False, False, False, False, "not glibc"),
    ("on", None, True, True, True, False, "a JAX backend had started"),
    ("on", "tpu", True, False, True, True, "PERSYN_JAX_HOST_MALLOC=on"),
    ("auto", "cpu", True, False, True, True, "JAX_PLATFORMS=cpu"),
    ("auto", "cuda,cpu", False, False, True, False, "not CPU only"),
    ("AUTO", "tpu", False, False, True, False, "not CPU only"),
    ("auto", None, True, False, True, False, "accelerator backend is installed"),
    ("auto", "", False, False, True, True, "CPU only (no accelerator backend installed)"),
])
def test_the_settings_are_made_only_on_a_cpu_only_glibc_host_before_jax_starts(
    mode, platforms, accel, started, glibc, applied, why):
  got, reason = hm.decide(mode, platforms, accel, started, glibc)
  assert got is applied
  assert why in reason


def test_a_bad_setting_names_the_variable_and_the_value():
  with pytest.raises(ValueError, match=r"PERSYN_JAX_HOST_MALLOC='sometimes'.*auto, on or off"):
    hm.decide("sometimes", None, False, False, True)
