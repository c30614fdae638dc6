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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tok():
  return tiny.tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tok):
  """model_dir(arch, classifier=False, seed=0, **overrides) -> (path, torch model); cached."""
  cache = {}

  def make(arch, classifier=False, seed=0, **overrides):
    key = (arch, classifier, seed, tuple(sorted(overrides.items())))
    if key not in cache:
      path = str(tmp_path_factory.mktemp(f"{arch}{'_cls' if classifier else ''}"))
      cache[key] = (path, tiny.make_model(arch, path, tok, seed=seed, classifier=classifier,
                                          **overrides))
    return cache[key]

  return make


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
  """The toy world at its small scale, built once per session (teachers trained by our SFT)."""
  from persyn_jax import toyworld
  cache = os.environ.get("PERSYN_JAX_TEST_WORLD") or str(tmp_path_factory.mktemp("small_world"))
  return toyworld.build("small", 0, cache, log=lambda m: None)
