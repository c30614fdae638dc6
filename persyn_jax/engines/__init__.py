"""Teacher engines: where a teacher's responses come from.

`jax` is the in-process sampler (persyn_jax.sampling). `openai` sends the prompts to a server that
speaks the OpenAI chat completions API (vLLM, SGLang, JetStream, or `python -m persyn_jax.serve`)
and writes the same records and shards:

    cfg = OpenAIEngineConfig(url="http://10.0.0.5:8000/v1", model="qwen-72b",
                             api_key_env="TEACHER_KEY", concurrency=32)
    manifest = generate_openai_to_records(cfg, prompts, sampling, out_dir, "probe-qwen-72b",
                                          teacher="qwen-72b", records_per_shard=4096)
    run_teachers([TeacherJob(cfg, prompts, sampling, out_dir, stage, name), ...])  # all at once

The client never starts a jax backend: a client process needs no accelerator.
"""
from __future__ import annotations

from typing import Any, Mapping

from persyn_jax.engines.openai import (Client, EngineError, OpenAIEngineConfig, endpoint,
                                       request_seed, wait_ready)
from persyn_jax.engines.progress import ProgressError, ProgressLog
from persyn_jax.engines.records import (StageError, TeacherJob, generate_openai_to_records,
                                        progress_path, run_teachers)

ENGINES = ("jax", "openai")

__all__ = ["ENGINES", "Client", "EngineError", "OpenAIEngineConfig", "ProgressError",
           "ProgressLog", "StageError", "TeacherJob", "endpoint", "engine_config",
           "generate_openai_to_records", "progress_path", "request_seed", "run_teachers",
           "wait_ready"]


def engine_config(engine: str, openai: OpenAIEngineConfig | Mapping[str, Any] | None,
                  where: str = "teacher") -> OpenAIEngineConfig | None:
  """The checked engine setting of a teacher: None for `jax` (the in-process sampler), the
  OpenAIEngineConfig for `openai` (a mapping is read as its fields, e.g. from YAML)."""
  if engine not in ENGINES:
    raise ValueError(f"{where}.engine={engine!r}: expected one of {list(ENGINES)}")
  if engine == "jax":
    if openai is not None:
      raise ValueError(f"{where}.openai is set but {where}.engine is 'jax' (set engine: openai)")
    return None
  if openai is None:
    raise ValueError(f"{where}.engine is 'openai' but {where}.openai (url, model, ...) is missing")
  if isinstance(openai, OpenAIEngineConfig):
    return openai
  from persyn_jax.config import from_dict
  return from_dict(OpenAIEngineConfig, openai, f"{where}.openai")
