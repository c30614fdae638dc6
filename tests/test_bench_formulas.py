"""The benchmarks' FLOP counts against an independent count, matmul by matmul, for Llama-3.2-1B's
shape (16 layers, d 2048, MLP 8192, 32 query / 8 KV heads of 64, tied 128,256-token vocabulary):
2 FLOPs per multiply-add; causal attention over a sequence of S counted as S/2 keys per token
(the convention of ModelConfig.flops_per_token)."""
import os

import pytest

from persyn_jax.models.config import ModelConfig

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
LAYERS, D, MLP, HEADS, KV, HD, VOCAB = 16, 2048, 8192, 32, 8, 64, 128256


@pytest.fixture
def sampler(monkeypatch):
  monkeypatch.syspath_prepend(BENCH)
  import sampler
  return sampler


def llama_1b() -> ModelConfig:
  return ModelConfig(model_type="llama", tie_embeddings=True, vocab_size=VOCAB, hidden_size=D,
                     intermediate_size=MLP, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV,
                     head_dim=HD)


def layer_flops(S: int) -> int:
  """One token through one layer, in a causal sequence of S tokens."""
  qkvo = 2 * D * HEADS * HD + 2 * 2 * D * KV * HD + 2 * HEADS * HD * D
  mlp = 3 * 2 * D * MLP
  attn = 2 * 2 * HEADS * HD * S // 2  # scores and values over S/2 keys on average
  return qkvo + mlp + attn


def test_prefill_flops_count_the_lm_head_at_the_last_token_only(sampler):
  B, L = 64, 256
  head = 2 * D * VOCAB
  want = B * (L * LAYERS * layer_flops(L) + head)
  got = sampler.prefill_flops(llama_1b(), B, L)
  # ModelConfig counts the RMSNorm scales as weights too (2 per layer): 2 FLOPs each, below 1e-4
  assert got == pytest.approx(want, rel=1e-4)
  assert got < 0.8 * B * L * llama_1b().flops_per_token(L)  # the head at every token: +27%


def test_flops_per_token_is_the_matmul_count_plus_causal_attention():
  S = 2048
  want = LAYERS * layer_flops(S) + 2 * D * VOCAB  # the head; the embedding lookup is no matmul
  assert llama_1b().flops_per_token(S) == pytest.approx(want, rel=1e-4)


def test_sliding_layers_count_only_the_keys_in_their_window():
  """Gemma-3-like: 5 of 6 layers see the last W tokens only. Reference: the mean over the
  sequence of min(position, W) keys per token, summed by brute force."""
  import numpy as np
  S, W = 2048, 512
  sliding = tuple(i % 6 != 5 for i in range(LAYERS))
  cfg = llama_1b().replace(sliding_window=W, sliding_layers=sliding)
  pos = np.arange(1, S + 1)
  # (the convention drops each token's own half key: S/2 keys a token in a full layer)
  keys_full, keys_window = pos.mean() - 0.5, np.minimum(pos, W).mean() - W / (2 * S)
  want = sum(4 * HEADS * HD * (keys_window if s else keys_full) for s in sliding)
  assert cfg.attention_flops_per_token(S) == pytest.approx(want, rel=1e-9)
  assert cfg.flops_per_token(S) - cfg.attention_flops_per_token(S) == \
      pytest.approx(llama_1b().flops_per_token(S) - llama_1b().attention_flops_per_token(S))


