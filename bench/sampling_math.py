"""The per-step cost of the sampling math alone, on [batch, vocab] logits: ours against
transformers' warpers (temperature, top-p by a sort of the vocabulary, then a multinomial draw).

    python bench/sampling_math.py                       # batch 64, Llama-3's vocabulary (128,256)
    python bench/sampling_math.py --batch 16 --vocab 8192 --repeats 5

Why apart from bench/sampler.py: on random weights a model's next-token distribution is nearly
flat (the 128 most likely of 8,192 tokens hold under 5% of the mass at T 0.7), so top-p's top-k
prefilter (sampling/logits.py: TOP_P_PREFILTER) never holds p and every step of sampler.py's
`--sampling paper` runs the full-vocabulary radix search: its figures are the sampler's worst
case. A trained model's distribution is peaked, and most steps take the prefilter. Two kinds of
logits, the same on both sides:
  peaked  N(0, 1) scaled so that the top 128 tokens hold >= p at T 0.7 in every row, as a trained
          model's usually do (the prefilter path)
  flat    N(0, 1) (a random model's: the full radix search)
Rows per kind: ours greedy (argmax), ours top-p, torch top-p; microseconds per step, medians over
alternated repeats of `--steps` steps each (ours in one jitted loop, as the decode loop runs them;
torch's warpers called once per step, as generate calls them). The JSON records the top-128 mass.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import common as C  # bench/common.py (this directory is on sys.path when run as a script)

PREFILTER = 128


def logits_of(kind: str, batch: int, vocab: int, temperature: float, top_p: float):
  """fp32 [batch, vocab] logits of `kind` (module docstring) and their top-128 mass per row."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, vocab)).astype(np.float32)

  def top_mass(z):
    z = z / temperature
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return np.sort(p, axis=1)[:, -PREFILTER:].sum(1)

  if kind == "peaked":
    scale = 1.0
    while top_mass(x * scale).min() < top_p:
      scale *= 1.25
    x = x * scale
  return x, top_mass(x)


def ours(x, temperature, top_p, greedy, steps):
  """`steps` draws in one jitted loop, as the decode loop runs them (no per-step dispatch); each
  step's logits differ from x by a term below fp32 rounding, so nothing is hoisted out of it."""
  import jax
  import jax.numpy as jnp

  from persyn_jax.sampling import logits as L
  keys = L.row_keys(0, jnp.arange(x.shape[0], dtype=jnp.uint32), jnp.zeros(x.shape[0], jnp.uint32))
  t = 0.0 if greedy else temperature

  def body(i, acc):
    xi = x + i.astype(jnp.float32) * jnp.float32(1e-30)
    return acc + L.sample(xi, L.step_keys(keys, i), t, 0, top_p)

  f = jax.jit(lambda x0: jax.lax.fori_loop(0, steps, body, jnp.zeros(x0.shape[0], jnp.int32)))
  xd = jnp.asarray(x)
  jax.block_until_ready(f(xd))
  return lambda: f(xd), jax.block_until_ready


def torch_side(x, temperature, top_p, device):
  import torch
  from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
  xt = torch.tensor(x, device=device)
  warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
  gen = torch.Generator(device=device).manual_seed(0)

  def step():
    with torch.no_grad():
      z = xt
      for w in warpers:
        z = w(None, z)
      return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=gen)

  def block(out):
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  return step, block


def timed(step, block, calls, steps):
  """Seconds per sampling step: `calls` calls of `step`, each of `steps` steps."""
  def run():
    out = None
    t = time.perf_counter()
    for _ in range(calls):
      out = step()
    block(out)
    return (time.perf_counter() - t) / (calls * steps)
  return run


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--vocab", type=int, default=128256)
  ap.add_argument("--temperature", type=float, default=0.7)
  ap.add_argument("--top-p", type=float, default=0.95)
  ap.add_argument("--steps", type=int, default=20, help="sampling steps per measurement")
  ap.add_argument("--repeats", type=int, default=C.MIN_REPEATS)
  ap.add_argument("--threads", type=int, default=None)
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--out", default=None, help="JSON path (default bench/results/"
                                                "sampling_math_<device>.json)")
  args = ap.parse_args(argv)
  threads = C.pin_threads(args.threads)
  load_before = C.check_load("before")
  repeats = max(args.repeats, C.MIN_REPEATS)
  rows = {}
  for kind in ("peaked", "flat"):
    x, mass = logits_of(kind, args.batch, args.vocab, args.temperature, args.top_p)
    n = args.steps
    sides = {"ours_greedy": timed(*ours(x, args.temperature, args.top_p, True, n), 1, n),
             "ours_top_p": timed(*ours(x, args.temperature, args.top_p, False, n), 1, n)}
    if not args.no_torch:  # transformers calls its warpers once per step, from Python
      step, block = torch_side(x, args.temperature, args.top_p, C.torch_device())
      block(step())
      sides["torch_top_p"] = timed(step, block, n, 1)
    times = C.alternate(sides, repeats)
    row = {"top128_mass": C.spread(list(mass)), "prefilter_path": bool(mass.min() >= args.top_p),
           "s_per_step": times}
    if "torch_top_p" in times:
      row["ratio_top_p_ours_over_torch_time"] = (times["ours_top_p"]["median"]
                                                 / times["torch_top_p"]["median"])
    rows[kind] = row
    cells = ", ".join(f"{k} {C.fmt_spread(v, 1e6, 'us')}" for k, v in times.items())
    print(f"{kind:6s} (top-128 mass {np.median(mass):.3f}; "
          f"{'prefilter' if row['prefilter_path'] else 'full radix search'}): {cells}")
  result = {"bench": "sampling_math", **C.environment(load_before, threads),
            "config": vars(args), "rows": rows}
  C.write_json(args.out or C.results_path(f"sampling_math_{C.device()['platform']}.json"), result)
  return result


if __name__ == "__main__":
  main()
