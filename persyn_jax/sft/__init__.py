"""Student SFT: packed, response-masked batches -> a sharded, resumable optax loop -> HF export.

    from persyn_jax.sft import SFTConfig, train
    result = train(model, tokenizer, batches_fn, SFTConfig(lr=2e-5, max_steps=1000), out_dir="run/sft")
    result.export_dir  # HF layout (config.json, safetensors, tokenizer), LoRA merged

The loop, step, optimizer and checkpoints are the training core's (persyn_jax.training,
persyn_jax.checkpoints); LoRA lives with the models (persyn_jax.models.lora) and is re-exported.
The configs are imported at once (the run config holds them); the training code (optax, orbax)
on first use, so that reading a run config (`--dry-run`) does not import it.
"""
import importlib

from persyn_jax.sft.config import LoRAConfig, SFTConfig

_LAZY = {
    "LoRAEinsum": "persyn_jax.models.lora", "LoRAParam": "persyn_jax.models.lora",
    "apply_lora": "persyn_jax.models.lora", "has_lora": "persyn_jax.models.lora",
    "merge_lora": "persyn_jax.models.lora", "BATCH_KEYS": "persyn_jax.sft.loss",
    "loss_sums": "persyn_jax.sft.loss", "mean_loss": "persyn_jax.sft.loss",
    "token_nll": "persyn_jax.sft.loss", "decay_mask": "persyn_jax.sft.optim",
    "lr_schedule": "persyn_jax.sft.optim", "param_group": "persyn_jax.sft.optim",
    "Session": "persyn_jax.sft.session", "make_session": "persyn_jax.sft.session",
    "prepare": "persyn_jax.sft.session", "recast": "persyn_jax.sft.session",
    "NonFiniteError": "persyn_jax.sft.log", "TrainResult": "persyn_jax.sft.trainer",
    "as_source": "persyn_jax.sft.trainer", "evaluate_loss": "persyn_jax.sft.trainer",
    "export": "persyn_jax.sft.trainer", "train": "persyn_jax.sft.trainer",
}

__all__ = ["SFTConfig", "LoRAConfig", "train", "export", "TrainResult", "NonFiniteError",
           "evaluate_loss", "loss_sums", "mean_loss", "token_nll", "BATCH_KEYS", "apply_lora",
           "merge_lora", "has_lora", "LoRAEinsum", "LoRAParam", "param_group", "lr_schedule",
           "decay_mask", "make_session", "Session", "prepare", "recast", "as_source"]


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'persyn_jax.sft' has no attribute {name!r}")
