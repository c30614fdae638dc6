"""Packed scoring (scoring.packing, the default) gives the scores of the padded path and of
transformers/torch, with less padding and the LM head on response tokens only.

The pairs here are many and of mixed lengths, so rows hold several segments (a wrong position
restart, segment mask or per-segment split would move a score by > 1e-2). Tolerance 2e-5 as in
test_scoring.py: fp32 forwards of a 2-layer model agree to ~1e-6.
"""
import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from persyn_jax import scoring
from persyn_jax.data.batches import pack_decreasing
from persyn_jax.runtime.buckets import bucket_lengths
from test_scoring import PROMPTS, RESPONSES, reference_ids, torch_learnability

TOL = 2e-5
WORDS = "one two three apples model tiny answer seven the is a of to".split()


def mixed_pairs(n=24, seed=0):
  rng = np.random.default_rng(seed)
  prompts, responses = list(PROMPTS), list(RESPONSES)
  for _ in range(n - len(prompts)):
    prompts.append(" ".join(rng.choice(WORDS, rng.integers(1, 6))))
    responses.append(" ".join(rng.choice(WORDS, rng.integers(1, 16))))
  return prompts, responses


PACKED = scoring.ScoringConfig(dtype="float32", max_len=128, min_bucket=32, batch_tokens=256, pack_len=128,
                               max_batch_size=8, logits_chunk=24)
PADDED = dataclasses.replace(PACKED, packing=False)


def test_pack_decreasing_places_every_item_once_in_bucket_rows():
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, 200, size=300)
  buckets = bucket_lengths(200, 16)
  rows = pack_decreasing(lengths, buckets)
  seen = sorted(i for _, items in rows for i in items)
  assert seen == list(range(300))
  for length, items in rows:
    assert length in buckets and lengths[items].sum() <= length
    assert length == min(b for b in buckets if b >= lengths[items[0]])
  used = sum(length for length, _ in rows)
  padded = sum(min(b for b in buckets if b >= n) for n in lengths)  # one bucket row per item
  # uniform lengths leave few short items to fill the long rows: ~93% fill here
  assert used < 0.95 * padded and lengths.sum() / used > 0.9
  with pytest.raises(ValueError, match="item 0 has length 201"):
    pack_decreasing([201], buckets)


def test_packed_batches_gather_exactly_the_response_targets(tok):
  prompts, responses = mixed_pairs()
  pairs = [scoring.chat.pair_ids(tok, p, r) for p, r in zip(prompts, responses)]
  seen, shapes = [], {}
  for group, batch in scoring.packed_batches(pairs, PACKED):
    R, L = batch["input_ids"].shape
    shapes.setdefault(L, set()).add(batch["response_index"].shape[1])
    for r, items in enumerate(group):
      seen += items
      want = []
      for i in items:
        ids, mask = pairs[i]
        want += [ids[t] for t in range(1, len(ids)) if mask[t]]
      k = len(want)
      np.testing.assert_array_equal(batch["response_targets"][r, :k], want)
      assert (batch["loss_mask"][r, batch["response_index"][r, :k]] == 1).all()
      assert batch["loss_mask"][r].sum() == k
      last = batch["last_index"][r, :len(items)]
      assert (batch["segment_ids"][r, last] == np.arange(1, len(items) + 1)).all()
  assert sorted(seen) == list(range(len(pairs)))
  assert all(len(ks) == 1 for ks in shapes.values())  # one response width per row length


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_packed_learnability_equals_padded_and_torch(model_dir, arch):
  path, tmodel = model_dir(arch)
  prompts, responses = mixed_pairs()
  packed, pstats = scoring.LogProbScorer.from_pretrained(path, PACKED).learnability(prompts,
                                                                                    responses)
  padded, qstats = scoring.LogProbScorer.from_pretrained(path, PADDED).learnability(prompts,
                                                                                    responses)
  want = torch_learnability(tmodel, AutoTokenizer.from_pretrained(path), prompts, responses)
  np.testing.assert_allclose(packed, want, atol=TOL, rtol=0)
  np.testing.assert_allclose(packed, padded, atol=TOL, rtol=0)
  assert pstats["response_tokens"] == qstats["response_tokens"]
  assert pstats["tokens"] == qstats["tokens"]
  assert pstats["padded_tokens"] < qstats["padded_tokens"]
  assert pstats["batches"] < qstats["batches"]


def test_packed_reward_equals_padded_and_torch(model_dir):
  path, tmodel = model_dir("qwen2", classifier=True)
  tok = AutoTokenizer.from_pretrained(path)
  prompts, responses = mixed_pairs(10, seed=2)
  packed, _ = scoring.RewardScorer.from_pretrained(path, PACKED).score(prompts, responses)
  padded, _ = scoring.RewardScorer.from_pretrained(path, PADDED).score(prompts, responses)
  want = []
  for p, r in zip(prompts, responses):
    ids, _ = reference_ids(tok, p, r)
    with torch.no_grad():
      want.append(tmodel(torch.tensor([ids])).logits[0, 0].item())
  np.testing.assert_allclose(packed, want, atol=TOL, rtol=1e-5)
  np.testing.assert_allclose(packed, padded, atol=TOL, rtol=1e-5)
  assert np.ptp(want) > 1e-3


def test_packed_overlong_skip_leaves_nan(model_dir):
  path, _ = model_dir("llama")
  cfg = dataclasses.replace(PACKED, max_len=48, min_bucket=16, overlong="skip")
  prompts = ["hello world, how are you today? " * 6, PROMPTS[0]]
  responses = ["Once upon a time there was a tiny model. " * 3, RESPONSES[0]]
  got, stats = scoring.LogProbScorer.from_pretrained(path, cfg).learnability(prompts, responses)
  assert stats["skipped"] == 1 and stats["scored"] == 1
  assert np.isnan(got[0]) and np.isfinite(got[1])
