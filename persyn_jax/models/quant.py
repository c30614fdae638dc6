"""Weight-only int8 teachers, with qwix (Google's JAX quantization library).

    model = quantize_model(model, "int8")     # or load_model(..., quantize="int8")

Every projection of the decoder blocks (q, k, v, o, gate, up, down) is stored as int8 with one
bf16/fp32 scale per output channel (qwix post-training quantization, symmetric absmax over the
contracted axis); activations stay in the compute dtype and qwix dequantizes inside each einsum.
The embedding, the LM head and the norms stay as loaded: the tied embedding is also a lookup
table, and the head's error would reach every logit directly. A 70B teacher's weights drop from
140 GB (bf16) to about 72 GB; the error on tiny models is in docs/INT8.md and tests/test_int8.py.

qwix is an optional dependency: `pip install 'persyn_jax[int8]'`.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

MODES = ("int8",)
# the decoder blocks' Einsum modules (model/layers/<i>/...); not the embedding or the LM head
LAYER_PATHS = r"layers/.*"


def quantize_model(model: nnx.Module, mode: str, *, what: str = "model") -> nnx.Module:
  """`model` (a CausalLM or SequenceClassifier) with its decoder weights quantized (in place: the
  model's decoder is swapped for the quantized one; returns the model)."""
  if mode not in MODES:
    raise ValueError(f"{what}: quantize={mode!r}: supported modes are {MODES} (or none)")
  try:
    import qwix
  except ImportError:
    raise ImportError(f"{what}: quantize={mode!r} needs qwix: pip install 'persyn_jax[int8]'") from None
  rules = [qwix.QuantizationRule(module_path=LAYER_PATHS, weight_qtype=jnp.int8)]
  # The decoder (not the whole model) is what qwix wraps: qwix intercepts one method, and the
  # sampler calls the decoder through `hidden_states`, the LM head through `logits`. One token
  # suffices to trace every projection once; qwix quantizes the weights as they are loaded.
  ids = jnp.zeros((1, 1), jnp.int32)
  ones = jnp.ones((1, 1), jnp.int32)
  model.model = qwix.quantize_model(model.model, qwix.PtqProvider(rules), ids,
                                    positions=jnp.zeros((1, 1), jnp.int32), segment_ids=ones)
  return model


def is_quantized(model: nnx.Module) -> bool:
  return hasattr(type(getattr(model, "model", model)), "_unquantized_type")
