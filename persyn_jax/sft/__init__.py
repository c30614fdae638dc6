"""Student SFT: packed, response-masked batches -> a sharded, resumable optax loop -> HF export.

    from persyn_jax.sft import SFTConfig, train
    result = train(model, tokenizer, batches_fn, SFTConfig(lr=2e-5, max_steps=1000), out_dir="run/sft")
    result.export_dir  # HF layout (config.json, safetensors, tokenizer), LoRA merged

The loop, step, optimizer and checkpoints are the training core's (persyn_jax.training,
persyn_jax.checkpoints); LoRA lives with the models (persyn_jax.models.lora) and is re-exported.
"""
from persyn_jax.models.lora import LoRAEinsum, LoRAParam, apply_lora, has_lora, merge_lora
from persyn_jax.sft.config import LoRAConfig, SFTConfig
from persyn_jax.sft.log import NonFiniteError
from persyn_jax.sft.loss import BATCH_KEYS, loss_sums, mean_loss, token_nll
from persyn_jax.sft.optim import decay_mask, lr_schedule, param_group
from persyn_jax.sft.session import Session, make_session, prepare, recast
from persyn_jax.sft.trainer import TrainResult, as_source, evaluate_loss, export, train

__all__ = ["SFTConfig", "LoRAConfig", "train", "export", "TrainResult", "NonFiniteError",
           "evaluate_loss", "loss_sums", "mean_loss", "token_nll", "BATCH_KEYS", "apply_lora",
           "merge_lora", "has_lora", "LoRAEinsum", "LoRAParam", "param_group", "lr_schedule",
           "decay_mask", "make_session", "Session", "prepare", "recast", "as_source"]
