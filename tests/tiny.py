"""Tiny random Hugging Face models (transformers + torch, seeded) saved as safetensors, for tests.

Every parameter, norms included, is drawn at random so that a wrongly mapped weight shows up.
"""
from __future__ import annotations

import json
import os

import torch
import transformers as T

from persyn_jax.tokenizer import train_tokenizer

CORPUS = [
    "The answer is 42. Step 1: 3 + 4 = 7. Step 2: 7 * 6 = 42.",
    "hello world, how are you today? I am fine, thank you very much.",
    "Tom has 12 apples and gives 5 to Ann. How many are left? 12 - 5 = 7.",
    "def f(x): return x * x  # squares a number",
    "Once upon a time there was a tiny language model that learned to count.",
] * 4

# arch name -> (config class, causal LM class, sequence classifier class, config kwargs)
ARCHS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, T.LlamaForSequenceClassification, dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        max_position_embeddings=64)),
    "llama_bias": (T.LlamaConfig, T.LlamaForCausalLM, T.LlamaForSequenceClassification, dict(
        attention_bias=True, mlp_bias=True, rope_theta=500000.0)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, T.MistralForSequenceClassification, dict(
        sliding_window=5)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, T.Qwen2ForSequenceClassification, dict(
        tie_word_embeddings=True)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, T.Qwen3ForSequenceClassification, dict()),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, T.Phi3ForSequenceClassification, dict(
        sliding_window=6, original_max_position_embeddings=4096)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, T.Gemma2ForSequenceClassification, dict(
        sliding_window=4, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, T.Gemma3TextForSequenceClassification, dict(
        sliding_window=4, query_pre_attn_scalar=8, num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=10000.0,
        rope_local_base_freq=1000.0)),
}


def tokenizer():
  return train_tokenizer(CORPUS, vocab_size=300)


def edit_config(path: str, **fields) -> None:
  """Sets `fields` in the config.json of the model directory `path` (for bad-input tests)."""
  p = os.path.join(path, "config.json")
  with open(p) as f:
    cfg = json.load(f)
  cfg.update(fields)
  with open(p, "w") as f:
    json.dump(cfg, f)


def hf_config(arch: str, tok, **overrides):
  cfg_cls, _, _, kw = ARCHS[arch]
  base = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
  base.update(kw)
  base.update(overrides)
  cfg = cfg_cls(**base)
  cfg._attn_implementation = "eager"
  return cfg


def randomize(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * std
      if name.endswith("norm.weight") and "gemma" not in type(model).__name__.lower():
        noise = noise + 1.0
      p.copy_(noise)


def make_model(arch: str, path: str, tok, *, seed: int = 0, classifier: bool = False,
               num_labels: int = 1, **overrides):
  """Saves a random HF model (and the tokenizer) to `path`; returns the torch model (fp32, eval)."""
  _, lm_cls, cls_cls, _ = ARCHS[arch]
  torch.manual_seed(seed)
  cfg = hf_config(arch, tok, **overrides)
  if classifier:
    cfg.num_labels = num_labels
    model = cls_cls(cfg)
  else:
    model = lm_cls(cfg)
  randomize(model, seed)
  model.eval()
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path, safe_serialization=True)
  tok.save_pretrained(path)
  return model
