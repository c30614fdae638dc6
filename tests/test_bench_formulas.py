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
