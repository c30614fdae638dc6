"""Hand-made SFT batches in the data layer's contract (common.md), for the SFT tests.

`pack` lays tokenized (ids, response_mask) examples into rows greedily; the tests below pin the
contract itself, so a mistake here cannot hide a mistake in the trainer.
"""
import numpy as np

from persyn_jax.data.chat import pair_ids

PROMPTS = ["2+2?", "3*3?", "name a fruit", "say hi", "7-5?", "count to 3", "a colour?", "1+1?",
           "capital of France?", "opposite of up?", "9/3?", "a pet?"]
RESPONSES = ["4", "9", "apple", "hi", "2", "1 2 3", "red", "2", "Paris", "down", "3", "cat"]


def examples(tok, n=8, offset=0):
  """n (ids, response_mask) pairs from the model's chat template (pair_ids)."""
  out = []
  for i in range(offset, offset + n):
    j = i % len(PROMPTS)
    out.append(pair_ids(tok, PROMPTS[j], RESPONSES[j]))
  return out


def empty(rows, seq):
  b = {k: np.zeros((rows, seq), np.int32) for k in ("input_ids", "segment_ids", "positions", "targets")}
  b["loss_mask"] = np.zeros((rows, seq), np.float32)
  return b


def pack(exs, rows, seq, *, per_row=None):
  """Greedy packing: an example goes into the current row if it fits (and the row has fewer than
  `per_row` examples), else into the next row. Unused slots are padding (segment 0)."""
  b = empty(rows, seq)
  r, o, s = 0, 0, 0
  for ids, mask in exs:
    n = len(ids)
    if n > seq:
      raise ValueError(f"example of {n} tokens does not fit seq {seq}")
    if o + n > seq or (per_row and s >= per_row):
      r, o, s = r + 1, 0, 0
    if r >= rows:
      raise ValueError("examples do not fit the batch")
    s += 1
    sl = slice(o, o + n)
    b["input_ids"][r, sl] = ids
    b["segment_ids"][r, sl] = s
    b["positions"][r, sl] = np.arange(n)
    # targets[t] = ids[t+1] inside the segment; the last token of a segment predicts nothing
    b["targets"][r, o:o + n - 1] = ids[1:]
    b["loss_mask"][r, o:o + n - 1] = np.asarray(mask[1:], np.float32)
    o += n
  return b


def batches(tok, n_batches, rows, seq, *, per_row=2, offset=0):
  """Distinct batches (consecutive examples), per_row examples packed in each row."""
  k = rows * per_row
  return [pack(examples(tok, k, offset + i * k), rows, seq, per_row=per_row)
          for i in range(n_batches)]


def test_pack_follows_the_contract(tok):
  exs = examples(tok, 4)
  b = pack(exs, 2, 64, per_row=2)
  ids0, m0 = exs[0]
  n0, n1 = len(exs[0][0]), len(exs[1][0])
  assert list(b["input_ids"][0, :n0]) == ids0
  assert list(b["segment_ids"][0, :n0 + n1 + 1]) == [1] * n0 + [2] * n1 + [0]
  assert b["positions"][0, n0] == 0 and b["positions"][0, n0 + n1 - 1] == n1 - 1
  # a segment's last token has no target and no loss; response tokens are predicted from t-1
  assert b["loss_mask"][0, n0 - 1] == 0 and b["targets"][0, n0 - 1] == 0
  assert b["loss_mask"][0, :n0 - 1].sum() == sum(m0) and m0[0] == 0
  assert np.all(b["targets"][0, :n0 - 1] == ids0[1:])
