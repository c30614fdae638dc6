"""Sampler benchmark: prefill and decode tokens/s of persyn_jax's sampler next to transformers'
PyTorch `generate` on the same random weights, with the fraction of the roofline reached.

    python bench/sampler.py                      # GPU: ~1.2B Llama-3-shaped model, bf16
    python bench/sampler.py --preset cpu-small   # a tiny model on CPU (ratios only)

Roofline (decode): one step must read every weight and the filled part of the KV cache once, so
  tokens/s <= batch * HBM bandwidth / (weight bytes + KV bytes read per step),
with the KV bytes averaged over the steps (prompt + i + 1 tokens at step i from 0;
decode_bytes_per_step). Prefill: model FLOPs (prefill_flops: the LM head at the last prompt token
only) over the peak bf16 FLOP/s. Bandwidth: the spec sheet and a measured device copy. On CPU no
roofline is given (no meaningful peak); compare the ratios to transformers instead.
Decode time = the on-device decode loop (ours) / generate(new) - generate(1) (transformers);
every row runs all `new` tokens (no stop token) unless --workload eos; greedy unless --sampling
paper. The two sides alternate over >= 3 repeats with the same thread count (bench/common.py);
figures are medians with min/max/quartiles in the JSON, and the machine's load is recorded.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time

import numpy as np

import common as C  # bench/common.py (this directory is on sys.path when run as a script)

PRESETS = {
    # Llama-3.2-1B's shape (tied embeddings, 1.24B parameters)
    "gpu-1b": dict(model=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                              num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64),
                   batches=[1, 16, 64, 256], prompt_len=512, new_tokens=256, dtype="bfloat16",
                   repeats=3),
    "cpu-tiny": dict(model=dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
                     batches=[4], prompt_len=16, new_tokens=8, dtype="float32", repeats=3),
    "cpu-small": dict(model=dict(vocab_size=8192, hidden_size=256, intermediate_size=1024,
                                 num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32),
                      batches=[1, 4, 16], prompt_len=64, new_tokens=32, dtype="float32", repeats=3),
}
SAMPLING = {"greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
            "paper": dict(temperature=0.7, top_k=0, top_p=0.95)}


def measure_bandwidth(jax, jnp, nbytes: int) -> float:
  """Bytes/s of a jitted read-and-write of an nbytes array (counts both directions)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  f(x).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * nbytes / min(times)


