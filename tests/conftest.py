"""Test setup: 8 fake CPU devices (set before jax is imported), tiny models built once per session."""
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One compilation cache per test session: identical programs (same model shapes in several tests,
# subprocesses of the pipeline tests) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="persyn_jax_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Toy worlds are built once per test run, shared by the xdist workers (inherited from the
# controller process) under a lock.
os.environ.setdefault("PERSYN_JAX_TEST_WORLDS", tempfile.mkdtemp(prefix="persyn_jax_worlds_"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tok():
  import tiny  # torch is the reference: imported only by the tests that need it
  return tiny.tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tok):
  """model_dir(arch, classifier=False, seed=0, **overrides) -> (path, torch model); cached."""
  import tiny
  cache = {}

  def make(arch, classifier=False, seed=0, **overrides):
    key = (arch, classifier, seed, tuple(sorted(overrides.items())))
    if key not in cache:
      path = str(tmp_path_factory.mktemp(f"{arch}{'_cls' if classifier else ''}"))
      cache[key] = (path, tiny.make_model(arch, path, tok, seed=seed, classifier=classifier,
                                          **overrides))
    return cache[key]

  return make


def build_world(scale: str):
  """The toy world at `scale` (seed 0), built by the first worker that asks, then cached."""
  import fcntl

  from persyn_jax.toyworld.build import build
  root = os.environ["PERSYN_JAX_TEST_WORLDS"]
  with open(os.path.join(root, f".lock-{scale}"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      return build(scale, 0, root, log=lambda m: None)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_world():
  return build_world("tiny")


@pytest.fixture(scope="session")
def small_world():
  """The toy world at its small scale (teachers trained by our SFT)."""
  return build_world("small")
