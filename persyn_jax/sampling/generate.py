"""`generate`: prompts in, responses out, in input order.

Host side only: chat template and tokenization, bucketing by prompt length, batching, and turning
the token arrays that come back into text (stop strings are applied here, after decoding).
While the device decodes batch n, the host finishes batch n-1 (jax dispatch is asynchronous).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np

from persyn_jax.data import chat
from persyn_jax.distributed import to_host  # multi-host: every process gets the whole batch
from persyn_jax.sampling.config import GenerationResult, SamplingConfig
from persyn_jax.sampling.engine import Runner, Static, batch_multiple, model_mesh

Prompt = chat.Prompt


def bucket_len(n: int, max_len: int, min_bucket: int = 16) -> int:
  """The padded prompt length for a prompt of n <= max_len tokens: the smallest of min_bucket *
  {1, 1.5, 2, 3, 4, 6, 8, ...} that holds n, capped at max_len, so padding wastes < 1/3 of a
  batch and a job meets few shapes."""
  b, j = min_bucket, 0
  while b < n:
    b = min_bucket << (j // 2 + 1) if j % 2 else math.ceil(1.5 * (min_bucket << (j // 2)))
    j += 1
  return min(b, max_len)


def batch_rows(n: int, batch_size: int, multiple: int) -> int:
  """Rows of a compiled batch holding n rows: batch_size, or the next power of two for a smaller
  tail; rounded up to `multiple` (the mesh's batch shards)."""
  rows = batch_size if n >= batch_size else min(batch_size, 1 << max(n - 1, 0).bit_length())
  return math.ceil(rows / multiple) * multiple


def stop_ids(model, tokenizer, config: SamplingConfig) -> tuple[int, ...]:
  """The stop token ids: the config's, or (None) the tokenizer's EOS + the model config's eos."""
  if config.stop_token_ids is not None:
    return tuple(config.stop_token_ids)
  ids: list[int] = []
  eos = getattr(model.config, "eos_token_id", None)
  eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
  for i in [getattr(tokenizer, "eos_token_id", None)] + eos:
    if i is not None and int(i) not in ids:
      ids.append(int(i))
  return tuple(ids)


def tokenize(tokenizer, prompts: Sequence[Prompt], config: SamplingConfig
             ) -> list[tuple[list[int] | None, bool, int]]:
  """(prompt ids, truncated, tokens before truncation) per prompt; ids None for a prompt skipped
  as too long."""
  out = []
  for p in prompts:
    ids = chat.prompt_ids(tokenizer, p, config.system_prompt)
    if not ids:
      raise ValueError(f"prompt {p!r} has no tokens")
    if len(ids) <= config.max_prompt_len:
      out.append((ids, False, len(ids)))
    elif config.overlong == "skip":
      out.append((None, False, len(ids)))
    else:  # keep the end: the question's last words and the template's generation prompt
      out.append((ids[-config.max_prompt_len:], True, len(ids)))
  return out


def _trim_to_text(tokenizer, ids: list[int], text: str) -> list[int]:
  """The longest prefix of ids whose decoded text is a prefix of `text`."""
  dec = lambda k: tokenizer.decode(ids[:k], skip_special_tokens=True)
  lo, hi = 0, len(ids)  # decoded length grows with k: bisect to the last k not longer than text
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if len(dec(mid)) <= len(text):
      lo = mid
    else:
      hi = mid - 1
  k = lo
  while k > 0 and not text.startswith(dec(k)):  # a partly decoded character or merged bytes
    k -= 1
  return ids[:k]


def finish(tokenizer, ids: list[int], stopped: bool, stop_strings: tuple[str, ...]
           ) -> tuple[str, list[int], str, int | str | None]:
  """(text, token_ids, finish_reason, stop) of one row's generated tokens."""
  text = tokenizer.decode(ids, skip_special_tokens=True)
  reason = "stop" if stopped else "length"
  stop = ids[-1] if stopped else None
  cut, hit = len(text), None
  for s in stop_strings:
    j = text.find(s)
    if 0 <= j < cut:
      cut, hit = j, s
  if hit is not None:
    text = text[:cut]
    ids = _trim_to_text(tokenizer, ids, text)
    reason, stop = "stop", hit
  return text, ids, reason, stop


def generate(model, tokenizer, prompts: Sequence[Prompt], config: SamplingConfig = SamplingConfig(),
             *, mesh=None, indices: Sequence[int] | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
  """Samples `config.num_samples` responses per prompt; returns them in input order (prompt-major).

  prompts: strings (one user turn) or chat message lists; the model's chat template is applied
  with `config.system_prompt`. mesh: default the mesh of the model's parameters.
  indices: the prompt numbers that name the results and seed their random keys (default 0..n-1);
  a prompt's responses depend only on (seed, its index, sample), not on the other prompts.
  progress(rows, response_tokens) is called after every batch.
  """
  if isinstance(prompts, (str, bytes)):
    raise TypeError("prompts must be a sequence of prompts, not one string")
  indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
  if len(indices) != len(prompts):
    raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")
  mesh = mesh if mesh is not None else model_mesh(model)
  stops = stop_ids(model, tokenizer, config)
  cache_dtype = str(np.dtype(model.dtype)) if config.cache_dtype == "auto" else config.cache_dtype
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  st = Static(config.max_new_tokens, float(config.temperature), int(config.top_k),
              float(config.top_p), cache_dtype, int(pad))
  tokenized = tokenize(tokenizer, prompts, config)
  n = config.num_samples
  results: list[GenerationResult | None] = [None] * (len(prompts) * n)

  buckets: dict[int, list[tuple[int, int]]] = {}  # bucket length -> rows (prompt, sample)
  for i, (ids, _, plen) in enumerate(tokenized):
    if ids is None:
      for s in range(n):
        results[i * n + s] = GenerationResult(indices[i], s, "", (), "skipped", plen, 0)
      continue
    b = bucket_len(len(ids), config.max_prompt_len, config.min_bucket)
    buckets.setdefault(b, []).extend((i, s) for s in range(n))
  if progress is not None and len(prompts) * n > sum(map(len, buckets.values())):
    progress(len(prompts) * n - sum(map(len, buckets.values())), 0)
  if not buckets:
    return results  # type: ignore[return-value]

  runner = Runner(model, st, mesh)
  multiple = batch_multiple(mesh)
  per_batch = math.ceil(config.batch_size / multiple) * multiple
  longest = max(buckets) + config.max_new_tokens
  if longest > getattr(model.config, "max_position_embeddings", longest):
    warnings.warn(f"prompts of {max(buckets)} tokens + max_new_tokens={config.max_new_tokens} go "
                  "past the model's max_position_embeddings="
                  f"{model.config.max_position_embeddings}")

  def collect(rows, out):
    tokens, length, stopped = (to_host(x) for x in out)
    done_tokens = 0
    for r, (i, s) in enumerate(rows):
      ids = tokens[r, :length[r]].tolist()
      text, kept, reason, stop = finish(tokenizer, ids, bool(stopped[r]), config.stop_strings)
      p_ids, truncated, _ = tokenized[i]
      results[i * n + s] = GenerationResult(indices[i], s, text, tuple(kept), reason, len(p_ids),
                                            len(kept), stop, truncated)
      done_tokens += len(kept)
    if progress is not None:
      progress(len(rows), done_tokens)

  pending = None
  for blen in sorted(buckets):
    rows_all = buckets[blen]
    for start in range(0, len(rows_all), per_batch):
      rows = rows_all[start:start + per_batch]
      B = batch_rows(len(rows), per_batch, multiple)
      ids = np.full((B, blen), pad, np.int32)
      mask = np.zeros((B, blen), np.int32)
      pidx = np.zeros((B,), np.uint32)
      sidx = np.zeros((B,), np.uint32)
      for r, (i, s) in enumerate(rows):
        p = tokenized[i][0]
        ids[r, blen - len(p):] = p
        mask[r, blen - len(p):] = 1
        pidx[r], sidx[r] = indices[i], s
      out = runner.start(ids, mask, config.seed, pidx, sidx, stops)
      if pending is not None:
        collect(*pending)
      pending = (rows, out)
  collect(*pending)
  return results  # type: ignore[return-value]