def stop_set(workload: str, vocab: int, new: int) -> tuple[int, ...]:
  """Stop token ids of a workload. "full": none (every row runs all `new` tokens). "eos": a random
  set of 4 * vocab / new ids; on random weights the next token is close to uniform, so a row stops
  at each step with probability ~4 / new: geometric lengths with mean ~new / 4, capped at new. At
  batch 64 the longest row then runs ~4x the mean, the waste static batching pays on real
  heavy-tailed response lengths (25-40% useful work)."""
  if workload == "full":
    return ()
  rng = np.random.default_rng(7)
  n = max(1, min(vocab // 2, 4 * vocab // new))
  return tuple(int(t) for t in rng.choice(np.arange(10, vocab), n, replace=False))


def prefill_flops(cfg, B: int, L: int) -> float:
  """Model FLOPs of one prefill of B prompts of L tokens: every token through the layers (causal
  attention), the LM head at the last token only, as both sides compute it (our engine's prefill
  returns the last position's logits; transformers' generate keeps only those)."""
  head = 2 * cfg.vocab_size * cfg.hidden_size
  return B * (L * (cfg.flops_per_token(L) - head) + head)


def decode_bytes_per_step(cfg, B: int, L: int, new: int, itemsize: int) -> dict:
  """HBM bytes one step of our decode loop must read, averaged over its `new` steps: every weight
  of the layers and the LM head once (the embedding lookup reads B rows only), and the filled KV
  cache: step i (from 0) feeds token i at position L + i and attends over L + i + 1 cached
  tokens, L + (new + 1) / 2 on average. kv_allocated: the whole cache, for comparison."""
  kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
  weights = (cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size) * itemsize
  return {"weights": weights, "kv_filled": B * (L + (new + 1) / 2) * kv_token,
          "kv_allocated": B * (L + new) * kv_token}


def make_ours(model, cfg, B, L, new, sampling, dtype, stops):
  """A measurement of one prefill + decode of our engine; it appends its parts to `log`."""
  import jax
  from persyn_jax.sampling import engine
  st = engine.Static(new, sampling["temperature"], sampling["top_k"], sampling["top_p"], dtype, 0)
  eng = engine.Engine(model, st)
  rng = np.random.default_rng(B)
  ids = rng.integers(10, cfg.vocab_size, (B, L), dtype=np.int32)
  mask = np.ones((B, L), np.int32)
  idx = np.arange(B, dtype=np.uint32)
  log = {"prefill_s": [], "decode_s": [], "useful_tokens": [], "slot_steps": []}
  state = {"seed": 0}

  def measure() -> float:
    t0 = time.perf_counter()
    cache, logits = eng.run_prefill(ids, mask)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    # a new seed per repeat: sampled lengths vary between repeats, as they would in a run
    out = eng.run_decode(cache, logits, mask, state["seed"], idx, idx * 0, stops)
    length = np.asarray(jax.block_until_ready(out[1]))
    t2 = time.perf_counter()
    state["seed"] += 1
    if not stops:
      assert int(length.min()) == new, "every row must run all new tokens"
    log["prefill_s"].append(t1 - t0)
    log["decode_s"].append(t2 - t1)
    log["useful_tokens"].append(int(length.sum()))
    log["slot_steps"].append(B * int(length.max()))  # the loop ends when its longest row does
    return t2 - t0

  t = time.perf_counter()
  measure()  # compile
  compile_s = time.perf_counter() - t
  for v in log.values():
    v.clear()
  return measure, log, compile_s


def make_torch(path, B, L, new, vocab, sampling, dtype, device, compile_, stops):
  """A measurement of transformers' generate (static cache): generate(1) then generate(new)."""
  import torch
  import transformers
  tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=tdtype).to(device).eval()
  model.generation_config.eos_token_id = list(stops) or None
  if compile_:
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
  rng = np.random.default_rng(B)
  ids = torch.tensor(rng.integers(10, vocab, (B, L)), dtype=torch.long, device=device)
  mask = torch.ones_like(ids)
  kw = dict(do_sample=sampling["temperature"] > 0, pad_token_id=0)
  if kw["do_sample"]:
    kw.update(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=None)
  box = {"cache": "static"}
  stop_t = torch.tensor(list(stops) or [-1], device=device)

  def gen(n):
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                           min_new_tokens=None if stops else n, cache_implementation=box["cache"],
                           **kw)
    if device == "cuda":
      torch.cuda.synchronize()
    return out[:, L:]

  try:
    gen(new)
  except Exception as e:  # an older/newer transformers without a static cache for this model
    print(f"transformers static cache failed ({type(e).__name__}: {e}); using the dynamic cache")
    box["cache"] = "dynamic"
    gen(new)
  gen(1)
  log = {"prefill_s": [], "decode_s": [], "useful_tokens": [], "decode_tokens": [],
         "slot_steps": [], "cache": box["cache"]}

  def measure() -> float:
    t0 = time.perf_counter()
    gen(1)
    t1 = time.perf_counter()
    toks = gen(new)
    t2 = time.perf_counter()
    hit = torch.isin(toks, stop_t)
    # tokens up to and including the first stop (all `new` when none): our `length`
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full_like(hit[:, 0], new,
                                                                              dtype=torch.long))
    log["prefill_s"].append(t1 - t0)
    log["decode_s"].append((t2 - t1) - (t1 - t0))  # generate(new) - generate(1)
    log["useful_tokens"].append(int(first.sum()))
    log["slot_steps"].append(B * toks.shape[1])  # generate ends when its longest row does
    # generate(1) made each row's first token: the time difference holds the other ones only
    log["decode_tokens"].append(int(first.sum()) - B)
    return (t1 - t0) + (t2 - t1)

  return measure, log