def test_sft_mfu_flops_with_lora_keep_the_attention_backward():
  """Full fine-tuning: forward + backward = 3x the forward. LoRA: the frozen matmuls skip their
  weight gradients (2x), attention (no weights) still computes dQ, dK, dV (3x)."""
  from persyn_jax.models.lora import LoRAConfig
  from persyn_jax.sft import SFTConfig
  from persyn_jax.sft.log import train_flops_per_token
  S = 2048
  matmul = LAYERS * layer_flops(0) + 2 * D * VOCAB
  attn = LAYERS * (layer_flops(S) - layer_flops(0))
  full = SFTConfig(seq_len=S)
  lora = SFTConfig(seq_len=S, lora=LoRAConfig(rank=8))
  assert train_flops_per_token(llama_1b(), full) == pytest.approx(3 * (matmul + attn), rel=1e-4)
  assert train_flops_per_token(llama_1b(), lora) == pytest.approx(2 * matmul + 3 * attn, rel=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_decode_bytes_per_step_read_the_weights_the_head_and_the_filled_cache(sampler, tied):
  """Reference: transformers' Llama-3.2-1B-shaped model (meta device: shapes only) for the weights
  a step reads (all but the embedding table, of which it gathers B rows; the head is read whole),
  and a step-by-step sum of the filled cache our decode loop attends over."""
  import numpy as np
  import torch
  import transformers as T
  B, L, new, itemsize = 64, 256, 128, 2
  hf = T.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=MLP,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     num_key_value_heads=KV, head_dim=HD, tie_word_embeddings=tied)
  with torch.device("meta"):
    model = T.LlamaForCausalLM(hf)
  read = sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False)
             if not n.endswith("embed_tokens.weight"))
  kv_token = 2 * LAYERS * KV * HD * itemsize
  filled = np.mean([B * (L + i + 1) * kv_token for i in range(new)])  # step i attends L + i + 1
  got = sampler.decode_bytes_per_step(llama_1b().replace(tie_embeddings=tied), B, L, new, itemsize)
  assert got["weights"] == read * itemsize
  assert got["kv_filled"] == pytest.approx(filled, rel=1e-12)
  assert got["kv_allocated"] == B * (L + new) * kv_token


def test_generate_decode_rate_counts_the_tokens_made_in_its_decode_time(sampler):
  """transformers' decode time is generate(new) - generate(1): new - 1 forward steps, the first
  token of each row being generate(1)'s. Ours times the whole loop, every token included."""
  B, L, new = 4, 16, 8
  torch_log = {"prefill_s": [0.5] * 3, "decode_s": [1.0] * 3, "useful_tokens": [B * new] * 3,
               "decode_tokens": [B * (new - 1)] * 3, "slot_steps": [B * new] * 3}
  ours_log = {"prefill_s": [0.5] * 3, "decode_s": [1.0] * 3, "useful_tokens": [B * new] * 3,
              "slot_steps": [B * new] * 3}
  t = sampler.summarize(torch_log, B, L, new, ())
  o = sampler.summarize(ours_log, B, L, new, ())
  assert t["decode_tok_s"]["median"] == B * (new - 1) and o["decode_tok_s"]["median"] == B * new
  assert t["e2e_tok_s"]["median"] == o["e2e_tok_s"]["median"] == B * new / 1.5


def test_scoring_flops_count_the_lm_head_at_the_scored_positions_only(monkeypatch):
  """The packed scorer gathers the positions that predict response tokens before the LM head
  (runtime/logprob.gathered_logprobs): the prompt's positions need no head."""
  monkeypatch.syspath_prepend(BENCH)
  import importlib
  scoring_bench = importlib.import_module("scoring")
  pairs = [(list(range(300)), [0] * 100 + [1] * 200), None,  # None: a pair skipped as over-long
           (list(range(64)), [0] * 60 + [1] * 4)]
  head = 2 * D * VOCAB
  want = 300 * LAYERS * layer_flops(300) + 200 * head + 64 * LAYERS * layer_flops(64) + 4 * head
  assert scoring_bench.scoring_flops(llama_1b(), pairs) == pytest.approx(want, rel=1e-4)


def test_sampler_useful_fraction_is_over_the_slot_steps_decoded(sampler):
  """As bench/continuous.py counts it: response tokens / (B x the steps the batch ran, i.e. its
  longest row); not over B x new when every row stopped early."""
  B, L, new = 4, 16, 64
  log = {"prefill_s": [0.5] * 3, "decode_s": [1.0] * 3, "useful_tokens": [40] * 3,
         "slot_steps": [B * 20] * 3}  # rows of 5, 5, 10 and 20 tokens: the loop ran 20 steps
  assert sampler.summarize(log, B, L, new, (1,))["useful_fraction"]["median"] == 0.5
