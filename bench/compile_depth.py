"""The cost of a model's first generate against its depth: trace + compile + run, fresh process.

The decoder scans one stacked block over its layers (models/layers.py), so the traced program
and its compile time should not grow with the number of layers; before, a 32-layer model's first
generate cost about 3.3x a 4-layer one's (issue 15, point 4; goal: at most 2x).

Each measurement is a fresh Python process (no compile cache in memory, the persistent compile
cache off) that builds a tiny random Llama of the given depth, then times:
  abstract_build_s  nnx.eval_shape of the model (what the toy world and --dry-run build)
  build_s           the model with random weights
  first_generate_s  the static engine's prefill + decode of one batch, from nothing compiled
  second_generate_s the same call again (run only: every program is compiled)
Depths alternate over >= 3 repeats (bench/common.py). `--src DIR` measures another checkout of
persyn_jax (e.g. the unscanned decoder) with the same script, for a before/after figure.

    python bench/compile_depth.py                  # writes bench/results/compile_depth_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
             head_dim=16)


def child(layers: int, batch: int, prompt_len: int, new_tokens: int) -> dict:
  """One fresh-process measurement (run with --child)."""
  t0 = time.perf_counter()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from persyn_jax import models
  from persyn_jax.models.config import ModelConfig
  from persyn_jax.sampling import engine as E
  jax.config.update("jax_enable_compilation_cache", False)
  t_import = time.perf_counter() - t0

  cfg = ModelConfig(model_type="llama", num_layers=layers, tie_embeddings=True,
                    max_position_embeddings=4096, eos_token_id=None, pad_token_id=0, **MODEL)
  t = time.perf_counter()
  nnx.eval_shape(lambda: models.CausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
  abstract = time.perf_counter() - t
  t = time.perf_counter()
  model = models.build_model(cfg, dtype="float32", seed=0)
  jax.block_until_ready(nnx.state(model))
  build = time.perf_counter() - t

  ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  mask = np.ones_like(ids)
  eng = E.Engine(model, E.Static(new_tokens, 0.0, 0, 1.0, "float32", 0))

  def generate():
    cache, logits = eng.run_prefill(ids, mask)
    out = eng.run_decode(cache, logits, mask, 0, np.arange(batch), np.zeros(batch), ())
    return jax.block_until_ready(out[0])

  t = time.perf_counter()
  generate()
  first = time.perf_counter() - t
  t = time.perf_counter()
  generate()
  second = time.perf_counter() - t
  return {"layers": layers, "import_s": t_import, "abstract_build_s": abstract, "build_s": build,
          "first_generate_s": first, "second_generate_s": second}


def measure(layers: int, args, src: str | None) -> dict:
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  if src:
    env["PYTHONPATH"] = os.path.abspath(src)
  cmd = [sys.executable, os.path.abspath(__file__), "--child", str(layers), "--batch",
         str(args.batch), "--prompt-len", str(args.prompt_len), "--new-tokens",
         str(args.new_tokens)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--depths", default="4,32")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--new-tokens", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=C.MIN_REPEATS)
  ap.add_argument("--threads", type=int, default=None)
  ap.add_argument("--src", default=None, help="another persyn_jax checkout to measure instead")
  ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  ap.add_argument("--out", default=None, help="JSON path (default bench/results/"
                                                "compile_depth_<device>.json)")
  args = ap.parse_args(argv)
  threads = C.pin_threads(args.threads)
  if args.child is not None:
    print(json.dumps(child(args.child, args.batch, args.prompt_len, args.new_tokens)))
    return None
  load_before = C.check_load("before")
  depths = [int(d) for d in args.depths.split(",")]
  runs: dict[int, list[dict]] = {d: [] for d in depths}

  def side(d):
    def run():
      r = measure(d, args, args.src)
      runs[d].append(r)
      return r["first_generate_s"]
    return run

  C.alternate({str(d): side(d) for d in depths}, args.repeats)
  keys = ("abstract_build_s", "build_s", "first_generate_s", "second_generate_s")
  by_depth = {str(d): {k: C.spread([r[k] for r in runs[d]]) for k in keys} for d in depths}
  lo, hi = str(min(depths)), str(max(depths))
  ratio = {k: by_depth[hi][k]["median"] / by_depth[lo][k]["median"] for k in keys}
  for d in depths:
    print(f"{d:3d} layers: first generate {C.fmt_spread(by_depth[str(d)]['first_generate_s'], unit='s')}"
          f", abstract build {C.fmt_spread(by_depth[str(d)]['abstract_build_s'], 1e3, 'ms')}")
  print(f"{hi} over {lo} layers: first generate {ratio['first_generate_s']:.2f}x (goal <= 2x), "
        f"abstract build {ratio['abstract_build_s']:.2f}x")
  result = {"bench": "compile_depth", **C.environment(load_before, threads),
            "config": {k: v for k, v in vars(args).items() if k != "child"}, "model": MODEL,
            "by_depth": by_depth, f"ratio_{hi}_over_{lo}": ratio}
  if args.out or not args.src:
    C.write_json(args.out or C.results_path(f"compile_depth_{C.device()['platform']}.json"),
                 result)
  return result


if __name__ == "__main__":
  main()
