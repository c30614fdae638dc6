"""Learnability scoring throughput: scored tokens/s and forward MFU, JAX vs transformers/torch.

    python bench/scoring.py --preset cpu          # small Llama-shaped model, fp32 (runs anywhere)
    python bench/scoring.py --preset gpu          # ~1.2B Llama-3.2-1B-shaped model, bf16

Both sides score the same (prompt, response) pairs: the same token ids (our chat helpers), the
same length-sorted batches, an fp32 log-softmax over the vocabulary and the mean log-prob of the
response tokens. JAX runs `scoring.LogProbScorer` end to end (tokenization included); torch runs
its forward on the pre-tokenized batches (tokenization not counted, in its favour). MFU counts
the model FLOPs of the real (unpadded) tokens (scoring_flops: the LM head at the scored
positions only) against the device peak (the dense bf16 spec sheet, persyn_jax/device_peaks.py;
on CPU the measured fp32 matmul throughput of this machine; an accelerator missing from the
table stops the run).
    python bench/scoring.py --preset tiny         # plumbing check in seconds (figures meaningless)
The sides alternate over >= 3 repeats with pinned, equal thread counts (bench/common.py); the
table gives medians with min-max and the machine's load is checked and recorded.
Prints a table; writes JSON with device, date, versions and the command to bench/results/.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import common as C  # bench/common.py (this directory is on sys.path when run as a script)

PRESETS = {
    # vocab 4096 keeps the LM head comparable to the trunk, as in real models
    "cpu": dict(model=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           vocab_size=4096),
                dtype="float32", pairs=96, prompt_words=(20, 80), response_words=(40, 200),
                max_len=1024, batch_tokens=4096, tokenizer_vocab=2048),
    "tiny": dict(model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            vocab_size=512),
                 dtype="float32", pairs=8, prompt_words=(5, 10), response_words=(5, 20),
                 max_len=128, batch_tokens=512, tokenizer_vocab=400),
    # Llama-3.2-1B shapes (1.24B parameters, untied head here)
    "gpu": dict(model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                           vocab_size=128256, rope_theta=500000.0),
                dtype="bfloat16", pairs=512, prompt_words=(50, 300), response_words=(200, 900),
                max_len=2048, batch_tokens=32768, tokenizer_vocab=8192),
}
WORDS = ("the a of to and in is it that for on with as was at by this be from or have an they "
         "which one you were all we her she there been if more when will would who so no apples "
         "number model answer step total each left count world language tiny what how many "
         "twelve seven forty because therefore first then finally result equals plus minus").split()


def synthetic_pairs(n: int, prompt_words, response_words, seed: int = 0):
  rng = np.random.default_rng(seed)
  text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))
  return [text(*prompt_words) + "?" for _ in range(n)], [text(*response_words) + "." for _ in range(n)]


def build_model_dir(preset: dict, path: str):
  import torch
  import transformers as T
  from persyn_jax.tokenizer import train_tokenizer
  prompts, responses = synthetic_pairs(200, (10, 40), (10, 40), seed=123)
  tok = train_tokenizer(prompts + responses, vocab_size=preset["tokenizer_vocab"])
  cfg = T.LlamaConfig(**preset["model"], pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
                      max_position_embeddings=8192)
  torch.manual_seed(0)
  model = T.LlamaForCausalLM(cfg).to(getattr(torch, preset["dtype"]))
  model.save_pretrained(path, safe_serialization=True)
  tok.save_pretrained(path)
  return tok


def scoring_flops(cfg, pairs) -> float:
  """Model FLOPs of scoring the (ids, mask) pairs: every token through the layers (causal
  attention over its pair), the LM head only where a log-prob is wanted, at the positions that
  predict a response token (mask[1:]), as the packed scorer computes it; the padded path and
  torch also run the head over the prompt, work that MFU does not count."""
  head = 2 * cfg.vocab_size * cfg.hidden_size
  total = 0.0
  for ids, mask in (p for p in pairs if p is not None):
    n = len(ids)
    total += n * (cfg.flops_per_token(n) - head) + int(np.count_nonzero(mask[1:])) * head
  return total


def device_info():
  """(platform, device kind, device count, spec bf16 peak FLOP/s: None on CPU)."""
  import jax
  d = jax.devices()[0]
  return d.platform, d.device_kind, len(jax.devices()), C.spec_peaks()[0]


def run_jax(path, prompts, responses, preset, packing=True, pack_len=512):
  from persyn_jax import scoring
  cfg = scoring.ScoringConfig(dtype=preset["dtype"], max_len=preset["max_len"],
                              batch_tokens=preset["batch_tokens"], max_batch_size=256,
                              packing=packing, pack_len=pack_len)
  t = time.perf_counter()
  scorer = scoring.LogProbScorer.from_pretrained(path, cfg)
  load_s = time.perf_counter() - t
  t = time.perf_counter()
  scorer.learnability(prompts, responses)  # compiles every bucket shape
  first_s = time.perf_counter() - t
  t = time.perf_counter()
  scoring.encode_pairs(scorer.tokenizer, prompts, responses, cfg)
  tokenize_s = time.perf_counter() - t
  box = {}

  def measure():
    t = time.perf_counter()
    box["values"], box["stats"] = scorer.learnability(prompts, responses)
    return time.perf_counter() - t

  measure()
  info = {"load_s": load_s, "first_call_s": first_s, "tokenize_s": tokenize_s}
  return measure, box, info, scorer


def run_torch(path, prompts, responses, preset, scorer):
  import torch
  import transformers as T
  from persyn_jax import scoring
  from persyn_jax.runtime.buckets import plan_batches, bucket_lengths
  dev = C.torch_device()
  dtype = getattr(torch, preset["dtype"])
  model = T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
  model = model.to(dev).eval()
  pairs, _ = scoring.encode_pairs(scorer.tokenizer, prompts, responses, scorer.config)
  lengths = [len(p[0]) for p in pairs]
  plan = plan_batches(lengths, bucket_lengths(preset["max_len"], 64),
                      batch_tokens=preset["batch_tokens"], max_batch_size=256)
  batches = []
  for b in plan:  # the same rows as JAX, padded only to the longest row (torch needs no buckets)
    seqs = [pairs[i] for i in b.indices]
    T_ = max(len(s[0]) for s in seqs)
    ids = torch.zeros((len(seqs), T_), dtype=torch.long)
    att = torch.zeros((len(seqs), T_), dtype=torch.long)
    m = torch.zeros((len(seqs), T_))
    for r, (x, mk) in enumerate(seqs):
      ids[r, :len(x)] = torch.tensor(x)
      att[r, :len(x)] = 1
      m[r, :len(x)] = torch.tensor(mk, dtype=torch.float32)
    batches.append((b.indices, ids.to(dev), att.to(dev), m.to(dev)))

  def score_all():
    out = np.zeros(len(pairs))
    with torch.inference_mode():
      for idx, ids, att, m in batches:
        logits = model(input_ids=ids, attention_mask=att).logits
        for r in range(len(idx)):  # fp32 log-softmax a row at a time (a 128K vocab is large)
          lp = torch.log_softmax(logits[r, :-1].float(), -1).gather(-1, ids[r, 1:, None])[:, 0]
          mm = m[r, 1:]
          out[idx[r]] = float((lp * mm).sum() / mm.sum())
    if dev == "cuda":
      torch.cuda.synchronize()
    return out

  score_all()  # warm-up
  box = {}

  def measure():
    t = time.perf_counter()
    box["values"] = score_all()
    return time.perf_counter() - t

  return measure, box, {"device": dev, "threads": torch.get_num_threads()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  ap.add_argument("--pairs", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=C.MIN_REPEATS)
  ap.add_argument("--threads", type=int, default=None, help="intra-op threads of both sides")
  ap.add_argument("--out", default=None, help="JSON path (default bench/results/scoring_<preset>.json)")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--packing", choices=("true", "false", "both"), default="both",
                  help="scoring.packing of the JAX side; both: packed and padded, alternated")
  ap.add_argument("--pack-len", type=int, default=512, help="scoring.pack_len of the packed side")
  args = ap.parse_args(argv)
  preset = dict(PRESETS[args.preset])
  if args.pairs:
    preset["pairs"] = args.pairs
  threads = C.pin_threads(args.threads)
  load_before = C.check_load("before")

  from persyn_jax import models, scoring

  platform_name, kind, ndev, peak = device_info()
  if platform_name == "cpu":
    peak, peak_source = C.measured_matmul_peak(models.as_dtype(preset["dtype"])), \
        "measured fp32 matmul (JAX)"
  elif preset["dtype"] == "bfloat16":
    peak_source = "vendor dense bf16 peak"
  else:
    raise SystemExit(f"preset {args.preset}: dtype {preset['dtype']} on {kind}: the spec peaks "
                     "are bf16; use --preset gpu")
  prompts, responses = synthetic_pairs(preset["pairs"], preset["prompt_words"],
                                       preset["response_words"])
  with tempfile.TemporaryDirectory() as tmp:
    build_model_dir(preset, tmp)
    cfg, _ = models.load_config(tmp)
    modes = {"true": [True], "false": [False], "both": [True, False]}[args.packing]
    m_jax, box_jax, jt, scorer = run_jax(tmp, prompts, responses, preset, modes[0],
                                         args.pack_len)
    sides = {"jax": m_jax}
    if len(modes) > 1:  # the padded path as a second JAX side, same pairs, same run
      m_pad, box_pad, jt_pad, _ = run_jax(tmp, prompts, responses, preset, False)
      sides["jax_padded"] = m_pad
    if not args.no_torch:
      m_torch, box_torch, tt = run_torch(tmp, prompts, responses, preset, scorer)
      sides["torch"] = m_torch
    secs = C.alternate(sides, args.repeats)
    stats = box_jax["stats"]
    pairs, _ = scoring.encode_pairs(scorer.tokenizer, prompts, responses, scorer.config)
    flops = scoring_flops(cfg, pairs)
    tokens = stats["tokens"]
    med = {n: s["median"] for n, s in secs.items()}
    rows = [("jax", secs["jax"], tokens / med["jax"], flops / med["jax"] / peak)]
    result = {"jax": {**jt, "packing": modes[0], "seconds": secs["jax"],
                      "tokens_per_s": tokens / med["jax"],
                      "padded_tokens_per_s": stats["padded_tokens"] / med["jax"],
                      "mfu": flops / med["jax"] / peak, "stats": stats}}
    if "jax_padded" in sides:
      pst = box_pad["stats"]
      result["jax_padded"] = {**jt_pad, "packing": False, "seconds": secs["jax_padded"],
                              "tokens_per_s": tokens / med["jax_padded"],
                              "mfu": flops / med["jax_padded"] / peak, "stats": pst,
                              "max_abs_diff_vs_jax": float(np.nanmax(np.abs(
                                  box_pad["values"] - box_jax["values"])))}
      rows.append(("jax_pad", secs["jax_padded"], tokens / med["jax_padded"],
                   flops / med["jax_padded"] / peak))
      result["packed_speedup_vs_padded"] = med["jax_padded"] / med["jax"]
    if not args.no_torch:
      diff = np.abs(box_torch["values"] - box_jax["values"])
      result["torch"] = {**tt, "seconds": secs["torch"], "tokens_per_s": tokens / med["torch"],
                         "mfu": flops / med["torch"] / peak,
                         "max_abs_diff_vs_jax": float(np.nanmax(diff))}
      rows.append(("torch", secs["torch"], tokens / med["torch"], flops / med["torch"] / peak))
      result["jax_speedup_vs_torch"] = med["torch"] / med["jax"]
  env = C.environment(load_before, threads)
  env["device"].update(peak_flops=peak, peak_source=peak_source)
  report = {
      "benchmark": "scoring.learnability (forward only)", "preset": args.preset, **env,
      "model": {**preset["model"], "dtype": preset["dtype"], "params": cfg.num_params()},
      "pairs": preset["pairs"], "tokens": tokens, "flops": flops, "results": result,
  }
  print(f"\nlearnability scoring, preset {args.preset}: {preset['pairs']} pairs, {tokens} tokens, "
        f"{cfg.num_params() / 1e6:.1f}M params, {preset['dtype']}, {kind} x{ndev}, "
        f"{threads} threads")
  print(f"{'impl':<8}{'seconds median [min-max]':>28}{'tokens/s':>12}{'MFU':>8}")
  for name, s, tps, mfu in rows:
    print(f"{name:<8}{C.fmt_spread(s):>28}{tps:>12.0f}{mfu:>8.1%}")
  for name in ("jax", "jax_padded"):
    if name in result:
      st = result[name]["stats"]
      print(f"{name}: {st['batches']} batches, {st['shapes']} shapes, padding "
            f"{1 - st['tokens'] / st['padded_tokens']:.1%} of {st['padded_tokens']} slots")
  C.write_json(args.out or C.results_path(f"scoring_{args.preset}.json"), report)
  return report


if __name__ == "__main__":
  main()
