"""`SamplingConfig` (the sampler's stage config) and `GenerationResult` (one response)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from persyn_jax.config import check_dtype
from persyn_jax.sharding import MeshConfig

FINISH_REASONS = ("stop", "length", "skipped")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How teachers sample. Defaults follow the paper (temperature 0.7, top-p 0.95).

  stop_token_ids: None = the tokenizer's EOS plus the model config's eos ids (which include
    generation_config.json's; transformers' generate stops on generation_config.json's alone
    when the file exists); () = no stop token (always max_new_tokens tokens).
  stop_strings: checked on the decoded text after generation; the text is cut before the first one.
  batch_size: rows (prompt x sample) per compiled batch; padded up to a multiple of the mesh's
    data x fsdp size. Smaller final batches use the next power of two.
  max_prompt_len: prompt tokens (after the chat template); longer prompts are cut from the left
    (`overlong="truncate_left"`, keeping the generation prompt) or not generated
    (`overlong="skip"`, finish_reason "skipped").
  min_bucket: the shortest prompt bucket; buckets are min_bucket * 2^n and 1.5x that (rounded
    up), up to max_prompt_len.
  cache_dtype: "auto" = the model's compute dtype.
  mesh: the sampling stage's own mesh; None = the run's mesh.
  batching: "continuous" = batch_size decode slots, each refilled with the next waiting prompt
    as soon as its row stops (sampling/slots.py); "static" = batches of batch_size rows that
    decode until their longest row ends. Both give the same responses.
  decode_chunk: continuous batching's decode steps per host check (the host looks for free
    slots between chunks; a chunk also ends early once enough slots are free).
  """

  max_new_tokens: int = 512
  temperature: float = 0.7
  top_k: int = 0
  top_p: float = 0.95
  seed: int = 0
  num_samples: int = 1
  stop_token_ids: tuple[int, ...] | None = None
  stop_strings: tuple[str, ...] = ()
  batch_size: int = 64
  max_prompt_len: int = 1024
  overlong: Literal["truncate_left", "skip"] = "truncate_left"
  system_prompt: str | None = None
  min_bucket: int = 16
  cache_dtype: str = "auto"
  mesh: MeshConfig | None = None
  batching: Literal["continuous", "static"] = "continuous"
  decode_chunk: int = 16

  def __post_init__(self):
    checks = [
        ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
        ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
        ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
        ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)"),
        ("seed", 0 <= self.seed < 2 ** 32, "must be in [0, 2^32)"),
        ("num_samples", self.num_samples >= 1, "must be >= 1"),
        ("batch_size", self.batch_size >= 1, "must be >= 1"),
        ("max_prompt_len", self.max_prompt_len >= 1, "must be >= 1"),
        ("overlong", self.overlong in ("truncate_left", "skip"), "must be truncate_left or skip"),
        ("min_bucket", self.min_bucket >= 1, "must be >= 1"),
        ("batching", self.batching in ("continuous", "static"), "must be continuous or static"),
        ("decode_chunk", self.decode_chunk >= 1, "must be >= 1"),
        ("stop_strings", all(isinstance(s, str) and s for s in self.stop_strings),
         "must be non-empty strings"),
    ]
    for name, ok, why in checks:
      if not ok:
        raise ValueError(f"sampling.{name}={getattr(self, name)!r}: {why}")
    check_dtype(self.cache_dtype, "sampling.cache_dtype", also=("auto",))
    # lists from YAML or callers become tuples, so the config stays hashable
    if self.stop_token_ids is not None:
      object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
    object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

  def replace(self, **kw) -> "SamplingConfig":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """One sampled response.

  token_ids: the response tokens, up to and including the stop token when one ended it (as
    transformers' generate returns them); when a stop string ended it, the longest token prefix
    whose decoded text is a prefix of `text` (so nothing from the stop string on).
  text: the response decoded without special tokens, cut before the first stop string.
  finish_reason: "stop" (stop token or stop string), "length" (max_new_tokens reached) or
    "skipped" (prompt longer than max_prompt_len with overlong="skip": empty response).
  stop: the stop token id or stop string that ended the response, else None.
  truncated: the prompt was cut from the left to max_prompt_len.
  """

  index: int
  sample: int
  text: str
  token_ids: tuple[int, ...]
  finish_reason: str
  prompt_tokens: int
  response_tokens: int
  stop: int | str | None = None
  truncated: bool = False


def summarize(results) -> dict[str, int]:
  """Counts for logs and manifests: results, tokens, and each finish reason."""
  out = {"results": 0, "prompt_tokens": 0, "response_tokens": 0, "truncated": 0}
  out.update({r: 0 for r in FINISH_REASONS})
  for r in results:
    out["results"] += 1
    out[r.finish_reason] += 1
    out["prompt_tokens"] += r.prompt_tokens
    out["response_tokens"] += r.response_tokens
    out["truncated"] += int(r.truncated)
  return out
