"""generate(): exact greedy decoding against transformers, sharding, seeds, stops, prompt limits."""
import jax
import numpy as np
import pytest
import torch

import tiny
from persyn_jax import models, sampling
from persyn_jax import sharding as shd
from persyn_jax.data import chat
from persyn_jax.sampling import engine
from persyn_jax.sampling.generate import finish

# 18, 52 and 46 tokens after the chat template: one bucket of 64 (min_bucket=64) and batch 4 (one
# padding row), so an arch compiles one prefill and one decode per sampling config
PROMPTS = ["hi",
           "Tom has 12 apples and gives 5 to Ann. How many are left?",
           [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "def f(x): return"}]]
GREEDY = sampling.SamplingConfig(max_new_tokens=32, temperature=0.0, stop_token_ids=(),
                                 batch_size=4, min_bucket=64)
SAMPLED = GREEDY.replace(temperature=1.0, top_k=40, top_p=0.9, seed=11)


def hf_greedy(hf_model, tok, prompts, max_new):
  """transformers' generate(do_sample=False) on the same left-padded batch, EOS switched off."""
  ids = [chat.prompt_ids(tok, p) for p in prompts]
  T = max(map(len, ids))
  inp = torch.tensor([[tok.pad_token_id] * (T - len(i)) + i for i in ids])
  mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids])
  hf_model.generation_config.eos_token_id = None
  with torch.no_grad():
    out = hf_model.generate(input_ids=inp, attention_mask=mask, do_sample=False,
                            max_new_tokens=max_new, pad_token_id=tok.pad_token_id)
  return [o[T:].tolist() for o in out]


@pytest.fixture(scope="module")
def llama(model_dir):
  path, hf = model_dir("llama")
  model, tok = models.from_pretrained(path, dtype="float32")
  return model, tok, hf, path


@pytest.mark.parametrize("arch", list(tiny.ARCHS))
def test_greedy_equals_transformers(model_dir, arch):
  path, hf = model_dir(arch)
  model, tok = models.from_pretrained(path, dtype="float32")
  lengths = {len(chat.prompt_ids(tok, p)) for p in PROMPTS}
  assert len(lengths) == 3, "the batch must mix prompt lengths (left padding)"
  results = sampling.generate(model, tok, PROMPTS, GREEDY)
  ref = hf_greedy(hf, tok, PROMPTS, GREEDY.max_new_tokens)
  for r, want in zip(results, ref):
    assert len(want) == 32
    assert list(r.token_ids) == want
    assert r.finish_reason == "length" and r.response_tokens == 32
    assert r.text == tok.decode(want, skip_special_tokens=True)


def test_sharded_mesh_equals_single_device(llama, model_dir):
  model, tok, _, path = llama
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded, _ = models.from_pretrained(path, dtype="float32", mesh=mesh)
  prompts = PROMPTS + ["hello world"]
  for cfg in (GREEDY, SAMPLED):
    one = sampling.generate(model, tok, prompts, cfg)
    eight = sampling.generate(sharded, tok, prompts, cfg, mesh=mesh)
    assert [r.token_ids for r in eight] == [r.token_ids for r in one]


def test_top_k_1_equals_greedy(llama):
  model, tok, _, _ = llama
  greedy = sampling.generate(model, tok, PROMPTS, GREEDY)
  # through the sampling path: top-k keeps one token, the draw must pick it
  top1 = sampling.generate(model, tok, PROMPTS, SAMPLED.replace(top_k=1, top_p=1.0, seed=5))
  assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


def test_seeds_samples_and_batching(llama):
  model, tok, _, _ = llama
  prompts = PROMPTS[:2]
  cfg = SAMPLED.replace(num_samples=2)
  a = sampling.generate(model, tok, prompts, cfg)
  assert [(r.index, r.sample) for r in a] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  again = sampling.generate(model, tok, prompts, cfg)
  assert [r.token_ids for r in again] == [r.token_ids for r in a]
  other = sampling.generate(model, tok, prompts, cfg.replace(seed=12))
  assert all(x.token_ids != y.token_ids for x, y in zip(a, other))
  assert a[0].token_ids != a[1].token_ids and a[2].token_ids != a[3].token_ids
  # a prompt's samples depend on (seed, its index, sample), not on its batch neighbours or row
  moved = sampling.generate(model, tok, [PROMPTS[2], prompts[1]], cfg, indices=[7, 1])
  assert [r.token_ids for r in moved[2:]] == [a[2].token_ids, a[3].token_ids]
  assert [r.index for r in moved] == [7, 7, 1, 1]


def test_compiled_functions_are_reused(llama):
  model, tok, _, _ = llama
  sampling.generate(model, tok, PROMPTS, SAMPLED)
  before = dict(engine.TRACES)
  out = sampling.generate(model, tok, ["what is 3 + 4?", "count to ten", "x"],
                          SAMPLED.replace(seed=3, stop_token_ids=(5, 6)))
  assert engine.TRACES == before, "same (bucket, batch) shape and constants must not recompile"
  assert len(out) == 3


