"""Continuous against static batching on CPU: the useful-token fraction on a heavy-tailed workload,
and the decode cost per token as the allocated KV cache grows.

    python bench/continuous.py                  # a small random Llama-shaped model, float32
    python bench/continuous.py --rows 2048 --slots 32

1. Useful fraction = response tokens / slot-steps decoded (slots x decode steps). The workload is
   sampler.py's "eos" one: random stop ids on random weights give geometric response lengths
   (mean ~new/4, capped at new), so a static batch runs ~4x its mean row. Static batching decodes
   every batch until its longest row ends; continuous batching refills a slot as its row stops,
   and wastes only the idle steps of a freed slot within a chunk and the drain at the end of the
   queue. Both sides produce the same tokens; the wall time of each is given too.
2. Flat decode: a job of full-length rows (no stops) run with the slot cache allocated at 1x, 4x
   and 16x what it needs; decode attends over the filled span only, so seconds per token should
   not grow with the allocation. The three sizes alternate, `--flat-runs` runs a measurement.
Both sides alternate over >= 3 repeats (bench/common.py); the JSON records the machine's load.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

import common as C  # bench/common.py (this directory is on sys.path when run as a script)
from sampler import stop_set

MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=32)


def static_run(engine, prompts, B, seed, stops):
  """All rows in input order, B per batch; returns (tokens per row, slot-steps)."""
  import jax
  L = max(map(len, prompts))
  out, slot_steps, pending = [], 0, []
  for start in range(0, len(prompts), B):
    rows = prompts[start:start + B]
    ids = np.zeros((B, L), np.int32)
    mask = np.zeros((B, L), np.int32)
    for r, p in enumerate(rows):
      ids[r, L - len(p):], mask[r, L - len(p):] = p, 1
    idx = np.arange(start, start + B, dtype=np.uint32)
    pending.append((len(rows), engine.start(ids, mask, seed, idx, idx * 0, stops)))
  for n, (tokens, length, _) in pending:
    tokens, length = np.asarray(jax.device_get(tokens)), np.asarray(jax.device_get(length))
    slot_steps += int(length.max()) * B
    out += [tokens[r, :length[r]].tolist() for r in range(n)]
  return out, slot_steps


def continuous_run(engine, prompts, B, seed, stops, chunk, cache_len=None):
  from persyn_jax.sampling import slots
  out = {}
  L = max(map(len, prompts))
  stats = slots.run(engine, prompts, [(i, 0) for i in range(len(prompts))],
                    prompt_index=range(len(prompts)), seed=seed, stop_ids=stops, slots=B,
                    buckets=[L], chunk_steps=chunk, cache_len=cache_len,
                    on_done=lambda done: out.update({i: t.tolist() for i, _, t, _, _ in done}))
  return [out[i] for i in range(len(prompts))], stats


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", type=int, default=1024)
  ap.add_argument("--slots", type=int, default=16)
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--chunk", type=int, default=16, help="decode steps per host check")
  ap.add_argument("--repeats", type=int, default=C.MIN_REPEATS)
  ap.add_argument("--flat-runs", type=int, default=4,
                  help="whole runs per measurement of the decode cost against the cache size")
  ap.add_argument("--threads", type=int, default=None)
  ap.add_argument("--out", default=None, help="JSON path (default bench/results/"
                                                "continuous_<device>.json)")
  args = ap.parse_args(argv)
  threads = C.pin_threads(args.threads)
  load_before = C.check_load("before")

  from persyn_jax import models
  from persyn_jax.models.config import ModelConfig
  from persyn_jax.sampling import engine as E

  cfg = ModelConfig(model_type="llama", tie_embeddings=True, rms_norm_eps=1e-5,
                    max_position_embeddings=4096, eos_token_id=None, pad_token_id=0, **MODEL)
  model = models.build_model(cfg, dtype="float32", seed=0)
  B, L, new = args.slots, args.prompt_len, args.new_tokens
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, cfg.vocab_size, (int(n),)).tolist()
             for n in rng.integers(L // 2, L + 1, args.rows)]
  stops = stop_set("eos", cfg.vocab_size, new)
  # temperature 1: on random weights the next token is near uniform, so the stop set gives
  # geometric lengths (greedy would lock into a loop)
  eng = E.Engine(model, E.Static(new, 1.0, 0, 1.0, "float32", 0))

  # 1. useful fraction (the same tokens on both sides), and wall time
  log = {"static": [], "continuous": []}
  ref, static_steps = static_run(eng, prompts, B, 0, stops)  # also compiles
  got, stats = continuous_run(eng, prompts, B, 0, stops, args.chunk)
  assert got == ref, "continuous batching must give the static batches' tokens"
  useful = sum(map(len, ref))

  def side(name, fn):
    def run():
      t = time.perf_counter()
      fn()
      dt = time.perf_counter() - t
      log[name].append(dt)
      return dt
    return run

  times = C.alternate({"static": side("static", lambda: static_run(eng, prompts, B, 0, stops)),
                       "continuous": side("continuous", lambda: continuous_run(
                           eng, prompts, B, 0, stops, args.chunk))}, args.repeats)
  lengths = np.array([len(r) for r in ref])
  fraction = {"static": useful / static_steps, "continuous": stats.useful_fraction,
              "useful_tokens": useful, "static_slot_steps": static_steps,
              "continuous_slot_steps": stats.slot_steps, "chunks": stats.chunks,
              "length_mean": float(lengths.mean()), "length_p50": float(np.median(lengths)),
              "length_p99": float(np.percentile(lengths, 99)), "length_max": int(lengths.max())}
  print(f"useful-token fraction: static {fraction['static']:.2f}, continuous "
        f"{fraction['continuous']:.2f} (goal >= 0.9); wall static "
        f"{C.fmt_spread(times['static'], unit='s')}, continuous "
        f"{C.fmt_spread(times['continuous'], unit='s')}")

  # 2. decode cost per token against the allocated cache: the sizes alternate (1x 4x 16x, 16x 4x
  # 1x, ...) so that drift of the machine falls on all of them alike; each measurement is
  # `--flat-runs` whole runs (each with its one-time state allocation, under 1 ms on CPU)
  full = prompts[:2 * B]
  need = L + new
  tokens = len(full) * new * args.flat_runs
  sizes = [need * mult for mult in (1, 4, 16)]

  def per_token(S):
    def run():
      t = time.perf_counter()
      for _ in range(args.flat_runs):
        continuous_run(eng, full, B, 0, (), args.chunk, cache_len=S)
      return (time.perf_counter() - t) / tokens
    return run

  for S in sizes:
    continuous_run(eng, full, B, 0, (), args.chunk, cache_len=S)  # compile
  flat = C.alternate({str(S): per_token(S) for S in sizes}, max(args.repeats, 5))
  for S in sizes:
    print(f"cache {S} slots per row: {C.fmt_spread(flat[str(S)], 1e6, 'us')} per token")
  meds = [s["median"] for s in flat.values()]
  growth = max(meds) / min(meds)
  print(f"per-token cost, 16x cache over 1x: {meds[-1] / meds[0]:.2f}x")

  result = {"bench": "continuous", **C.environment(load_before, threads),
            "config": {**vars(args), "model": dataclasses.asdict(cfg), "stop_ids": len(stops)},
            "useful_fraction": fraction, "wall_s": times,
            "decode_s_per_token_by_cache_len": flat, "per_token_growth_max_over_min": growth}
  C.write_json(args.out or C.results_path(
      f"continuous_{C.device()['platform']}.json"), result)
  return result


if __name__ == "__main__":
  main()
