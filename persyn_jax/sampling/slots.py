"""Continuous batching: B decode slots over one KV cache, refilled as soon as rows finish.

The static sampler decodes a batch until its longest row ends; with heavy-tailed response lengths
most slot-steps then decode padding. Here a row that stops (a stop token, or max_new_tokens) frees
its slot, and the next waiting prompt is prefilled and inserted into it:

  prefill   the waiting prompts of one bucket length L (a small batch), over the prompt only:
            a cache of L slots, the logits of each last prompt token (engine.prefill).
  insert    each prefilled prompt's KV into columns [0, L) of its slot(s), the segment ids of the
            slot reset to the prompt's mask (older keys of the slot become invisible), and the
            slot's row state (write position, logits, keys, counters) reset. A prompt with
            num_samples > 1 is prefilled once and copied into one slot per sample (prefix
            sharing).
  chunk     up to `steps` decode steps of all B slots in one on-device `while_loop`, each row at
            its own write position (`cache["end"]` is an [B] array). The loop leaves early once
            enough slots are free to be worth a refill, or when every slot is free.

Why chunks: the host must see which slots are free to refill them, and every look is a device ->
host round trip that stalls the pipeline (on a TPU or GPU, tens of microseconds to milliseconds,
more than a decode step of a small model). Checking once per chunk amortizes it; the price is at
most one chunk of idle steps for a slot that frees early in it, which the early exit bounds.

Decode attends over the first `span` cache slots only, the smallest span bucket that holds every
busy row's filled range plus the chunk: the chunk slices the cache to it, decodes, and writes it
back. Per-token decode cost thus follows the filled length, not the allocated cache (the mask from
each slot's segment ids and write position hides the rest; pallas_decode reads only that range).

Results equal the static sampler's: a row's key is fold_in(row_keys(seed, prompt, sample), its own
step), whatever its slot or when it was inserted; greedy rows are the same argmax of the same math.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from persyn_jax import sharding as shd
from persyn_jax.distributed import to_host
from persyn_jax.models import init_cache
from persyn_jax.runtime.buckets import bucket_lengths, bucket_of
from persyn_jax.sampling import logits as L
from persyn_jax.sampling.engine import Static, _constrain_cache, prefill, stop_array

Array = jax.Array
TRACES = {"init": 0, "insert": 0, "chunk": 0, "rows": 0}


@dataclasses.dataclass
class Stats:
  """What a continuous run did: slot-steps decoded (B per step), response tokens among them, host
  checks (chunks), prefill calls and prefilled prompt rows."""

  slot_steps: int = 0
  useful_tokens: int = 0
  chunks: int = 0
  prefills: int = 0
  prefill_rows: int = 0

  @property
  def useful_fraction(self) -> float:
    return self.useful_tokens / max(1, self.slot_steps)


def pow2(n: int) -> int:
  """The smallest power of two >= n (a few row counts, a few compiled shapes)."""
  return 1 << max(0, int(n) - 1).bit_length()


def init_state(model, *, slots: int, cache_len: int, st: Static) -> dict:
  """All slots free: an empty [slots, cache_len] cache with a per-slot write position."""
  TRACES["init"] += 1
  cache = init_cache(model.config, slots, cache_len, jnp.dtype(st.cache_dtype))
  cache = _constrain_cache(cache)
  cache["end"] = jnp.zeros((slots,), jnp.int32)
  zeros = lambda dt: jnp.zeros((slots,), dt)
  return {"cache": cache,
          "logits": jnp.zeros((slots, model.config.vocab_size), jnp.float32),
          "tokens": shd.constrain(jnp.full((slots, st.max_new_tokens), st.pad_id, jnp.int32),
                                  ("batch", None)),
          "length": zeros(jnp.int32), "done": jnp.ones((slots,), bool),
          "stopped": zeros(bool), "prompt_len": zeros(jnp.int32),
          "pidx": zeros(jnp.uint32), "sidx": zeros(jnp.uint32)}


def insert(model, state, small, logits, mask, slot, src, pidx, sidx, *, st: Static):
  """Writes prefilled rows into slots: slot [R] (out-of-range entries are padding, dropped), src
  [R] the row of the prefill batch (small cache [P, L, ...], logits [P, V], mask [P, L]) it takes,
  pidx/sidx [R] its prompt and sample index."""
  del model
  TRACES["insert"] += 1
  Lp = mask.shape[1]
  S = state["cache"]["segment_ids"].shape[1]
  put = lambda big, rows: big.at[slot].set(rows, mode="drop")
  # k and v are stacked over layers: [layers, slots, S, K, H]
  big, sm = state["cache"]["layers"], small["layers"]
  layers = {n: big[n].at[:, slot, :Lp].set(sm[n][:, src].astype(big[n].dtype), mode="drop")
            for n in big}
  seg = jnp.zeros((slot.shape[0], S), jnp.int32).at[:, :Lp].set(mask[src].astype(jnp.int32))
  R = slot.shape[0]
  cache = {"layers": layers, "segment_ids": put(state["cache"]["segment_ids"], seg),
           "end": put(state["cache"]["end"], jnp.full((R,), Lp, jnp.int32))}
  out = dict(state)
  out.update(cache=_constrain_cache(cache), logits=put(state["logits"], logits[src]),
             tokens=put(state["tokens"], jnp.full((R, st.max_new_tokens), st.pad_id, jnp.int32)),
             length=put(state["length"], jnp.zeros((R,), jnp.int32)),
             done=put(state["done"], jnp.zeros((R,), bool)),
             stopped=put(state["stopped"], jnp.zeros((R,), bool)),
             prompt_len=put(state["prompt_len"], jnp.sum(mask[src], axis=1, dtype=jnp.int32)),
             pidx=put(state["pidx"], pidx), sidx=put(state["sidx"], sidx))
  return out


def chunk(model, state, seed, stop_ids, exit_done, *, st: Static, steps: int, span: int):
  """Up to `steps` decode steps of every slot; stops early once >= exit_done slots are done.

  Step i of a row samples its token i from the carried logits with key fold_in(row key, i), then
  feeds it at the row's write position (prompt bucket + i) and position prompt_len + i, exactly
  as engine.decode does for a static batch. Done and free slots sample nothing and stand still.
  Returns (state, steps run).
  """
  TRACES["chunk"] += 1
  big = state["cache"]
  B = big["end"].shape[0]
  cut = lambda x, axis=1: jax.lax.slice_in_dim(x, 0, span, axis=axis)
  small = {"layers": {n: cut(x, 2) for n, x in big["layers"].items()},  # [layers, B, S, K, H]
           "segment_ids": cut(big["segment_ids"]), "end": big["end"]}
  keys = L.row_keys(seed, state["pidx"], state["sidx"])
  step_keys = jax.vmap(lambda k, i: jax.random.fold_in(k, i.astype(jnp.uint32)))
  is_stop = lambda tok: jnp.any(tok[:, None] == stop_ids[None, :], axis=1)
  rows = jnp.arange(B)
  s = {k: state[k] for k in ("logits", "tokens", "length", "done", "stopped")}

  def cond(c):
    i, _, s = c
    return (i < steps) & (jnp.sum(s["done"], dtype=jnp.int32) < exit_done)

  def body(c):
    i, cache, s = c
    active = ~s["done"]
    step = s["length"]  # a busy row's length is its step count
    tok = L.sample(s["logits"], step_keys(keys, step), st.temperature, st.top_k, st.top_p)
    tok = jnp.where(active, tok, st.pad_id)
    hit = active & is_stop(tok)
    hidden, new = model.hidden_states(tok[:, None], segment_ids=jnp.ones((B, 1), jnp.int32),
                                      positions=(state["prompt_len"] + step)[:, None],
                                      cache=cache)
    new = _constrain_cache(new) | {"end": jnp.where(active, new["end"], cache["end"])}
    length = step + active.astype(jnp.int32)
    s = {"tokens": s["tokens"].at[rows, jnp.where(active, step, st.max_new_tokens)].set(
             tok, mode="drop"),
         "logits": model.logits(hidden[:, 0]), "length": length,
         "done": s["done"] | hit | (length >= st.max_new_tokens),
         "stopped": s["stopped"] | hit}
    return i + 1, new, s

  n, small, s = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), small, s))
  paste = lambda b, x, axis=1: jax.lax.dynamic_update_slice_in_dim(b, x, 0, axis=axis)
  cache = {"layers": {n: paste(x, small["layers"][n], 2) for n, x in big["layers"].items()},
           "segment_ids": paste(big["segment_ids"], small["segment_ids"]), "end": small["end"]}
  out = dict(state)
  out.update(s, cache=_constrain_cache(cache))
  return out, n


def take_rows(model, tokens, idx):
  """Rows idx [R] of the token table [B, max_new_tokens]: only the finished rows go to the host."""
  del model
  TRACES["rows"] += 1
  return tokens[idx]


class SlotEngine:
  """The compiled init, prefill, insert and decode chunk of one (model, sampling constants, mesh)
  on a runtime Runner (the static Engine's runner: same rule set, same compile cache)."""

  def __init__(self, engine, *, chunk_steps: int):
    self.st, self.runner, self.chunk_steps = engine.st, engine.runner, int(chunk_steps)
    r = self.runner
    self._prefill = r.jit(prefill, static={"max_new_tokens": 0, "cache_dtype": self.st.cache_dtype})
    self._insert = r.jit(insert, static={"st": self.st}, donate=(0,))
    self._rows = r.jit(take_rows)

  def init(self, slots: int, cache_len: int):
    return self.runner.jit(init_state, static={"slots": slots, "cache_len": cache_len,
                                               "st": self.st})()

  def chunk(self, state, seed, stop_ids, exit_done: int, span: int):
    f = self.runner.jit(chunk, static={"st": self.st, "steps": self.chunk_steps, "span": span},
                        donate=(0,))
    return f(state, seed, stop_ids, self.runner.replicate(np.int32(exit_done)))


def run(engine, prompts: Sequence[list[int]], rows: Sequence[tuple[int, int]], *,
        prompt_index: Sequence[int], seed: int, stop_ids: tuple[int, ...], slots: int,
        buckets: Sequence[int], chunk_steps: int,
        on_done: Callable[[list[tuple[int, int, np.ndarray, int, bool]]], None],
        cache_len: int | None = None) -> Stats:
  """Generates every (prompt, sample) row of `rows` on `slots` slots; calls on_done with
  [(prompt, sample, tokens, length, stopped)] after every chunk that finished rows.

  prompts[i]: token ids; its bucket (of `buckets`) is its prefill length. Rows are started in the
  order given; the samples of a prompt that enter slots together share one prefill.
  cache_len: allocated slots per row (default: the largest bucket met + max_new_tokens).
  """
  st = engine.st
  se = SlotEngine(engine, chunk_steps=chunk_steps)
  r = se.runner
  B = -(-slots // r.shards) * r.shards
  bucket = {i: bucket_of(len(prompts[i]), buckets) for i, _ in rows}
  S = cache_len or (max(bucket.values()) + st.max_new_tokens)
  if S < max(bucket.values()) + st.max_new_tokens:
    raise ValueError(f"cache_len={S} cannot hold a {max(bucket.values())}-token prompt bucket "
                     f"and max_new_tokens={st.max_new_tokens}")
  spans = bucket_lengths(S, 16, round_up=True)
  seed_d, stops_d = r.replicate(np.uint32(seed)), r.replicate(stop_array(stop_ids))
  state = se.init(B, S)
  queue = deque(rows)
  owner: list[tuple[int, int] | None] = [None] * B   # (prompt, sample) in each slot
  filled = np.zeros((B,), np.int64)                  # a busy slot's last written column + 1
  stats = Stats()
  refill = max(1, B // 8)

  while queue or any(o is not None for o in owner):
    free = [b for b in range(B) if owner[b] is None]
    if queue and free:
      state = _fill(se, state, prompts, bucket, queue, free, owner, filled, prompt_index, stats)
    busy = [b for b in range(B) if owner[b] is not None]
    n_free = B - len(busy)
    exit_done = min(B, n_free + refill) if queue else B
    span = bucket_of(min(S, int(filled[busy].max()) + chunk_steps), spans)
    state, n = se.chunk(state, seed_d, stops_d, exit_done, span)
    done, length, stopped, n = (to_host(x) for x in (state["done"], state["length"],
                                                     state["stopped"], n))
    stats.chunks += 1
    stats.slot_steps += int(n) * B
    finished = [b for b in busy if done[b]]
    for b in busy:
      filled[b] = bucket[owner[b][0]] + int(length[b])
    if finished:  # their rows only (a few compiled row counts), not the whole [B, max_new] table
      idx = np.zeros((pow2(len(finished)),), np.int32)
      idx[:len(finished)] = finished
      tokens = to_host(se._rows(state["tokens"], r.replicate(idx)))
      out = []
      for k, b in enumerate(finished):
        i, s = owner[b]
        out.append((i, s, tokens[k, :length[b]], int(length[b]), bool(stopped[b])))
        stats.useful_tokens += int(length[b])
        owner[b] = None
      on_done(out)
  return stats


def _fill(se: SlotEngine, state, prompts, bucket, queue, free, owner, filled, prompt_index,
          stats: Stats):
  """Moves rows from the queue head into the free slots: one prefill per bucket length among
  them (each prompt once), then one insert per prefill."""
  r, pad = se.runner, se.st.pad_id
  take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
  groups: dict[int, list[tuple[int, int, int]]] = {}
  for (i, s), b in zip(take, free):
    groups.setdefault(bucket[i], []).append((i, s, b))
    owner[b] = (i, s)
    filled[b] = bucket[i]
  B = len(owner)
  for Lp, items in groups.items():
    uniq = list(dict.fromkeys(i for i, _, _ in items))
    P = -(-pow2(len(uniq)) // r.shards) * r.shards  # rows over the mesh's batch axes
    ids = np.full((P, Lp), pad, np.int32)
    mask = np.zeros((P, Lp), np.int32)
    for k, i in enumerate(uniq):
      p = prompts[i]
      ids[k, Lp - len(p):], mask[k, Lp - len(p):] = p, 1
    small, logits = se._prefill(r.put(ids), r.put(mask))
    stats.prefills += 1
    stats.prefill_rows += len(uniq)
    R = pow2(len(items))
    slot = np.full((R,), B, np.int32)  # padding entries point past the last slot: dropped
    src = np.zeros((R,), np.int32)
    pidx = np.zeros((R,), np.uint32)
    sidx = np.zeros((R,), np.uint32)
    pos = {i: k for k, i in enumerate(uniq)}
    for k, (i, s, b) in enumerate(items):
      slot[k], src[k], pidx[k], sidx[k] = b, pos[i], prompt_index[i], s
    state = se._insert(state, small, logits, r.replicate(mask),
                       *(r.replicate(x) for x in (slot, src, pidx, sidx)))
  return state
