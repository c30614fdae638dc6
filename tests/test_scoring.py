"""Learnability and reward-model quality equal transformers/torch on the same weights (fp32).

The torch reference loads the directory's tokenizer with transformers' AutoTokenizer, applies its
chat template directly (not via our chat helpers) and computes log-softmax per position in
float64. Tolerance 2e-5: fp32 forward passes
of a 2-layer model agree to ~1e-6; a wrong mask, shift or tokenizer is off by > 1e-2.
"""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import tiny
from persyn_jax import models, scoring
from persyn_jax import sharding as shd
from persyn_jax.runtime.buckets import bucket_lengths, fit_prompt_response, plan_batches
from persyn_jax.tokenizer import train_tokenizer

PROMPTS = [
    "What is 3 + 4?",
    "Tom has 12 apples and gives 5 to Ann. How many are left?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "hi"}, {"role": "user", "content": "count to three"}],
    "def f(x): return x * x",
]
RESPONSES = [
    "The answer is 7.",
    "12 - 5 = 7. The answer is 7 apples.",
    "one two three",
    "It squares a number: f(3) = 9. Once upon a time there was a tiny model.",
]
TOL = 2e-5


def messages(prompt):
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def reference_ids(tok, prompt, response):
  """(full ids, number of prompt ids) straight from the chat template."""
  msgs = messages(prompt)
  ptext = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  ftext = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}],
                                  tokenize=False)
  p = tok(ptext, add_special_tokens=False)["input_ids"]
  f = tok(ftext, add_special_tokens=False)["input_ids"]
  assert f[:len(p)] == p and len(f) > len(p)
  return f, len(p)


def torch_mean_logprob(tmodel, ids, n_prompt):
  with torch.no_grad():
    lp = tmodel(torch.tensor([ids])).logits[0].double().log_softmax(-1)
  return float(np.mean([lp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))]))


def torch_learnability(tmodel, tok, prompts, responses):
  return np.asarray([torch_mean_logprob(tmodel, *reference_ids(tok, p, r))
                     for p, r in zip(prompts, responses)])


CFG = scoring.ScoringConfig(dtype="float32", max_len=128, min_bucket=128, batch_tokens=512,
                            logits_chunk=48)  # chunk 48 does not divide 128: exercises the padding


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_learnability_matches_torch(model_dir, arch):
  path, tmodel = model_dir(arch)
  scorer = scoring.LogProbScorer.from_pretrained(path, CFG)
  got, stats = scorer.learnability(PROMPTS, RESPONSES)
  want = torch_learnability(tmodel, AutoTokenizer.from_pretrained(path), PROMPTS, RESPONSES)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  assert stats["scored"] == 4 and stats["skipped"] == stats["truncated"] == 0
  assert stats["batches"] == 1  # 4 rows of 128 tokens: one batch, one compiled shape


OTHER_CORPUS = [
    "Les pommes sont rouges et vertes. Combien de pommes reste-t-il?",
    "Zebras quietly juggle xylophones; 7 * 8 = 56 and 9 * 9 = 81.",
    "A completely different vocabulary: kayak, quartz, jigsaw, rhythm, fjord.",
] * 5
OTHER_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}")


@pytest.fixture(scope="module")
def other_student(tmp_path_factory):
  """A student with its own tokenizer (other text, vocab size and chat template)."""
  tok2 = train_tokenizer(OTHER_CORPUS, vocab_size=360)
  tok2.chat_template = OTHER_TEMPLATE
  path = str(tmp_path_factory.mktemp("other_student"))
  tmodel = tiny.make_model("mistral", path, tok2, seed=3)
  return path, tok2, tmodel