def test_stop_token_ends_each_row_and_is_included(llama):
  model, tok, _, _ = llama
  full = [list(r.token_ids) for r in sampling.generate(model, tok, PROMPTS, GREEDY)]
  stop = next(t for t in full[1][4:] if t not in full[1][:4])  # first seen at step >= 4 in row 1
  res = sampling.generate(model, tok, PROMPTS, GREEDY.replace(stop_token_ids=(stop,)))
  for r, ids in zip(res, full):
    if stop in ids:
      cut = ids.index(stop) + 1
      assert list(r.token_ids) == ids[:cut] and r.finish_reason == "stop" and r.stop == stop
    else:  # the other rows run on, unaffected
      assert list(r.token_ids) == ids and r.finish_reason == "length" and r.stop is None
  assert res[1].response_tokens < 32


def test_default_stop_ids_are_the_eos_of_tokenizer_and_model(llama):
  model, tok, _, _ = llama
  cfg = sampling.SamplingConfig()
  assert tok.eos_token_id in sampling.stop_ids(model, tok, cfg)
  merged = model.config.replace(eos_token_id=(7, tok.eos_token_id))
  fake = type("M", (), {"config": merged})()
  assert sampling.stop_ids(fake, tok, cfg) == (tok.eos_token_id, 7)
  assert sampling.stop_ids(model, tok, cfg.replace(stop_token_ids=[])) == ()


def test_eos_is_in_token_ids_but_not_in_text(llama):
  model, tok, _, _ = llama
  full = list(sampling.generate(model, tok, PROMPTS, GREEDY)[0].token_ids)
  eos = tok.eos_token_id
  # the host side of a row that ended with the EOS after three tokens
  text, kept, reason, stop = finish(tok, full[:3] + [eos], True, ())
  assert kept == full[:3] + [eos] and reason == "stop" and stop == eos
  assert text == tok.decode(full[:3], skip_special_tokens=True) and "<|im_end|>" not in text


def test_stop_string_cuts_text_and_tokens(llama):
  model, tok, _, _ = llama
  full = sampling.generate(model, tok, PROMPTS, GREEDY)
  text = full[1].text
  needle = text[len(text) // 2: len(text) // 2 + 2]
  cut = text.index(needle)
  res = sampling.generate(model, tok, PROMPTS, GREEDY.replace(stop_strings=(needle,)))[1]
  assert res.finish_reason == "stop" and res.stop == needle
  assert res.text == text[:cut] and needle not in res.text
  assert list(res.token_ids) == list(full[1].token_ids[:len(res.token_ids)])
  assert text[:cut].startswith(tok.decode(list(res.token_ids), skip_special_tokens=True))
  assert res.response_tokens == len(res.token_ids) < 32


def test_overlong_prompts_truncated_or_skipped(llama):
  model, tok, _, _ = llama
  long = "Once upon a time " * 20
  n = len(chat.prompt_ids(tok, long))
  cfg = GREEDY.replace(max_prompt_len=64)
  others = ["hi", "ho", "hey"]  # four rows: the batch shape of the other tests
  res = sampling.generate(model, tok, [long] + others, cfg)
  assert n > 64 and res[0].truncated and res[0].prompt_tokens == 64
  assert res[0].finish_reason == "length" and not res[1].truncated
  res = sampling.generate(model, tok, [long] + others, cfg.replace(overlong="skip"))
  assert res[0].finish_reason == "skipped" and res[0].token_ids == () and res[0].prompt_tokens == n
  assert res[1].finish_reason == "length" and len(res[1].token_ids) == 32
  counts = sampling.summarize(res)
  assert counts["skipped"] == 1 and counts["length"] == 3


def test_bucket_lengths():
  assert [sampling.bucket_len(n, 1000) for n in (1, 16, 17, 25, 33, 49, 97, 700, 999)] == \
      [16, 16, 24, 32, 48, 64, 128, 768, 1000]


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="sampling.top_p"):
    sampling.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="sampling.overlong"):
    sampling.SamplingConfig(overlong="wrap")


def test_max_positions_warning_counts_prompt_tokens_not_the_bucket(llama):
  """Positions are prompt_len + i (i < max_new_tokens): a prompt of n tokens reaches position
  n + max_new - 1, whatever bucket it is padded to. The tiny llama has max_position_embeddings=64;
  "hi" is 18 tokens (bucket 64 here), so 18 + 46 fits exactly and 18 + 47 does not."""
  import warnings
  model, tok, _, _ = llama
  n = len(chat.prompt_ids(tok, "hi"))
  fits = 64 - n
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sampling.generate(model, tok, ["hi"], GREEDY.replace(max_new_tokens=fits))
  with pytest.warns(UserWarning, match=f"a prompt of {n} tokens \\+ max_new_tokens={fits + 1}"):
    sampling.generate(model, tok, ["hi"], GREEDY.replace(max_new_tokens=fits + 1))
