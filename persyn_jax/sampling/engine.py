"""The device side of generation: a jitted prefill and a jitted on-device decode loop.

One batch = B left-padded prompts of bucket length L. The KV cache has L + max_new_tokens slots,
is created inside the prefill (sharded like the model: batch over data/fsdp, kv heads over
tensor), handed to the decode loop and donated there, so it is updated in place, never copied.
The decode loop is a `lax.while_loop` that stops when every row has produced a stop token or
max_new_tokens tokens: the host waits once per batch, not once per token.

Both run on the device runtime (`runtime.runner`) under the serving rule set: compiled once per
(model graph, sampling constants, mesh); jax.jit then keeps one executable per (batch, bucket)
shape, so a job compiles once per shape it meets. Seed, prompt indices and stop ids are runtime
arrays: changing them never recompiles.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from persyn_jax import sharding as shd
from persyn_jax.models import CACHE_KV_AXES, init_cache
from persyn_jax.runtime.runner import Runner
from persyn_jax.sampling import logits as L

Array = jax.Array

# Number of times a prefill or decode function was traced (a retrace means a recompile); tests
# and the benchmark read it to check that shapes are reused.
TRACES = {"prefill": 0, "decode": 0}
STOP_PAD = 8  # stop ids are a runtime array padded to a multiple of this: new stops, no recompile


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything a compiled function depends on besides array shapes (hashable)."""

  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  cache_dtype: str
  pad_id: int


def _constrain_cache(cache: dict) -> dict:
  layers = {k: shd.constrain(v, CACHE_KV_AXES) for k, v in cache["layers"].items()}
  segment_ids = shd.constrain(cache["segment_ids"], ("batch", "cache_seq"))
  return {"layers": layers, "segment_ids": segment_ids, "end": cache["end"]}


def stop_array(stop_ids: tuple[int, ...]) -> np.ndarray:
  n = max(STOP_PAD, -(-len(stop_ids) // STOP_PAD) * STOP_PAD)
  out = np.full((n,), -1, np.int32)
  out[:len(stop_ids)] = stop_ids
  return out


def prefill(model, input_ids, mask, *, max_new_tokens: int, cache_dtype: str):
  """input_ids, mask [B, L] (left-padded, mask 1 on tokens) -> (cache, logits of the last prompt
  token [B, V] fp32). The cache has L + max_new_tokens slots. Depends only on the cache's length
  and dtype, so greedy and sampled jobs share its compiled code."""
  TRACES["prefill"] += 1
  B, T = input_ids.shape
  cache = init_cache(model.config, B, T + max_new_tokens, jnp.dtype(cache_dtype))
  cache = _constrain_cache(cache)
  mask = mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  hidden, cache = model.hidden_states(input_ids, segment_ids=mask, positions=positions, cache=cache)
  # left padding: the last slot holds every row's last prompt token
  return _constrain_cache(cache), model.logits(hidden[:, -1])


def decode(model, cache, logits, mask, seed, prompt_index, sample_index, stop_ids, *, st: Static):
  """Samples up to max_new_tokens tokens per row from the prefill's cache and logits.

  Step i samples token i from the carried logits, then feeds it to get the logits of step i+1
  (the feed of the last step is wasted work: one step in max_new_tokens). Rows whose mask is all
  0 are batch padding and start out finished. Returns (tokens [B, max_new] (pad after a row's
  end), length [B] (tokens up to and including the stop token), stopped [B], cache); the cache
  is returned only so that XLA aliases it with the donated input and updates it in place.
  """
  TRACES["decode"] += 1
  B = mask.shape[0]
  prompt_len = jnp.sum(mask, axis=1, dtype=jnp.int32)
  keys = L.row_keys(seed, prompt_index, sample_index)
  is_stop = lambda tok: jnp.any(tok[:, None] == stop_ids[None, :], axis=1)
  s = {"tokens": shd.constrain(jnp.full((B, st.max_new_tokens), st.pad_id, jnp.int32),
                               ("batch", None)),
       "logits": logits, "length": jnp.zeros((B,), jnp.int32), "done": prompt_len == 0,
       "stopped": jnp.zeros((B,), bool), "step": jnp.zeros((), jnp.int32)}

  def cond(c):
    return (c[1]["step"] < st.max_new_tokens) & ~jnp.all(c[1]["done"])

  def body(c):
    cache, s = c
    i = s["step"]
    tok = L.sample(s["logits"], L.step_keys(keys, i), st.temperature, st.top_k, st.top_p)
    tok = jnp.where(s["done"], st.pad_id, tok)
    hit = ~s["done"] & is_stop(tok)
    # token i of the response sits at position prompt_len + i
    hidden, cache = model.hidden_states(tok[:, None], segment_ids=jnp.ones((B, 1), jnp.int32),
                                        positions=(prompt_len + i)[:, None], cache=cache)
    s = {"tokens": jax.lax.dynamic_update_slice(s["tokens"], tok[:, None], (0, i)),
         "logits": model.logits(hidden[:, 0]),
         "length": s["length"] + (~s["done"]).astype(jnp.int32),
         "done": s["done"] | hit, "stopped": s["stopped"] | hit, "step": i + 1}
    return _constrain_cache(cache), s

  cache, s = jax.lax.while_loop(cond, body, (cache, s))
  return s["tokens"], s["length"], s["stopped"], cache


class Engine:
  """The compiled prefill and decode of one (model, sampling constants, mesh), on a runtime
  Runner under the serving rule set."""

  def __init__(self, model, st: Static, mesh=None):
    self.st = st
    self.runner = Runner(model, mesh=mesh, rules=shd.SERVING)
    self.mesh = self.runner.mesh
    self._prefill = self.runner.jit(prefill, static={"max_new_tokens": st.max_new_tokens,
                                                     "cache_dtype": st.cache_dtype})
    # the cache (decode's first argument) is consumed: XLA updates its buffer in place
    self._decode = self.runner.jit(decode, static={"st": st}, donate=(0,))

  def start(self, input_ids: np.ndarray, mask: np.ndarray, seed: int, prompt_index: np.ndarray,
            sample_index: np.ndarray, stop_ids: tuple[int, ...]):
    """Dispatches one batch (asynchronously); returns device arrays (tokens, length, stopped)."""
    cache, logits = self.run_prefill(input_ids, mask)
    return self.run_decode(cache, logits, mask, seed, prompt_index, sample_index, stop_ids)[:3]

  def run_prefill(self, input_ids, mask):
    put = self.runner.put
    return self._prefill(put(np.asarray(input_ids, np.int32)), put(np.asarray(mask, np.int32)))

  def run_decode(self, cache, logits, mask, seed, prompt_index, sample_index, stop_ids):
    r = self.runner
    return self._decode(cache, logits, r.put(np.asarray(mask, np.int32)),
                        r.replicate(np.uint32(seed)), r.put(np.asarray(prompt_index, np.uint32)),
                        r.put(np.asarray(sample_index, np.uint32)),
                        r.replicate(stop_array(stop_ids)))