def summarize(log: dict, B: int, L: int, new: int, stops) -> dict:
  """Spreads of times and rates (prefill tok/s over the prompt; end-to-end over the useful
  tokens: those up to each row's stop; decode over the useful tokens made in the decode time:
  all of them in our decode loop, all but each row's first in generate(new) - generate(1), which
  can come out <= 0 for tiny runs on a noisy machine, then no decode rate is given)."""
  pre = log["prefill_s"]
  dec = log["decode_s"]
  useful = log["useful_tokens"]
  decoded = log.get("decode_tokens", useful)
  rate = lambda num, den: [n / d for n, d in zip(num, den) if d > 0] or None
  out = {"prefill_s": C.spread(pre), "decode_s": C.spread(dec),
         "prefill_tok_s": C.spread([B * L / t for t in pre]),
         "decode_tok_s": rate(decoded, dec), "e2e_tok_s": rate(useful, [a + b for a, b in
                                                                       zip(pre, dec)]),
         "useful_tokens": C.spread(useful),
         # response tokens / slot-steps decoded (B x the longest row), as bench/continuous.py
         "useful_fraction": C.spread([u / n for u, n in zip(useful, log["slot_steps"])])}
  for k in ("decode_tok_s", "e2e_tok_s"):
    out[k] = C.spread(out[k]) if out[k] else None
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                  help="default: gpu-1b on a GPU/TPU, cpu-small on CPU")
  ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
  ap.add_argument("--prompt-len", type=int, default=None)
  ap.add_argument("--new-tokens", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=None, help=f">= {C.MIN_REPEATS}")
  ap.add_argument("--sampling", choices=sorted(SAMPLING), default="greedy")
  ap.add_argument("--workload", choices=("full", "eos"), default="full",
                  help="full: every row runs all new tokens; eos: random stop tokens give "
                       "geometric response lengths (see stop_set)")
  ap.add_argument("--threads", type=int, default=None, help="intra-op threads of both sides")
  ap.add_argument("--no-torch", action="store_true", help="skip transformers")
  ap.add_argument("--torch-compile", action="store_true",
                  help="torch.compile(mode='reduce-overhead') transformers' forward")
  ap.add_argument("--out", default=None,
                  help="JSON path (default bench/results/sampler_<device>_<date>.json)")
  args = ap.parse_args(argv)
  threads = C.pin_threads(args.threads)
  load_before = C.check_load("before")

  import jax
  import jax.numpy as jnp
  from persyn_jax import models
  from persyn_jax.models.config import ModelConfig, RopeConfig

  dev = jax.devices()[0]
  on_cpu = dev.platform == "cpu"
  preset_name = args.preset or ("cpu-small" if on_cpu else "gpu-1b")
  preset = dict(PRESETS[preset_name])
  batches = args.batches or preset["batches"]
  L = args.prompt_len or preset["prompt_len"]
  new = args.new_tokens or preset["new_tokens"]
  repeats = max(args.repeats or preset["repeats"], C.MIN_REPEATS)
  dtype = preset["dtype"]
  sampling = SAMPLING[args.sampling]
  cfg = ModelConfig(model_type="llama", tie_embeddings=True, rms_norm_eps=1e-5,
                    rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=32.0,
                                    original_max_position_embeddings=8192),
                    max_position_embeddings=131072, eos_token_id=None, pad_token_id=0,
                    **preset["model"])
  stops = stop_set(args.workload, cfg.vocab_size, new)
  kind = dev.device_kind
  # dense bf16 FLOP/s, HBM bytes/s (None on CPU, or with a warning on an unknown accelerator)
  peak_flops, spec_bw = C.spec_peaks(required=False)
  meas_bw = None if on_cpu else measure_bandwidth(jax, jnp, 1 << 30)
  itemsize = np.dtype(jnp.dtype(dtype)).itemsize
  n_params = cfg.num_params()
  print(f"device: {kind} ({dev.platform}); model {n_params / 1e9:.3f}B params, {dtype}; "
        f"prompt {L}, new {new}, sampling {args.sampling}, workload {args.workload} "
        f"({len(stops)} stop ids), {threads} threads")
  if meas_bw:
    print(f"HBM: spec {spec_bw and spec_bw / 1e12} TB/s, measured copy {meas_bw / 1e12:.2f} TB/s; "
          f"peak {peak_flops and peak_flops / 1e12} TFLOP/s")

  model = models.build_model(cfg, dtype=dtype, seed=0)
  tmp = tempfile.mkdtemp(prefix="persyn_bench_")
  models.save_pretrained(model, None, tmp)
  torch_device = "cpu" if on_cpu else "cuda"

  rows = []
  for B in batches:
    m_ours, log_ours, compile_s = make_ours(model, cfg, B, L, new, sampling, dtype, stops)
    sides = {"ours": m_ours}
    row = {"batch": B}
    if not args.no_torch:
      try:
        m_torch, log_torch = make_torch(tmp, B, L, new, cfg.vocab_size, sampling, dtype,
                                        torch_device, args.torch_compile, stops)
        sides["torch"] = m_torch
      except Exception as e:  # e.g. out of memory at a large batch: keep our numbers
        row["torch"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    try:
      totals = C.alternate(sides, repeats)
    except Exception as e:
      if "torch" not in sides:
        raise
      row["torch"] = {"error": f"{type(e).__name__}: {e}"[:500]}
      totals = C.alternate({"ours": m_ours}, repeats)
    row["ours"] = {**summarize(log_ours, B, L, new, stops), "compile_s": compile_s,
                   "total_s": totals["ours"]}
    if "torch" in totals:
      row["torch"] = {**summarize(log_torch, B, L, new, stops), "cache": log_torch["cache"],
                      "total_s": totals["torch"]}
      for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s"):
        if row["ours"][k] and row["torch"][k]:
          row[f"ratio_{k}"] = row["ours"][k]["median"] / row["torch"][k]["median"]
    row["bytes_per_step"] = step_bytes = decode_bytes_per_step(cfg, B, L, new, itemsize)
    dec = row["ours"]["decode_tok_s"]
    if meas_bw and dec and args.workload == "full":  # with stops, rows leave the batch early
      for name, bw in (("measured", meas_bw), ("spec", spec_bw)):
        if bw:
          roof = B * bw / (step_bytes["weights"] + step_bytes["kv_filled"])
          row[f"decode_roofline_tok_s_{name}"] = roof
          row[f"decode_roofline_frac_{name}"] = dec["median"] / roof
    if peak_flops:
      row["prefill_mfu"] = prefill_flops(cfg, B, L) / row["ours"]["prefill_s"]["median"] \
          / peak_flops
    rows.append(row)
    print_row(row)

  shutil.rmtree(tmp, ignore_errors=True)
  result = {
      "bench": "sampler", **C.environment(load_before, threads),
      "config": {"preset": preset_name, "dtype": dtype, "prompt_len": L, "new_tokens": new,
                 "repeats": repeats, "sampling": args.sampling, "workload": args.workload,
                 "stop_ids": len(stops), "torch_compile": args.torch_compile,
                 "model": dataclasses.asdict(cfg), "params": n_params},
      "hbm_bytes_s": {"spec": spec_bw, "measured": meas_bw}, "peak_flops": peak_flops,
      "rows": rows,
  }
  out = args.out or C.results_path(f"sampler_{slug(kind)}_{args.sampling}_{args.workload}_"
                                   f"{result['date'][:10]}.json")
  print_table(rows)
  C.write_json(out, result)
  return result


def slug(s: str) -> str:
  return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")


def _f(x, fmt="{:,.0f}"):
  return "-" if x is None else fmt.format(x)


def _med(r, side, key):
  x = r.get(side, {}).get(key)
  return x["median"] if isinstance(x, dict) else None


def print_row(r):
  t = r.get("torch", {})
  print(f"batch {r['batch']}: ours prefill {C.fmt_spread(r['ours']['prefill_tok_s'])} tok/s, "
        f"decode {C.fmt_spread(r['ours']['decode_tok_s'])} tok/s (compile "
        f"{r['ours']['compile_s']:.1f}s); torch prefill {C.fmt_spread(t.get('prefill_tok_s'))}, "
        f"decode {C.fmt_spread(t.get('decode_tok_s'))} {t.get('error', '')}")


def print_table(rows):
  head = ("batch", "prefill ours", "prefill torch", "ratio", "prefill MFU", "decode ours",
          "decode torch", "ratio", "roofline frac (measured BW)", "e2e ratio", "useful frac")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [str(r["batch"]), _f(_med(r, "ours", "prefill_tok_s")),
             _f(_med(r, "torch", "prefill_tok_s")),
             _f(r.get("ratio_prefill_tok_s"), "{:.2f}x"), _f(r.get("prefill_mfu"), "{:.0%}"),
             _f(_med(r, "ours", "decode_tok_s")), _f(_med(r, "torch", "decode_tok_s")),
             _f(r.get("ratio_decode_tok_s"), "{:.2f}x"),
             _f(r.get("decode_roofline_frac_measured"), "{:.0%}"),
             _f(r.get("ratio_e2e_tok_s"), "{:.2f}x"), _f(_med(r, "ours", "useful_fraction"),
                                                       "{:.0%}")]
    lines.append("| " + " | ".join(cells) + " |")
  print("(medians over the repeats; the JSON has min/max/quartiles)")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
