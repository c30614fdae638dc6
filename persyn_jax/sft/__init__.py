"""Student SFT: packed, response-masked batches -> a sharded, resumable optax loop -> HF export.

    from persyn_jax.sft import SFTConfig, train
    result = train(model, tokenizer, batches_fn, SFTConfig(lr=2e-5, max_steps=1000), out_dir="run/sft")
    result.export_dir  # HF layout (config.json, safetensors, tokenizer), LoRA merged

The configs are imported at once (the run config holds them); the training code (optax, orbax)
on first use, so that reading a run config (`--dry-run`) does not import it.
"""
import importlib

from persyn_jax.sft.config import LoRAConfig, SFTConfig

_LAZY = {
    "LoRAEinsum": "lora", "LoRAParam": "lora", "apply_lora": "lora", "has_lora": "lora",
    "merge_lora": "lora", "BATCH_KEYS": "loss", "loss_sums": "loss", "mean_loss": "loss",
    "token_nll": "loss", "decay_mask": "optim", "lr_schedule": "optim",
    "make_optimizer": "optim", "Session": "session", "make_session": "session",
    "prepare": "session", "recast": "session", "NonFiniteError": "trainer",
    "TrainResult": "trainer", "as_source": "trainer", "evaluate_loss": "trainer",
    "export": "trainer", "train": "trainer",
}

__all__ = ["SFTConfig", "LoRAConfig", "train", "export", "TrainResult", "NonFiniteError",
           "evaluate_loss", "loss_sums", "mean_loss", "token_nll", "BATCH_KEYS", "apply_lora",
           "merge_lora", "has_lora", "LoRAEinsum", "LoRAParam", "make_optimizer", "lr_schedule",
           "decay_mask", "make_session", "Session", "prepare", "recast", "as_source"]


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(f"persyn_jax.sft.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'persyn_jax.sft' has no attribute {name!r}")