def test_learnability_student_tokenizer_differs_from_teacher(model_dir, tok, other_student):
  # The teacher (tiny tokenizer) writes the responses; the student scores the text with its own.
  _, teacher = model_dir("llama")
  responses = []
  for p in PROMPTS[:2]:
    ids, n = reference_ids(tok, p, "x")
    with torch.no_grad():
      out = teacher.generate(torch.tensor([ids[:n]]), max_new_tokens=10, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    responses.append(tok.decode(out[0, n:], skip_special_tokens=True))
  path, tok2, tmodel = other_student
  assert len(tok2) != len(tok)
  assert tok2(responses[0])["input_ids"] != tok(responses[0])["input_ids"]
  scorer = scoring.LogProbScorer.from_pretrained(path, CFG)
  got, _ = scorer.learnability(PROMPTS[:2], responses)
  want = torch_learnability(tmodel, AutoTokenizer.from_pretrained(path), PROMPTS[:2], responses)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# Qwen2's pre-tokenizer: `\s*[\r\n]+` joins the generation prompt's last newline with a
# response's leading ones, so the full conversation does not extend the prompt's ids.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def qwen2_style_tokenizer():
  """ChatML template, end of turn <|im_end|>, EOS <|endoftext|> (as Qwen2.5 base models)."""
  from tokenizers import Regex, Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  from persyn_jax.tokenizer import CHAT_TEMPLATE
  t = Tokenizer(tmodels.BPE())
  t.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(tiny.CORPUS + ["user\nassistant\n\n\nThe answer\n\n"] * 5, trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def test_learnability_of_a_response_that_merges_with_the_generation_prompt(tmp_path):
  """A response starting with a newline: the full conversation's ids do not extend the prompt's
  (the newlines merge), so the response is what the template adds after the generation prompt,
  tokenized apart: the template's end of turn `<|im_end|>\n` is scored, not the tokenizer's EOS."""
  from persyn_jax.data import chat
  qtok = qwen2_style_tokenizer()
  path = str(tmp_path)
  tmodel = tiny.make_model("qwen2", path, qtok, seed=4)
  htok = AutoTokenizer.from_pretrained(path)
  prompts = ["What is 3 + 4?", "hello world"]
  responses = ["\nThe answer is 7.", "\n\n12 - 5 = 7"]
  want = []
  for p, r in zip(prompts, responses):
    ptext = htok.apply_chat_template(messages(p), tokenize=False, add_generation_prompt=True)
    ftext = htok.apply_chat_template(messages(p) + [{"role": "assistant", "content": r}],
                                     tokenize=False)
    p_ids = htok(ptext, add_special_tokens=False)["input_ids"]
    assert htok(ftext, add_special_tokens=False)["input_ids"][:len(p_ids)] != p_ids  # merged
    r_ids = htok(ftext[len(ptext):], add_special_tokens=False)["input_ids"]
    assert htok.decode(r_ids[-2:]) == "<|im_end|>\n" and htok.eos_token_id not in r_ids
    want.append(torch_mean_logprob(tmodel, p_ids + r_ids, len(p_ids)))
  assert chat.pair_ids_batch(htok, prompts, responses) == [
      chat.pair_ids(htok, p, r) for p, r in zip(prompts, responses)]
  for packing in (True, False):
    cfg = dataclasses.replace(CFG, packing=packing, min_bucket=32, pack_len=64)
    got, _ = scoring.LogProbScorer.from_pretrained(path, cfg).learnability(prompts, responses)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_reward_model_reads_a_merged_conversation_as_one_text(tmp_path, tok):
  """The reward model gets the full conversation's ids as transformers tokenizes it in one piece
  (`apply_chat_template(tokenize=True)`), also when a leading newline merges with the prompt."""
  from persyn_jax.data import chat
  for p, r in zip(PROMPTS, RESPONSES):  # no merge: the student's ids
    assert chat.conversation_ids(tok, p, r) == chat.pair_ids(tok, p, r)
  qtok = qwen2_style_tokenizer()
  path = str(tmp_path)
  tmodel = tiny.make_model("qwen2", path, qtok, seed=5, classifier=True)
  htok = AutoTokenizer.from_pretrained(path)
  prompts, responses = ["What is 3 + 4?", "hello world", "hi"], ["\nThe answer is 7.",
                                                                  "\n\n12 - 5 = 7", "plain"]
  want = []
  for p, r in zip(prompts, responses):
    text = htok.apply_chat_template(messages(p) + [{"role": "assistant", "content": r}],
                                    tokenize=False)
    with torch.no_grad():
      want.append(tmodel(torch.tensor([htok(text, add_special_tokens=False)["input_ids"]]))
                  .logits[0, 0].item())
  for packing in (True, False):
    cfg = dataclasses.replace(CFG, packing=packing, min_bucket=32, pack_len=64)
    got, _ = scoring.RewardScorer.from_pretrained(path, cfg).score(prompts, responses)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=1e-5)


def test_overlong_pairs_truncated_or_skipped(model_dir, tok):
  path, tmodel = model_dir("llama")
  long_prompt = "hello world, how are you today? " * 6
  prompts, responses = [long_prompt, PROMPTS[0]], ["Once upon a time there was a tiny model. " * 3,
                                                   RESPONSES[0]]
  cfg = scoring.ScoringConfig(dtype="float32", max_len=48, min_bucket=48, min_prompt_tokens=8)
  ids, n = reference_ids(tok, prompts[0], responses[0])
  assert len(ids) - n > 40 and len(reference_ids(tok, prompts[1], responses[1])[0]) <= 48
  # (the first response alone overflows its prompt's room; the second pair fits)
  got, stats = scoring.LogProbScorer.from_pretrained(path, cfg).learnability(prompts, responses)
  assert stats["truncated"] == 1 and stats["skipped"] == 0
  # truncate: the last 8 prompt tokens, then the first 40 response tokens
  cut = ids[n - 8:n] + ids[n:n + 40]
  np.testing.assert_allclose(got[0], torch_mean_logprob(tmodel, cut, 8), atol=TOL)
  np.testing.assert_allclose(got[1], torch_learnability(tmodel, tok, prompts[1:], responses[1:])[0],
                             atol=TOL)
  skip_cfg = scoring.ScoringConfig(dtype="float32", max_len=48, min_bucket=48, overlong="skip")
  got, stats = scoring.LogProbScorer.from_pretrained(path, skip_cfg).learnability(prompts, responses)
  assert stats["skipped"] == 1 and stats["scored"] == 1 and np.isnan(got[0]) and np.isfinite(got[1])


def test_learnability_sharded_equals_unsharded(model_dir):
  path, _ = model_dir("llama")
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  plain, _ = scoring.LogProbScorer.from_pretrained(path, CFG).learnability(PROMPTS, RESPONSES)
  sharded_scorer = scoring.LogProbScorer.from_pretrained(path, CFG, mesh=mesh)
  assert sharded_scorer.runner.shards == 4
  emb = sharded_scorer.runner.state["model"]["embed"].get_value()
  assert len(emb.sharding.device_set) == 8
  sharded, _ = sharded_scorer.learnability(PROMPTS, RESPONSES)
  np.testing.assert_allclose(sharded, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_reward_model_matches_sequence_classification(model_dir, arch):
  path, tmodel = model_dir(arch, classifier=True)
  tok = AutoTokenizer.from_pretrained(path)
  scorer = scoring.RewardScorer.from_pretrained(path, CFG)
  got, stats = scorer.score(PROMPTS, RESPONSES)
  want = []
  for p, r in zip(PROMPTS, RESPONSES):
    ids, _ = reference_ids(tok, p, r)  # the full conversation, unpadded, batch of one
    with torch.no_grad():
      want.append(tmodel(torch.tensor([ids])).logits[0, 0].item())
  np.testing.assert_allclose(got, want, atol=TOL, rtol=1e-5)
  assert stats["scored"] == 4
  assert np.ptp(want) > 1e-3  # the scores differ between responses: a mix-up would show


EOS_LAST_TEMPLATE = (  # no newline after the end of a turn: a conversation ends with EOS
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("packing", [True, False])
def test_reward_model_with_pad_equal_to_eos_reads_the_token_before_eos(tmp_path, tok, packing):
  """transformers scores the rightmost token that is not pad_token_id: with pad = EOS and a
  conversation that ends with EOS, the token before it (also in a left-padded batch)."""
  tok2 = copy.deepcopy(tok)
  tok2.chat_template = EOS_LAST_TEMPLATE
  tok2.pad_token = tok2.eos_token
  path = str(tmp_path)
  tmodel = tiny.make_model("qwen2", path, tok2, seed=2, classifier=True,
                           pad_token_id=tok2.eos_token_id)
  htok = AutoTokenizer.from_pretrained(path)
  texts = [htok.apply_chat_template(messages(p) + [{"role": "assistant", "content": r}],
                                    tokenize=False) for p, r in zip(PROMPTS, RESPONSES)]
  single = []
  for t in texts:
    ids = htok(t, add_special_tokens=False)["input_ids"]
    assert ids[-1] == htok.eos_token_id == tmodel.config.pad_token_id
    with torch.no_grad():
      single.append(tmodel(torch.tensor([ids])).logits[0, 0].item())
  htok.padding_side = "left"
  with torch.no_grad():
    batched = tmodel(**htok(texts, add_special_tokens=False, padding=True,
                            return_tensors="pt")).logits[:, 0].numpy()
  np.testing.assert_allclose(batched, single, atol=TOL, rtol=1e-5)
  cfg = dataclasses.replace(CFG, packing=packing, min_bucket=32, pack_len=64, batch_tokens=128)
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  got, _ = scoring.RewardScorer.from_pretrained(path, cfg, mesh=mesh).score(PROMPTS, RESPONSES)
  np.testing.assert_allclose(got, single, atol=TOL, rtol=1e-5)


def test_plan_batches_covers_every_sequence_once():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 300, size=101)
  plan = plan_batches(lengths, bucket_lengths(300, 32), batch_tokens=512, max_batch_size=8,
                      multiple=4)
  seen = np.concatenate([b.indices for b in plan])
  assert sorted(seen.tolist()) == list(range(101))
  for b in plan:
    assert b.rows % 4 == 0 and b.indices.size <= b.rows and lengths[b.indices].max() <= b.length
  assert len({(b.rows, b.length) for b in plan}) <= 2 * len(bucket_lengths(300, 32))


def test_fit_prompt_response_keeps_prompt_tail_and_response_head():
  ids, mask = list(range(10)) + list(range(100, 120)), [0] * 10 + [1] * 20
  cut, m = fit_prompt_response(ids, mask, 16, min_prompt_tokens=4)
  assert cut == [6, 7, 8, 9] + list(range(100, 112)) and m == [0] * 4 + [1] * 12
  cut, m = fit_prompt_response(ids, mask, 25, min_prompt_tokens=2)  # room for 5 prompt tokens
  assert cut == [5, 6, 7, 8, 9] + list(range(100, 120))
  assert fit_prompt_response(ids, mask, 30, 4) == (ids, mask)


def test_scoring_config_rejects_bad_values():
  from persyn_jax.config import ConfigError, from_dict
  with pytest.raises(ValueError, match="alpha"):
    scoring.ScoringConfig(alpha=1.5)
  with pytest.raises(ValueError, match="unknown verifier"):
    scoring.ScoringConfig(quality="verifier", verifier="nope")
  with pytest.raises(ConfigError, match="normalizer"):
    from_dict(scoring.ScoringConfig, {"normalizer": "softmax"})
  assert from_dict(scoring.ScoringConfig, {"alpha": 0}).alpha == 0.0
