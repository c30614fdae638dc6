"""Sampler benchmark: prefill and decode tokens/s of persyn_jax's sampler next to transformers'
PyTorch `generate` on the same random weights, with the fraction of the roofline reached.

    python bench/sampler.py                      # GPU: ~1.2B Llama-3-shaped model, bf16
    python bench/sampler.py --preset cpu-small   # a tiny model on CPU (ratios only)

Roofline (decode): one step must read every weight and the filled part of the KV cache once, so
  tokens/s <= batch * HBM bandwidth / (weight bytes + KV bytes read per step),
with the KV bytes averaged over the steps (prompt + i tokens at step i). Prefill: FLOPs over the
peak bf16 FLOP/s. Bandwidth: the spec sheet and a measured device copy. On CPU no roofline is
given (no meaningful peak); compare the ratios to transformers instead.
Decode time = the on-device decode loop (ours) / generate(new) - generate(1) (transformers);
every row runs all `new` tokens (no stop token), greedy unless --sampling paper.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

# device kind (substring, first match) -> (HBM bytes/s, dense bf16 FLOP/s), from the spec sheets
PEAKS = [
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),     # SXM (device kind "NVIDIA H100 80GB HBM3")
    ("H200", 4.8e12, 989e12),
    ("A100", 2.039e12, 312e12),    # 80GB SXM
    ("TPU v4", 1.2e12, 275e12),
    ("TPU v5 lite", 0.819e12, 197e12),
    ("TPU v5e", 0.819e12, 197e12),
    ("TPU v5", 2.765e12, 459e12),  # v5p
    ("TPU v6 lite", 1.64e12, 918e12),
    ("TPU v6e", 1.64e12, 918e12),
]

PRESETS = {
    # Llama-3.2-1B's shape (tied embeddings, 1.24B parameters)
    "gpu-1b": dict(model=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                              num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64),
                   batches=[1, 16, 64, 256], prompt_len=512, new_tokens=256, dtype="bfloat16",
                   repeats=3),
    "cpu-small": dict(model=dict(vocab_size=8192, hidden_size=256, intermediate_size=1024,
                                 num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32),
                      batches=[1, 4, 16], prompt_len=64, new_tokens=32, dtype="float32", repeats=2),
}
SAMPLING = {"greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
            "paper": dict(temperature=0.7, top_k=0, top_p=0.95)}


def device_peaks(kind: str):
  for name, bw, flops in PEAKS:
    if name.lower() in kind.lower():
      return bw, flops
  return None, None


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


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench_ours(model, cfg, B, L, new, sampling, repeats, dtype):
  import jax
  from persyn_jax.sampling import engine
  st = engine.Static(new, sampling["temperature"], sampling["top_k"], sampling["top_p"], dtype, 0)
  eng = engine.Engine(model, st)
  rng = np.random.default_rng(B)
  ids = rng.integers(10, cfg.vocab_size, (B, L), dtype=np.int32)
  mask = np.ones((B, L), np.int32)
  idx = np.arange(B, dtype=np.uint32)
  state = {}

  def prefill():
    state["cache"], state["logits"] = eng.run_prefill(ids, mask)
    jax.block_until_ready(state["logits"])

  def decode():
    out = eng.run_decode(state["cache"], state["logits"], mask, 0, idx, idx * 0, ())
    state["out"] = jax.block_until_ready(out[:3])

  t = time.perf_counter()
  prefill(); decode()  # compile
  compile_s = time.perf_counter() - t
  assert int(np.min(np.asarray(state["out"][1]))) == new, "every row must run all new tokens"
  t_pre, t_dec = [], []
  for _ in range(repeats):
    t_pre.append(median_time(prefill, 1))
    t_dec.append(median_time(decode, 1))
  return statistics.median(t_pre), statistics.median(t_dec), compile_s


def bench_torch(path, B, L, new, vocab, sampling, repeats, dtype, device, compile_):
  import torch
  import transformers
  tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=tdtype).to(device).eval()
  model.generation_config.eos_token_id = None  # run all `new` tokens, as ours does
  if compile_:
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
  rng = np.random.default_rng(B)
  ids = torch.tensor(rng.integers(10, vocab, (B, L)), dtype=torch.long, device=device)
  mask = torch.ones_like(ids)
  kw = dict(do_sample=sampling["temperature"] > 0, pad_token_id=0)
  if kw["do_sample"]:
    kw.update(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=None)
  cache = "static"

  def gen(n):
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           cache_implementation=cache, **kw)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  try:
    gen(new)
  except Exception as e:  # an older/newer transformers without a static cache for this model
    print(f"transformers static cache failed ({type(e).__name__}: {e}); using the dynamic cache")
    cache = "dynamic"
    gen(new)
  gen(1)
  t1 = median_time(lambda: gen(1), repeats)
  tn = median_time(lambda: gen(new), repeats)
  del model
  if device == "cuda":
    torch.cuda.empty_cache()
  return t1, tn - t1, cache


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                  help="default: gpu-1b on a GPU/TPU, cpu-small on CPU")
  ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
  ap.add_argument("--prompt-len", type=int, default=None)
  ap.add_argument("--new-tokens", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--sampling", choices=sorted(SAMPLING), default="greedy")
  ap.add_argument("--no-torch", action="store_true", help="skip transformers")
  ap.add_argument("--torch-compile", action="store_true",
                  help="torch.compile(mode='reduce-overhead') transformers' forward")
  ap.add_argument("--out", default=None,
                  help="JSON path (default bench/results/sampler_<device>_<date>.json)")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import flax
  from persyn_jax import models
  from persyn_jax.models.config import ModelConfig, RopeConfig

  dev = jax.devices()[0]
  on_cpu = dev.platform == "cpu"
  preset = dict(PRESETS[args.preset or ("cpu-small" if on_cpu else "gpu-1b")])
  batches = args.batches or preset["batches"]
  L = args.prompt_len or preset["prompt_len"]
  new = args.new_tokens or preset["new_tokens"]
  repeats = args.repeats or preset["repeats"]
  dtype = preset["dtype"]
  sampling = SAMPLING[args.sampling]
  cfg = ModelConfig(model_type="llama", tie_embeddings=True, rms_norm_eps=1e-5,
                    rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=32.0,
                                    original_max_position_embeddings=8192),
                    max_position_embeddings=131072, eos_token_id=None, pad_token_id=0,
                    **preset["model"])
  kind = dev.device_kind
  spec_bw, peak_flops = (None, None) if on_cpu else device_peaks(kind)
  meas_bw = None if on_cpu else measure_bandwidth(jax, jnp, 1 << 30)
  itemsize = np.dtype(jnp.dtype(dtype)).itemsize
  n_params = cfg.num_params()
  weight_bytes = n_params * itemsize
  print(f"device: {kind} ({dev.platform}); model {n_params / 1e9:.3f}B params, {dtype}; "
        f"prompt {L}, new {new}, sampling {args.sampling}")
  if meas_bw:
    print(f"HBM: spec {spec_bw and spec_bw / 1e12} TB/s, measured copy {meas_bw / 1e12:.2f} TB/s; "
          f"peak {peak_flops and peak_flops / 1e12} TFLOP/s")

  model = models.build_model(cfg, dtype=dtype, seed=0)
  tmp = tempfile.mkdtemp(prefix="persyn_bench_")
  models.save_pretrained(model, None, tmp)
  torch_device = "cpu" if on_cpu else "cuda"

  rows = []
  for B in batches:
    t_pre, t_dec, compile_s = bench_ours(model, cfg, B, L, new, sampling, repeats, dtype)
    kv_step = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize  # bytes per token
    kv_read = B * (L + (new - 1) / 2) * kv_step   # filled part, averaged over the steps
    kv_alloc = B * (L + new) * kv_step            # what the static-shape attention reads
    row = {"batch": B, "ours": {"prefill_s": t_pre, "decode_s": t_dec, "compile_s": compile_s,
                                "prefill_tok_s": B * L / t_pre, "decode_tok_s": B * new / t_dec,
                                "e2e_tok_s": B * new / (t_pre + t_dec)},
           "bytes_per_step": {"weights": weight_bytes, "kv_filled": kv_read,
                              "kv_allocated": kv_alloc}}
    if meas_bw:
      for name, bw in (("measured", meas_bw), ("spec", spec_bw)):
        if bw:
          roof = B * bw / (weight_bytes + kv_read)
          row[f"decode_roofline_tok_s_{name}"] = roof
          row[f"decode_roofline_frac_{name}"] = row["ours"]["decode_tok_s"] / roof
    if peak_flops:
      flops = B * L * cfg.flops_per_token(L)
      row["prefill_mfu"] = flops / t_pre / peak_flops
    if not args.no_torch:
      try:
        t1, t_tdec, cache = bench_torch(tmp, B, L, new, cfg.vocab_size, sampling, repeats, dtype,
                                        torch_device, args.torch_compile)
        # generate(new) - generate(1) can come out <= 0 for tiny runs on a noisy machine
        dec = B * (new - 1) / t_tdec if t_tdec > 0 else None
        row["torch"] = {"prefill_s": t1, "decode_s": t_tdec, "cache": cache,
                        "prefill_tok_s": B * L / t1, "decode_tok_s": dec,
                        "e2e_tok_s": B * new / (t1 + t_tdec)}
        for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s"):
          if row["torch"][k]:
            row[f"ratio_{k}"] = row["ours"][k] / row["torch"][k]
      except Exception as e:  # e.g. out of memory at a large batch: keep our numbers
        row["torch"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    rows.append(row)
    print_row(row)

  shutil.rmtree(tmp, ignore_errors=True)
  import torch
  import transformers
  result = {
      "bench": "sampler", "command": " ".join([sys.executable] + sys.argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": {"platform": dev.platform, "kind": kind, "count": jax.device_count(),
                 "host": platform.node(), "cpu": platform.processor() or platform.machine()},
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": getattr(jax, "lib", None) and jax.lib.__version__,
                   "flax": flax.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__},
      "config": {"preset": args.preset or ("cpu-small" if on_cpu else "gpu-1b"), "dtype": dtype,
                 "prompt_len": L, "new_tokens": new, "repeats": repeats, "sampling": args.sampling,
                 "torch_compile": args.torch_compile, "model": dataclasses.asdict(cfg),
                 "params": n_params},
      "hbm_bytes_s": {"spec": spec_bw, "measured": meas_bw}, "peak_flops": peak_flops,
      "rows": rows,
  }
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"sampler_{slug(kind)}_{result['date'][:10]}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  print_table(rows)
  print(f"wrote {out}")


def slug(s: str) -> str:
  return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")


def _f(x, fmt="{:,.0f}"):
  return "-" if x is None else fmt.format(x)


def print_row(r):
  t = r.get("torch", {})
  print(f"batch {r['batch']}: ours prefill {_f(r['ours']['prefill_tok_s'])} tok/s, decode "
        f"{_f(r['ours']['decode_tok_s'])} tok/s (compile {r['ours']['compile_s']:.1f}s); torch "
        f"prefill {_f(t.get('prefill_tok_s'))}, decode {_f(t.get('decode_tok_s'))} "
        f"{t.get('error', '')}")


def print_table(rows):
  head = ("batch", "prefill ours", "prefill torch", "ratio", "prefill MFU", "decode ours",
          "decode torch", "ratio", "roofline frac (measured BW)", "e2e ratio")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    t = r.get("torch", {})
    cells = [str(r["batch"]), _f(r["ours"]["prefill_tok_s"]), _f(t.get("prefill_tok_s")),
             _f(r.get("ratio_prefill_tok_s"), "{:.2f}x"), _f(r.get("prefill_mfu"), "{:.0%}"),
             _f(r["ours"]["decode_tok_s"]), _f(t.get("decode_tok_s")),
             _f(r.get("ratio_decode_tok_s"), "{:.2f}x"),
             _f(r.get("decode_roofline_frac_measured"), "{:.0%}"),
             _f(r.get("ratio_e2e_tok_s"), "{:.2f}x")]
    lines.append("| " + " | ".join(cells) + " |")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
