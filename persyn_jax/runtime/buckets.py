"""Length buckets: variable-length token sequences into a few fixed [rows, length] batch shapes.

The sampler, the scorers and the router run one jitted function per batch; padding every batch
to one of a handful of bucket lengths (and row counts) means each shape compiles once and is
reused for the whole run. Scoring and routing sort sequences by length first (a batch holds
sequences of similar length, little is padding); the sampler keeps input order within a bucket
(its per-bucket batches stay the same whatever the other prompts are). Pure numpy, no jax.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np


def bucket_lengths(max_len: int, min_bucket: int = 64, *, round_up: bool = False) -> list[int]:
  """Bucket lengths min_bucket, 1.5x, 2x, 3x, 4x, ... (at most a third of a row is padding), capped
  by and ending at max_len. An odd min_bucket's 1.5x is rounded down, or up with `round_up` (the
  sampler's buckets); the other lengths are whole."""
  if max_len < 1 or min_bucket < 1:
    raise ValueError(f"max_len={max_len}, min_bucket={min_bucket}: both must be >= 1")
  out, b = [], min_bucket
  while b < max_len:
    out += [b, b + (b + 1) // 2 if round_up else b + b // 2]
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


def bucket_of(n: int, buckets: Sequence[int]) -> int:
  """The smallest of the (sorted) bucket lengths that holds n tokens."""
  i = int(np.searchsorted(np.asarray(buckets), n, side="left"))
  if i == len(buckets):
    raise ValueError(f"a sequence of {n} tokens exceeds the largest bucket {buckets[-1]}")
  return int(buckets[i])


@dataclasses.dataclass(frozen=True)
class Batch:
  indices: np.ndarray  # [n] positions in the input list of the sequences of this batch
  rows: int  # rows of the padded batch (>= n)
  length: int  # bucket length


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def plan_batches(lengths: Sequence[int], buckets: Sequence[int], *, batch_tokens: int | None = None,
                 max_batch_size: int | None = None, batch_size: int | None = None,
                 multiple: int = 1, order: Literal["length", "input"] = "length") -> list[Batch]:
  """Groups sequences (by index) into batches of one bucket length each, buckets shortest first.

  order: "length" sorts the sequences by length (stable) before cutting a bucket into batches
    (scoring, routing); "input" keeps a bucket's sequences in input order (the sampler).
  Rows of a full batch, given either
    batch_tokens (and max_batch_size): batch_tokens // length, clipped to [multiple,
      max_batch_size] and rounded down to a multiple of `multiple` (the number of batch shards);
      the last batch of a bucket gets `multiple` x the next power of two of its rows per shard;
    batch_size: batch_size rounded up to a multiple of `multiple`, whatever the length; the last
      batch of a bucket gets the next power of two of its rows, rounded up to a multiple.
  (The two tails agree when `multiple` is a power of two.) Powers of two keep the number of
  compiled shapes small, and a short tail does not pay for a full batch.
  """
  if (batch_tokens is None) == (batch_size is None):
    raise ValueError("plan_batches: give exactly one of batch_tokens and batch_size")
  if batch_tokens is not None and max_batch_size is None:
    raise ValueError("plan_batches: batch_tokens needs max_batch_size")
  if order not in ("length", "input"):
    raise ValueError(f"plan_batches: order={order!r}, expected length or input")
  lengths = np.asarray(lengths, dtype=np.int64)
  buckets = sorted(buckets)
  if lengths.size and lengths.max() > buckets[-1]:
    raise ValueError(f"a sequence of {lengths.max()} tokens exceeds the largest bucket {buckets[-1]}")
  seq = np.argsort(lengths, kind="stable") if order == "length" else np.arange(lengths.size)
  which = np.searchsorted(np.asarray(buckets), lengths[seq], side="left")
  out = []
  for b, length in enumerate(buckets):
    idx = seq[which == b]
    if not idx.size:
      continue
    if batch_size is not None:
      full = -(-batch_size // multiple) * multiple
    else:
      full = max(multiple, min(max_batch_size, batch_tokens // length) // multiple * multiple)
    for s in range(0, idx.size, full):
      chunk = idx[s:s + full]
      rows = full
      if chunk.size < full:
        if batch_size is not None:
          rows = -(-min(full, _pow2(chunk.size)) // multiple) * multiple
        else:
          rows = min(full, multiple * _pow2(-(-chunk.size // multiple)))
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
