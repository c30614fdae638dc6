"""Continuous batching (sampling/slots.py) gives the static sampler's responses, token for token.

The workload is heavy-tailed: a stop token chosen so that some rows end after a few tokens and
others run to max_new_tokens, so slots free and refill at many different steps.
"""
import numpy as np
import pytest

from persyn_jax import models, sampling
from persyn_jax.data import chat
from persyn_jax.sampling import slots
from persyn_jax.sampling.engine import Engine, Static
from persyn_jax.sampling.generate import prompt_buckets

PROMPTS = ["hi", "Tom has 12 apples and gives 5 to Ann. How many are left?", "def f(x): return",
           "hello world", "count to ten", "Once upon a time there was", "2 + 2 =",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a joke"}],
           "The answer is", "thank you very much"]
BASE = sampling.SamplingConfig(max_new_tokens=40, temperature=0.0, stop_token_ids=(),
                               batch_size=4, min_bucket=16, batching="static")


def heavy_tail_stop(responses: list[tuple[int, ...]], max_new: int) -> int:
  """The token whose first occurrence spreads the rows' lengths most (absent = max_new)."""
  def lengths(t):
    return [r.index(t) + 1 if t in r else max_new for r in responses]
  candidates = sorted({t for r in responses for t in r})
  return max(candidates, key=lambda t: (np.std(lengths(t)), -t))


@pytest.fixture(scope="module")
def workload(model_dir):
  path, _ = model_dir("llama")
  model, tok = models.from_pretrained(path, dtype="float32")
  free = sampling.generate(model, tok, PROMPTS, BASE)
  stop = heavy_tail_stop([r.token_ids for r in free], BASE.max_new_tokens)
  cfg = BASE.replace(stop_token_ids=(stop,))
  return model, tok, cfg


def test_the_workload_is_heavy_tailed(workload):
  model, tok, cfg = workload
  lengths = sorted(r.response_tokens for r in sampling.generate(model, tok, PROMPTS, cfg))
  assert lengths[0] <= cfg.max_new_tokens // 4 and lengths[-1] == cfg.max_new_tokens
  assert len(set(lengths)) >= 4, lengths


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "top_p"])
def test_continuous_equals_static(workload, sampled):
  model, tok, cfg = workload
  if sampled:  # the paper's sampling, two samples per prompt
    cfg = cfg.replace(temperature=0.7, top_p=0.95, seed=5, num_samples=2)
  want = sampling.generate(model, tok, PROMPTS, cfg)
  for n_slots, chunk in ((1, 16), (3, 5), (8, 16)):
    got = sampling.generate(model, tok, PROMPTS, cfg.replace(
        batching="continuous", batch_size=n_slots, decode_chunk=chunk))
    assert [(r.index, r.sample) for r in got] == [(r.index, r.sample) for r in want]
    assert [r.token_ids for r in got] == [r.token_ids for r in want], (n_slots, chunk)
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    assert [r.text for r in got] == [r.text for r in want]


def test_continuous_wastes_fewer_slot_steps(workload):
  model, tok, cfg = workload
  static, cont = {}, {}
  a = sampling.generate(model, tok, PROMPTS, cfg, stats=static)
  b = sampling.generate(model, tok, PROMPTS, cfg.replace(batching="continuous", decode_chunk=4),
                        stats=cont)
  useful = sum(r.response_tokens for r in a)
  assert static["useful_tokens"] == cont["useful_tokens"] == useful
  assert sum(r.response_tokens for r in b) == useful
  assert cont["slot_steps"] < static["slot_steps"]
  assert cont["useful_fraction"] > static["useful_fraction"]


def test_samples_of_a_prompt_share_one_prefill(workload):
  model, tok, cfg = workload
  stats = {}
  cfg = cfg.replace(batching="continuous", num_samples=3, temperature=0.7, seed=1, batch_size=32)
  out = sampling.generate(model, tok, PROMPTS[:4], cfg, stats=stats)
  assert len(out) == 12 and stats["prefill_rows"] == 4
  assert len({r.token_ids for r in out[:3]}) > 1  # the copies sample on their own keys


def test_a_larger_cache_changes_nothing(workload):
  """Rows attend over their own filled range only: the allocated cache length is invisible."""
  model, tok, cfg = workload
  ids = [chat.prompt_ids(tok, p) for p in PROMPTS[:5]]
  buckets = prompt_buckets(cfg.max_prompt_len, cfg.min_bucket)
  engine = Engine(model, Static(cfg.max_new_tokens, 0.0, 0, 1.0, "float32",
                                int(tok.pad_token_id)))
  rows = [(i, 0) for i in range(5)]

  def run(cache_len):
    out = {}
    slots.run(engine, ids, rows, prompt_index=range(5), seed=0, stop_ids=cfg.stop_token_ids,
              slots=2, buckets=buckets, chunk_steps=8, cache_len=cache_len,
              on_done=lambda done: out.update({i: t.tolist() for i, _, t, _, _ in done}))
    return out

  short = run(None)
  assert run(256) == short and len(short) == 5


def test_batching_is_checked():
  with pytest.raises(ValueError, match="sampling.batching"):
    sampling.SamplingConfig(batching="dynamic")
  assert sampling.SamplingConfig().batching == "continuous"


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_refilled_slots_equal_transformers_across_sliding_windows(model_dir, arch):
  """Fewer slots than prompts, prompts of very different lengths (18 to ~100 tokens, four
  buckets), windows (mistral 5, gemma2 4 on alternate layers) far shorter than prompt + response:
  every row decodes in a slot an earlier row used, and its greedy tokens are transformers' own
  (each prompt alone, no padding)."""
  import torch
  path, hf = model_dir(arch)
  model, tok = models.from_pretrained(path, dtype="float32")
  prompts = PROMPTS[:6] + ["Tom has 12 apples and gives 5 to Ann. " * 6]
  ids = [chat.prompt_ids(tok, p) for p in prompts]
  max_new = 24
  hf.generation_config.eos_token_id = None
  want = []
  with torch.no_grad():
    for i in ids:
      out = hf.generate(input_ids=torch.tensor([i]), do_sample=False, max_new_tokens=max_new,
                        attention_mask=torch.ones((1, len(i)), dtype=torch.long),
                        pad_token_id=tok.pad_token_id)
      want.append(out[0, len(i):].tolist())
  buckets = prompt_buckets(BASE.max_prompt_len, BASE.min_bucket)
  assert len({slots.bucket_of(len(i), buckets) for i in ids}) >= 4, [len(i) for i in ids]
  cfg = BASE.replace(max_new_tokens=max_new, batching="continuous", batch_size=2, decode_chunk=3)
  got = sampling.generate(model, tok, prompts, cfg)
  assert [list(r.token_ids) for r in got] == want
