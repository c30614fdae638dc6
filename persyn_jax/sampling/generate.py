"""`generate`: prompts in, responses out, in input order.

Host side only: chat template and tokenization, bucketing by prompt length (`runtime.buckets`, in
input order within a bucket), batching, and turning the token arrays that come back into text
(stop strings are applied here, after decoding).
While the device decodes batch n, the host finishes batch n-1 (jax dispatch is asynchronous).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

from persyn_jax.data import chat
from persyn_jax.distributed import to_host  # multi-host: every process gets the whole batch
from persyn_jax.runtime.buckets import bucket_lengths, bucket_of, plan_batches
from persyn_jax.sampling import slots
from persyn_jax.sampling.config import GenerationResult, SamplingConfig
from persyn_jax.sampling.engine import Engine, Static

Prompt = chat.Prompt


def bucket_len(n: int, max_len: int, min_bucket: int = 16) -> int:
  """The padded prompt length for a prompt of n <= max_len tokens: the smallest of min_bucket *
  {1, 1.5, 2, 3, 4, 6, 8, ...} (1.5x rounded up) that holds n, capped at max_len, so padding
  wastes < 1/3 of a batch and a job meets few shapes."""
  return bucket_of(n, prompt_buckets(max_len, min_bucket))


def prompt_buckets(max_len: int, min_bucket: int = 16) -> list[int]:
  return bucket_lengths(max_len, min_bucket, round_up=True)


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
             progress: Callable[[int, int], None] | None = None,
             stats: dict | None = None) -> list[GenerationResult]:
  """Samples `config.num_samples` responses per prompt; returns them in input order (prompt-major).

  prompts: strings (one user turn) or chat message lists; the model's chat template is applied
  with `config.system_prompt`. mesh: default the mesh of the model's parameters.
  indices: the prompt numbers that name the results and seed their random keys (default 0..n-1);
  a prompt's responses depend only on (seed, its index, sample), not on the other prompts.
  progress(rows, response_tokens) is called after every batch (static) or every decode chunk
  that finished rows (continuous).
  config.batching picks the decode loop: "continuous" (slots refilled as rows stop,
  sampling/slots.py) or "static" (one batch at a time); the responses are the same.
  stats: a dict to fill with what the decode did: slot_steps (rows x decode steps run),
  useful_tokens (response tokens among them), useful_fraction.
  """
  if isinstance(prompts, (str, bytes)):
    raise TypeError("prompts must be a sequence of prompts, not one string")
  indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
  if len(indices) != len(prompts):
    raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")
  stops = stop_ids(model, tokenizer, config)
  cache_dtype = str(np.dtype(model.dtype)) if config.cache_dtype == "auto" else config.cache_dtype
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  st = Static(config.max_new_tokens, float(config.temperature), int(config.top_k),
              float(config.top_p), cache_dtype, int(pad))
  tokenized = tokenize(tokenizer, prompts, config)
  n = config.num_samples
  results: list[GenerationResult | None] = [None] * (len(prompts) * n)

  rows_all: list[tuple[int, int]] = []  # (prompt, sample) of every row to generate
  for i, (ids, _, plen) in enumerate(tokenized):
    if ids is None:
      for s in range(n):
        results[i * n + s] = GenerationResult(indices[i], s, "", (), "skipped", plen, 0)
      continue
    rows_all.extend((i, s) for s in range(n))
  if progress is not None and len(prompts) * n > len(rows_all):
    progress(len(prompts) * n - len(rows_all), 0)
  if not rows_all:
    return results  # type: ignore[return-value]

  engine = Engine(model, st, mesh)
  buckets = prompt_buckets(config.max_prompt_len, config.min_bucket)
  # rows keep input order within a bucket: a prompt's batch (hence its result) does not depend on
  # how long the other prompts are
  plan = plan_batches([len(tokenized[i][0]) for i, _ in rows_all], buckets,
                      batch_size=config.batch_size, multiple=engine.runner.shards, order="input")
  # positions follow the prompt's own tokens (prompt_len + i), not its padded bucket
  longest = max(len(tokenized[i][0]) for i, _ in rows_all)
  max_pos = getattr(model.config, "max_position_embeddings", None)
  if max_pos is not None and longest + config.max_new_tokens > max_pos:
    warnings.warn(f"a prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} goes "
                  f"past the model's max_position_embeddings={max_pos}")

  def store(done):  # [(prompt, sample, tokens, stopped)] of finished rows
    done_tokens = 0
    for i, s, ids, stopped in done:
      text, kept, reason, stop = finish(tokenizer, list(ids), stopped, config.stop_strings)
      p_ids, truncated, _ = tokenized[i]
      results[i * n + s] = GenerationResult(indices[i], s, text, tuple(kept), reason, len(p_ids),
                                            len(kept), stop, truncated)
      done_tokens += len(kept)
    if progress is not None:
      progress(len(done), done_tokens)

  if config.batching == "continuous":
    run = slots.run(engine, [ids for ids, _, _ in tokenized], rows_all, prompt_index=indices,
                    seed=config.seed, stop_ids=stops,
                    slots=min(config.batch_size, slots.pow2(len(rows_all))), buckets=buckets,
                    chunk_steps=config.decode_chunk,
                    on_done=lambda out: store([(i, s, t.tolist(), st) for i, s, t, _, st in out]))
    if stats is not None:
      stats.update(slot_steps=run.slot_steps, useful_tokens=run.useful_tokens,
                   useful_fraction=run.useful_fraction, chunks=run.chunks,
                   prefill_rows=run.prefill_rows)
    return results  # type: ignore[return-value]

  slot_steps = useful = 0

  def collect(rows, out):
    nonlocal slot_steps, useful
    tokens, length, stopped = (to_host(x) for x in out)
    # the decode loop ran until its longest row ended, every row of the batch with it
    slot_steps += int(length.max()) * len(length)
    useful += int(length[:len(rows)].sum())
    store([(i, s, tokens[r, :length[r]].tolist(), bool(stopped[r]))
           for r, (i, s) in enumerate(rows)])

  pending = None
  for b in plan:
    rows = [rows_all[j] for j in b.indices]
    ids = np.full((b.rows, b.length), pad, np.int32)
    mask = np.zeros((b.rows, b.length), np.int32)
    pidx = np.zeros((b.rows,), np.uint32)
    sidx = np.zeros((b.rows,), np.uint32)
    for r, (i, s) in enumerate(rows):
      p = tokenized[i][0]
      ids[r, b.length - len(p):] = p
      mask[r, b.length - len(p):] = 1
      pidx[r], sidx[r] = indices[i], s
    out = engine.start(ids, mask, config.seed, pidx, sidx, stops)
    if pending is not None:
      collect(*pending)
    pending = (rows, out)
  collect(*pending)
  if stats is not None:
    stats.update(slot_steps=slot_steps, useful_tokens=useful,
                 useful_fraction=useful / max(1, slot_steps))
  return results  # type: ignore[return-value]
