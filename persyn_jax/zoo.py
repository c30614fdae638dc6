"""Architectures of well-known Hugging Face checkpoints, so that `--dry-run` can plan a run (memory
per device, tokens) before any weights are downloaded. A local directory's own config.json always
wins over this table."""
from __future__ import annotations

import json
import os

from persyn_jax.models.config import ModelConfig
from persyn_jax.models.hf import config_from_hf, read_json


def _c(mt, D, L, N, K, F, V, *, tie=False, hd=None, theta=10000.0, **kw):
  d = dict(model_type=mt, hidden_size=D, num_hidden_layers=L, num_attention_heads=N,
           num_key_value_heads=K, intermediate_size=F, vocab_size=V, tie_word_embeddings=tie,
           rope_theta=theta)
  if hd:
    d["head_dim"] = hd
  d.update(kw)
  return d


L31 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
L32 = {"rope_scaling": {**L31["rope_scaling"], "factor": 32.0}}
G2 = dict(query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
          final_logit_softcapping=30.0)

ZOO: dict[str, dict] = {
    # Qwen2 / Qwen2.5 (incl. Math and the R1 distills, which are Qwen2 architecture)
    "Qwen/Qwen2.5-0.5B": _c("qwen2", 896, 24, 14, 2, 4864, 151936, tie=True, theta=1e6),
    "Qwen/Qwen2.5-1.5B": _c("qwen2", 1536, 28, 12, 2, 8960, 151936, tie=True, theta=1e6),
    "Qwen/Qwen2.5-0.5B-Instruct": _c("qwen2", 896, 24, 14, 2, 4864, 151936, tie=True, theta=1e6),
    "Qwen/Qwen2.5-1.5B-Instruct": _c("qwen2", 1536, 28, 12, 2, 8960, 151936, tie=True, theta=1e6),
    "Qwen/Qwen2.5-3B-Instruct": _c("qwen2", 2048, 36, 16, 2, 11008, 151936, tie=True, theta=1e6),
    "Qwen/Qwen2.5-7B-Instruct": _c("qwen2", 3584, 28, 28, 4, 18944, 152064, theta=1e6),
    "Qwen/Qwen2.5-14B-Instruct": _c("qwen2", 5120, 48, 40, 8, 13824, 152064, theta=1e6),
    "Qwen/Qwen2.5-32B-Instruct": _c("qwen2", 5120, 64, 40, 8, 27648, 152064, theta=1e6),
    "Qwen/Qwen2.5-72B-Instruct": _c("qwen2", 8192, 80, 64, 8, 29568, 152064, theta=1e6),
    "Qwen/Qwen2-1.5B-Instruct": _c("qwen2", 1536, 28, 12, 2, 8960, 151936, tie=True, theta=1e6),
    "Qwen/Qwen2-7B-Instruct": _c("qwen2", 3584, 28, 28, 4, 18944, 152064, theta=1e6),
    "Qwen/Qwen2-72B-Instruct": _c("qwen2", 8192, 80, 64, 8, 29568, 152064, theta=1e6),
    "Qwen/Qwen2.5-Math-1.5B-Instruct": _c("qwen2", 1536, 28, 12, 2, 8960, 151936, tie=True),
    "Qwen/Qwen2.5-Math-7B-Instruct": _c("qwen2", 3584, 28, 28, 4, 18944, 152064),
    "Qwen/Qwen2.5-Math-72B-Instruct": _c("qwen2", 8192, 80, 64, 8, 29568, 152064),
    "Qwen/QwQ-32B": _c("qwen2", 5120, 64, 40, 8, 27648, 152064, theta=1e6),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": _c("qwen2", 1536, 28, 12, 2, 8960, 151936, theta=1e4),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": _c("qwen2", 3584, 28, 28, 4, 18944, 152064, theta=1e4),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": _c("qwen2", 5120, 48, 40, 8, 13824, 152064, theta=1e6),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": _c("qwen2", 5120, 64, 40, 8, 27648, 152064, theta=1e6),
    # Llama 3 / 3.1 / 3.2
    "meta-llama/Meta-Llama-3-8B-Instruct": _c("llama", 4096, 32, 32, 8, 14336, 128256, theta=5e5),
    "meta-llama/Meta-Llama-3-70B-Instruct": _c("llama", 8192, 80, 64, 8, 28672, 128256, theta=5e5),
    "meta-llama/Llama-3.1-8B-Instruct": _c("llama", 4096, 32, 32, 8, 14336, 128256, theta=5e5, **L31),
    "meta-llama/Llama-3.1-70B-Instruct": _c("llama", 8192, 80, 64, 8, 28672, 128256, theta=5e5, **L31),
    "meta-llama/Llama-3.1-405B-Instruct": _c("llama", 16384, 126, 128, 8, 53248, 128256, theta=5e5, **L31),
    "meta-llama/Llama-3.2-1B-Instruct": _c("llama", 2048, 16, 32, 8, 8192, 128256, tie=True, theta=5e5, **L32),
    "meta-llama/Llama-3.2-3B-Instruct": _c("llama", 3072, 28, 24, 8, 8192, 128256, tie=True, theta=5e5, **L32),
    "meta-llama/Llama-3.2-3B": _c("llama", 3072, 28, 24, 8, 8192, 128256, tie=True, theta=5e5, **L32),
    # Gemma 2
    "google/gemma-2-2b-it": _c("gemma2", 2304, 26, 8, 4, 9216, 256000, tie=True, hd=256, **G2),
    "google/gemma-2-2b": _c("gemma2", 2304, 26, 8, 4, 9216, 256000, tie=True, hd=256, **G2),
    "google/gemma-2-9b-it": _c("gemma2", 3584, 42, 16, 8, 14336, 256000, tie=True, hd=256, **G2),
    "google/gemma-2-27b-it": _c("gemma2", 4608, 46, 32, 16, 36864, 256000, tie=True, hd=128,
                                **{**G2, "query_pre_attn_scalar": 144}),
    # Phi-3 (4k context variants: default RoPE)
    "microsoft/Phi-3-mini-4k-instruct": _c("phi3", 3072, 32, 32, 32, 8192, 32064, sliding_window=2047),
    "microsoft/Phi-3-medium-4k-instruct": _c("phi3", 5120, 40, 40, 10, 17920, 32064, sliding_window=2047),
    # Mistral
    "mistralai/Mistral-7B-Instruct-v0.3": _c("mistral", 4096, 32, 32, 8, 14336, 32768, theta=1e6),
    # Reward model (LlamaForSequenceClassification, one label)
    "Skywork/Skywork-Reward-Llama-3.1-8B": _c("llama", 4096, 32, 32, 8, 14336, 128256, theta=5e5,
                                              num_labels=1, **L31),
}


def architecture(path_or_id: str) -> ModelConfig:
  """The ModelConfig of a local HF directory (its config.json), else of a known hub id."""
  from persyn_jax import fs
  if fs.is_remote(path_or_id):  # a gs:// model directory: its config.json, read from the bucket
    cfg_path = fs.join(path_or_id, "config.json")
    if fs.exists(cfg_path):
      return config_from_hf(json.loads(fs.read_bytes(cfg_path)), source=cfg_path)
  cfg_path = os.path.join(path_or_id, "config.json")
  if os.path.exists(cfg_path):
    return config_from_hf(read_json(cfg_path), source=cfg_path)
  if path_or_id in ZOO:
    return config_from_hf(ZOO[path_or_id], source=f"zoo:{path_or_id}")
  raise KeyError(f"{path_or_id}: no local config.json and not a known model id "
                 f"({len(ZOO)} known; see persyn_jax/zoo.py)")
