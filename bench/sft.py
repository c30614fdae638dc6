"""SFT step throughput: our jitted JAX step vs a plain transformers/torch training step.

Same Llama-shaped model, same batch (every token a response token), AdamW, grad clipping.
    python bench/sft.py --preset cpu      # small shapes, fp32: ratios (runs in minutes on a CPU)
    python bench/sft.py --preset gpu      # ~1.2B Llama-3.2-1B shape, seq 2048, bf16 (one GPU)
    python bench/sft.py --preset tiny     # a plumbing check in seconds (figures meaningless)
The sides alternate over >= 3 rounds of `steps` steps with pinned, equal thread counts
(bench/common.py); the table gives the median step time with its min-max, and the machine's load
is checked and recorded. Writes bench/results/sft_<preset>.json (device, date, versions, command).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import common as C  # bench/common.py (this directory is on sys.path when run as a script)

PRESETS = {
    # Llama-3.2-1B: 16 layers, d 2048, mlp 8192, 32 heads / 8 kv heads of 64, tied 128k vocab.
    "gpu": dict(vocab=128256, hidden=2048, mlp=8192, layers=16, heads=32, kv_heads=8, head_dim=64,
                tie=True, seq=2048, batch=4, dtype="bfloat16", warmup=3, steps=10, rounds=3,
                loss_chunk=0),
    "tiny": dict(vocab=512, hidden=64, mlp=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                 tie=True, seq=32, batch=2, dtype="float32", warmup=1, steps=1, rounds=3,
                 loss_chunk=0),
    "cpu": dict(vocab=4096, hidden=256, mlp=768, layers=4, heads=8, kv_heads=4, head_dim=32,
                tie=True, seq=256, batch=4, dtype="float32", warmup=2, steps=3, rounds=4,
                loss_chunk=0),
}


def hf_config(p):
  import transformers as T
  return T.LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["mlp"],
                       num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                       num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"],
                       tie_word_embeddings=p["tie"], max_position_embeddings=max(p["seq"], 2048),
                       rope_theta=500000.0, rms_norm_eps=1e-5)


def make_batch(p, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, p["vocab"], (p["batch"], p["seq"] + 1)).astype(np.int32)
  mask = np.ones((p["batch"], p["seq"]), np.float32)
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones_like(ids[:, :-1]),
          "positions": np.broadcast_to(np.arange(p["seq"], dtype=np.int32), ids[:, :-1].shape).copy()}


def jax_session(p):
  """(our SFT session for preset p, its model config, its one-device mesh)."""
  from persyn_jax import sharding as shd
  from persyn_jax.models import build_model
  from persyn_jax.models.hf import config_from_hf
  from persyn_jax.sft import SFTConfig, make_session

  cfg = config_from_hf(hf_config(p).to_dict())
  model = build_model(cfg, dtype=p["dtype"], param_dtype="float32")
  sft = SFTConfig(lr=1e-5, batch_size=p["batch"], seq_len=p["seq"], max_steps=1000,
                  compute_dtype=p["dtype"], param_dtype="float32", loss_chunk=p["loss_chunk"])
  mesh = shd.single_device_mesh()
  return make_session(model, sft, mesh, 1000), cfg, mesh


def bench_jax(p, batch):
  import jax

  session, cfg, mesh = jax_session(p)
  with jax.set_mesh(mesh):
    box = {"state": session.init_state(), "batch": session.put_batch([batch])}

  def run(n):
    with jax.set_mesh(mesh):
      for _ in range(n):
        box["state"], box["m"] = session.step(box["state"], session.frozen, box["batch"])
      return float(jax.block_until_ready(box["m"])["loss"])

  return run, {"flops_per_token_fwd": cfg.flops_per_token(p["seq"]), "params": cfg.num_params()}


def torch_setup(p, batch) -> dict:
  """The torch side for preset p: the model (fp32 master weights), AdamW (fused where available),
  the loss (bf16 autocast for a bf16 preset), its step, and a device sync."""
  import torch
  import transformers as T

  dev = C.torch_device()
  cuda = dev == "cuda"
  torch.manual_seed(0)
  config = hf_config(p)
  config._attn_implementation = "sdpa"
  model = T.LlamaForCausalLM(config).to(dev).float().train()  # fp32 master weights
  try:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    fused = True
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    fused = False
  ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=dev)
  tgt = torch.as_tensor(batch["targets"], dtype=torch.long, device=dev)
  amp = p["dtype"] == "bfloat16"

  def loss():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
      logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             tgt.reshape(-1))

  def step():
    out = loss()
    out.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  return {"model": model, "opt": opt, "loss": loss, "step": step, "sync": sync, "fused": fused,
          "amp": amp}


def bench_torch(p, batch):
  import torch

  t = torch_setup(p, batch)
  step, sync, fused, amp = t["step"], t["sync"], t["fused"], t["amp"]

  def run(n):
    for _ in range(n):
      loss = step()
    sync()
    return float(loss.detach())

  return run, {"fused_adamw": fused, "autocast_bf16": amp, "attn": "sdpa",
               "threads": torch.get_num_threads()}


def timed(run, n):
  t0 = time.perf_counter()
  loss = run(n)
  return (time.perf_counter() - t0) / n, loss


def _x(ratio):
  return "n/a" if ratio is None else f"{ratio:.2f}x"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  ap.add_argument("--out", default=None)
  ap.add_argument("--threads", type=int, default=None, help="intra-op threads of both sides")
  ap.add_argument("--no-torch", action="store_true", help="skip torch (e.g. on a TPU host)")
  ap.add_argument("--set", nargs="*", default=[], help="preset overrides, e.g. batch=8 seq=1024")
  args = ap.parse_args(argv)
  p = dict(PRESETS[args.preset])
  for kv in args.set:
    k, v = kv.split("=", 1)
    p[k] = type(p[k])(v) if not isinstance(p[k], bool) else v.lower() == "true"
  threads = C.pin_threads(args.threads)
  load_before = C.check_load("before")

  import jax

  dev = jax.devices()[0]
  # the spec peak first: an accelerator missing from the table stops here, before measuring
  spec_peak = C.spec_peaks()[0] if dev.platform != "cpu" and p["dtype"] == "bfloat16" else None
  batch = make_batch(p)
  runs = {}
  makers = (("jax", bench_jax),) + (() if args.no_torch else (("torch", bench_torch),))
  torch_error = None
  for name, make in makers:
    try:
      run, info = make(p, batch)
      info["warmup_s"], _ = timed(run, p["warmup"])  # compilation / allocator warmup
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError among them
      if name != "torch":
        raise
      # JAX's allocator keeps its peak (XLA_PYTHON_CLIENT_PREALLOCATE=false does not return it):
      # a torch step that no longer fits beside it loses the anchor, not the JAX figures
      torch_error = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"torch side failed, measured without it: {torch_error}")
      continue
    runs[name] = (run, info)

  def side(name):
    run, info = runs[name]

    def measure():
      dt, info["loss"] = timed(run, p["steps"])
      return dt
    return measure

  # the two sides alternate (A B, B A, ...) so that a shared machine's drift hits both alike
  step_s = C.alternate({n: side(n) for n in runs}, max(p["rounds"], C.MIN_REPEATS))
  for name, (_, info) in runs.items():
    info["step_s"] = step_s[name]
  jx, th = runs["jax"][1], runs["torch"][1] if "torch" in runs else None
  tokens = p["batch"] * p["seq"]
  train_flops = 3 * jx["flops_per_token_fwd"]  # forward + backward (2x)
  if dev.platform == "cpu":
    peak, peak_note = C.measured_matmul_peak(), "measured fp32 matmul"
  elif p["dtype"] == "bfloat16":
    peak, peak_note = spec_peak, "spec bf16 dense"
  else:
    peak, peak_note = None, f"no spec peak for {p['dtype']}"
  rows = []
  for name, r in (("persyn_jax (jax.jit)", jx), ("transformers/torch", th)):
    if r is None:
      continue
    med = r["step_s"]["median"]
    r["tokens_per_s"] = tokens / med
    r["mfu"] = train_flops * tokens / med / peak if peak else None
    rows.append((name, r["step_s"], r["tokens_per_s"], r["mfu"], r["loss"]))
  ratio = jx["tokens_per_s"] / th["tokens_per_s"] if th else None
  print(f"\nSFT step, preset {args.preset}: {jx['params'] / 1e6:.1f}M params, batch {p['batch']} x "
        f"seq {p['seq']}, {p['dtype']}, on {dev.device_kind}, {threads} threads")
  print(f"{'':24s} {'ms/step median [min-max]':>28s} {'tokens/s':>10s} {'MFU':>7s} {'loss':>7s}")
  for name, st, tps, mfu, loss in rows:
    print(f"{name:24s} {C.fmt_spread(st, 1e3):>28s} {tps:10.0f} "
          f"{(f'{100 * mfu:.1f}%' if mfu else 'n/a'):>7s} {loss:7.3f}")
  print(f"jax / torch tokens/s (medians): {_x(ratio)}   (MFU denominator: {peak_note}"
        f"{f', {peak / 1e12:.2f} TFLOP/s' if peak else ''})")
  out = args.out or C.results_path(f"sft_{args.preset}.json")
  result = {
      "benchmark": "sft_step", "preset": args.preset, "shapes": p,
      **C.environment(load_before, threads),
      "peak_flops": peak, "peak_note": peak_note, "train_flops_per_token": train_flops,
      "jax": jx, "torch": th, "jax_over_torch_tokens_per_s": ratio,
      **({"torch_error": torch_error} if torch_error else {}),
  }
  C.write_json(out, result)
  return result


if __name__ == "__main__":
  main()
