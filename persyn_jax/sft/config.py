"""The SFT stage's configuration: one frozen dataclass, defaults from the paper (LoRA's own config
lives with the adapters in models/lora.py)."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

from persyn_jax.config import check_dtype
from persyn_jax.models.lora import LoRAConfig
from persyn_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Student SFT. `batch_size` rows per microbatch; one optimizer step takes `grad_accum` of them.

  The run is `max_steps` optimizer steps, or (max_steps = 0) `epochs` passes over the data.
  """

  # optimizer (optax AdamW) and schedule: the paper's default is lr 2e-5, cosine with warmup
  lr: float = 2e-5
  schedule: Literal["cosine", "linear", "constant"] = "cosine"
  warmup_steps: int = 0  # > 0 overrides warmup_ratio
  warmup_ratio: float = 0.03
  min_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0  # global norm; 0 = off
  grad_accum: int = 1
  # data
  batch_size: int = 8
  seq_len: int = 4096
  epochs: float = 2.0
  max_steps: int = 0
  unfinished: Literal["keep", "drop"] = "keep"  # a response cut by max_new_tokens (SFT.md)
  # numerics
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"  # master weights of the trained parameters
  z_loss: float = 0.0  # coefficient of mean(logsumexp^2) over response tokens; 0 = off
  loss_chunk: int = 0  # > 0: logits computed (and recomputed in backward) this many tokens at a time
  remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"  # recompute each scanned block in backward (SFT.md)
  unroll_layers: bool | None = None  # unroll the layer scan; None: on CPU only (SFT.md)
  # checkpoints, eval, logs
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  async_checkpoint: bool = True
  eval_every: int = 0  # 0 = only at the end (when eval batches are given)
  log_every: int = 10
  tensorboard: bool = True
  progress: bool = True
  peak_tflops: float = 0.0  # per device, for MFU; 0 = from the device kind (None if unknown)
  export: bool = True  # write the final student in HF layout to <out_dir>/student
  export_dtype: str | None = "bfloat16"  # None: as stored (param_dtype)
  seed: int = 0
  lora: LoRAConfig = LoRAConfig()
  mesh: MeshConfig | None = None  # the SFT stage's own mesh; None = the run's mesh

  def __post_init__(self):
    for name in ("compute_dtype", "param_dtype"):
      check_dtype(getattr(self, name), f"sft.{name}")
    if self.export_dtype is not None:
      check_dtype(self.export_dtype, "sft.export_dtype")
    # optimizer numbers: a NaN or inf would train to NaN (or never stop), b1/b2 >= 1 never forget
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"sft.lr={self.lr}: must be a finite number > 0")
    if not (math.isfinite(self.eps) and self.eps > 0):
      raise ValueError(f"sft.eps={self.eps}: must be a finite number > 0")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"sft.{name}={getattr(self, name)}: must be in [0, 1)")
    for name in ("grad_clip", "weight_decay", "z_loss", "peak_tflops", "epochs"):
      v = getattr(self, name)
      if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"sft.{name}={v}: must be a finite number >= 0")
    positive = ("batch_size", "seq_len", "grad_accum", "checkpoint_every", "keep_checkpoints",
                "log_every")
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
    for name in ("max_steps", "warmup_steps", "eval_every", "loss_chunk"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
    if not 0.0 <= self.warmup_ratio < 1.0:
      raise ValueError(f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(f"min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
    if self.seed < 0:  # numpy's SeedSequence would refuse it in the SFT stage, after the teachers
      raise ValueError(f"sft.seed={self.seed}: must be >= 0")
    if self.unfinished not in ("drop", "keep"):
      raise ValueError(f"sft.unfinished={self.unfinished!r}: 'drop' or 'keep'")
    if self.max_steps == 0 and self.epochs <= 0:
      raise ValueError("either max_steps > 0 or epochs > 0 is needed")
    if self.loss_chunk and self.seq_len % self.loss_chunk:
      raise ValueError(f"loss_chunk={self.loss_chunk} does not divide seq_len={self.seq_len}")

  def replace(self, **kw) -> "SFTConfig":
    return dataclasses.replace(self, **kw)
