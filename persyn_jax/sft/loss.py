"""The SFT objective: cross-entropy over response tokens only, in fp32, packing-aware.

Sums, not means, leave this module: the step divides by the number of response tokens of the
whole global batch (all microbatches), so that k accumulated microbatches of b rows give exactly
the gradient of one batch of k·b rows (a mean of per-microbatch means would weight short
microbatches more).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from persyn_jax.runtime import logprob

Array = jax.Array
BATCH_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


def token_nll(logits: Array, targets: Array) -> tuple[Array, Array]:
  """(-log p(target), logsumexp) per token from fp32 logits [..., V]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse - tgt, lse


def chunked_nll(logits_fn: Callable[[Array], Array], hidden: Array, targets: Array,
                chunk: int) -> tuple[Array, Array]:
  """token_nll over the sequence `chunk` tokens at a time (`runtime.logprob`, shared with
  scoring); each chunk's logits are recomputed in the backward pass, so [B, T, V] logits never
  exist at once (vocabularies of 128k+)."""
  logp, lse = logprob.token_logprobs(logits_fn, hidden, targets, chunk)
  return -logp, lse


def loss_sums(model, batch: dict[str, Array], *, z_loss: float = 0.0, chunk: int = 0
              ) -> tuple[Array, dict[str, Array]]:
  """(objective sum, aux) of one batch: summed masked token losses and the token count.

  Segment ids go to the model, so packed examples never attend to each other; targets and
  loss_mask follow the SFT batch contract (the mask is 0 on prompts, padding and segment ends).
  """
  hidden, _ = model.hidden_states(batch["input_ids"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])
  if chunk and chunk < hidden.shape[1]:
    nll, lse = chunked_nll(model.logits, hidden, batch["targets"], chunk)
  else:
    nll, lse = token_nll(model.logits(hidden), batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  # where(), not a product: a masked position's loss must not leak NaN/Inf into the sum.
  ce = jnp.sum(jnp.where(mask > 0, nll * mask, 0.0))
  z = jnp.sum(jnp.where(mask > 0, jnp.square(lse) * mask, 0.0))
  count = jnp.sum(mask)
  total = ce + z_loss * z if z_loss else ce
  return total, {"ce": ce, "z": z, "count": count}


def mean_loss(model, batch: dict[str, Array], *, z_loss: float = 0.0, chunk: int = 0) -> Array:
  """The SFT loss of one batch on its own: mean over its response tokens."""
  total, aux = loss_sums(model, batch, z_loss=z_loss, chunk=chunk)
  return total / jnp.maximum(aux["count"], 1.0)
