"""Length buckets: variable-length token sequences into a few fixed [rows, length] batch shapes.

Scoring and routing run one jitted forward per batch; padding every batch to one of a handful of
bucket lengths (and row counts) means each shape compiles once and is reused for the whole run.
Sequences are sorted by length first, so a batch holds sequences of similar length and little is
padding. Pure numpy, no jax.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def bucket_lengths(max_len: int, min_bucket: int = 64) -> list[int]:
  """Bucket lengths min_bucket, 1.5x, 2x, 3x, 4x, ... (at most a third of a row is padding), capped
  by and ending at max_len."""
  if max_len < 1 or min_bucket < 1:
    raise ValueError(f"max_len={max_len}, min_bucket={min_bucket}: both must be >= 1")
  out, b = [], min_bucket
  while b < max_len:
    out += [b, b + b // 2]
    b *= 2
  out = sorted(x for x in set(out) if x < max_len)
  out.append(max_len)
  return out


def fit_prompt_response(ids: Sequence[int], response_mask: Sequence[int], max_len: int,
                        min_prompt_tokens: int) -> tuple[list[int], list[int]]:
  """Cuts a (prompt, response) pair longer than max_len: the prompt keeps its *tail* (the tokens
  the response follows, and the chat template's generation prompt), the response its *head*.

  The prompt keeps min(prompt, max(room left by the response, min_prompt_tokens, 1)) tokens, so a
  response longer than max_len is still scored in the context of the end of its prompt.
  """
  ids, mask = list(ids), list(response_mask)
  if len(ids) <= max_len:
    return ids, mask
  p = mask.index(1) if 1 in mask else len(ids)
  r = len(ids) - p
  keep_p = min(p, max(max_len - r, min(min_prompt_tokens, max_len - 1), 1))
  keep_r = max_len - keep_p
  return ids[p - keep_p:p] + ids[p:p + keep_r], [0] * keep_p + [1] * min(keep_r, r)


@dataclasses.dataclass(frozen=True)
class Batch:
  indices: np.ndarray  # [n] positions in the input list of the sequences of this batch
  rows: int  # rows of the padded batch (>= n)
  length: int  # bucket length


def plan_batches(lengths: Sequence[int], buckets: Sequence[int], *, batch_tokens: int,
                 max_batch_size: int, multiple: int = 1) -> list[Batch]:
  """Groups sequences (by index) into batches of one bucket length each.

  A full batch has rows = batch_tokens // length (clipped to [multiple, max_batch_size], rounded
  down to a multiple of `multiple`, the number of batch shards). The last batch of a bucket is
  rounded up to a power of two (times `multiple`) instead, so few shapes are compiled and a short
  tail does not pay for a full batch.
  """
  lengths = np.asarray(lengths, dtype=np.int64)
  buckets = sorted(buckets)
  if lengths.size and lengths.max() > buckets[-1]:
    raise ValueError(f"a sequence of {lengths.max()} tokens exceeds the largest bucket {buckets[-1]}")
  order = np.argsort(lengths, kind="stable")
  which = np.searchsorted(np.asarray(buckets), lengths[order], side="left")
  out = []
  for b, length in enumerate(buckets):
    idx = order[which == b]
    if not idx.size:
      continue
    full = max(multiple, min(max_batch_size, batch_tokens // length) // multiple * multiple)
    for s in range(0, idx.size, full):
      chunk = idx[s:s + full]
      rows = full
      if chunk.size < full:
        per_shard = -(-chunk.size // multiple)
        rows = min(full, multiple * (1 << (per_shard - 1).bit_length()))
      out.append(Batch(chunk, rows, length))
  return out


def pad_rows(seqs: Sequence[Sequence[int]], rows: int, length: int, pad_id: int = 0,
             masks: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
  """Right-padded [rows, length] arrays: `input_ids`, `segment_ids` (1 on tokens, 0 on padding,
  whole padding rows included), and, given response masks, the SFT batch's `targets`
  (targets[t] = input_ids[t+1]) and `loss_mask` (1 where targets[t] is a response token)."""
  ids = np.full((rows, length), pad_id, np.int32)
  seg = np.zeros((rows, length), np.int32)
  out = {"input_ids": ids, "segment_ids": seg}
  if masks is not None:
    out["targets"] = np.zeros((rows, length), np.int32)
    out["loss_mask"] = np.zeros((rows, length), np.float32)
  for i, s in enumerate(seqs):
    n = len(s)
    ids[i, :n] = s
    seg[i, :n] = 1
    if masks is not None:
      out["targets"][i, :n - 1] = s[1:]
      out["loss_mask"][i, :n - 1] = np.asarray(masks[i][1:], np.float32)
  return out
