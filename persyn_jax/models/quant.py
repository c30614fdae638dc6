"""Weight-only int8 teachers, with qwix (Google's JAX quantization library).

    model = quantize_model(model, "int8")     # or load_model(..., quantize="int8")

Every projection of the decoder blocks (q, k, v, o, gate, up, down) is stored as int8 with one
bf16/fp32 scale per output channel (qwix post-training quantization, symmetric absmax over the
contracted axis); activations stay in the compute dtype and qwix dequantizes inside each einsum.
The embedding, the LM head and the norms stay as loaded: the tied embedding is also a lookup
table, and the head's error would reach every logit directly. A 70B teacher's weights drop from
141.1 GB (bf16) to 72.7 GB; the error on tiny models is in docs/INT8.md and tests/test_int8.py.

qwix is an optional dependency: `pip install 'persyn_jax[int8]'`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from persyn_jax.models.layers import layer_data

MODES = ("int8",)
# every Einsum of a decoder block (paths inside the block: attn/q, mlp/down, ...)
BLOCK_PATHS = r".*"


def quantize_model(model: nnx.Module, mode: str, *, what: str = "model") -> nnx.Module:
  """`model` (a CausalLM or SequenceClassifier) with its decoder weights quantized (in place: the
  model's stacked block is swapped for the quantized one; returns the model)."""
  if mode not in MODES:
    raise ValueError(f"{what}: quantize={mode!r}: supported modes are {MODES} (or none)")
  try:
    import qwix
  except ImportError:
    raise ImportError(f"{what}: quantize={mode!r} needs qwix: pip install 'persyn_jax[int8]'") from None
  rules = [qwix.QuantizationRule(module_path=BLOCK_PATHS, weight_qtype=jnp.int8)]
  decoder = model.model
  cfg = decoder.cfg
  data = layer_data(cfg)
  # qwix quantizes the weights an intercepted einsum meets in the module it runs, which inside
  # the layer scan are slices, not the module's stacked parameters. So qwix quantizes one layer
  # at a time, on a plain (unstacked) block holding that layer's slice, and the quantized layers
  # are stacked again: the scan then hands each layer its int8 slice and its scales, and the
  # quantized block's intercepted call dequantizes inside each einsum. One token suffices to
  # trace every projection once.
  graphdef, state = nnx.split(decoder.layers)
  one = jnp.ones((1, 1), jnp.int32)
  zero = jnp.zeros((1, 1), jnp.int32)
  x = jnp.zeros((1, 1, cfg.hidden_size), decoder.dtype)
  done = None
  quantized = []
  for i in range(cfg.num_layers):
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    block = qwix.quantize_model(block, qwix.PtqProvider(rules), x, positions=zero, q_idx=zero,
                                q_seg=one, kv=None, k_seg=one, end=0, layer=jnp.int32(i),
                                inv_freq=data["inv_freq"][i], window=data["window"][i])
    done, layer_state = nnx.split(block)
    quantized.append(layer_state)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *quantized)
  decoder.layers = nnx.merge(done, stacked)
  return model


def is_quantized(model: nnx.Module) -> bool:
  decoder = getattr(model, "model", model)
  return hasattr(type(getattr(decoder, "layers", None)), "_unquantized_type")
