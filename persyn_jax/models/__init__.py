"""Flax nnx decoder LMs that load and save Hugging Face checkpoints (and `persyn_jax.convert`'s
orbax checkpoints).

    model, tokenizer = load_model("path/to/hf_or_orbax_dir", dtype="bfloat16", mesh=mesh)
    logits = model(input_ids, attention_mask)          # [batch, seq, vocab], fp32
    save_pretrained(model, tokenizer, "out_dir")       # HF layout, loads in transformers

Loading and saving live in `models/loading.py`; the decoder in `models/transformer.py`.
"""
from __future__ import annotations

from persyn_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeConfig
from persyn_jax.models.hf import CheckpointError
from persyn_jax.models.loading import (FORMAT, MARKER, as_dtype, build_model, from_orbax,
                                       from_pretrained, is_classifier, is_orbax_checkpoint,
                                       load_config, load_model, load_tokenizer, save_pretrained)
from persyn_jax.models.transformer import (CausalLM, SequenceClassifier, Transformer, init_cache,
                                           pool_last, last_token_index, CACHE_KV_AXES)

__all__ = ["from_pretrained", "save_pretrained", "load_config", "load_tokenizer", "ModelConfig",
           "RopeConfig", "CausalLM", "SequenceClassifier", "Transformer", "CheckpointError",
           "SUPPORTED_MODEL_TYPES", "init_cache", "pool_last", "as_dtype", "build_model", "load_model",
           "from_orbax", "is_orbax_checkpoint", "is_classifier", "MARKER", "FORMAT",
           "last_token_index", "CACHE_KV_AXES"]
