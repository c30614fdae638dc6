"""python -m persyn_jax.train: the whole Route-then-Generate run (or some of its stages).

    python -m persyn_jax.train                       # the embedded toy world, end to end
    python -m persyn_jax.train --config configs/math.yaml --dry-run
    python -m persyn_jax.train --config configs/instruct.yaml --stages probe,score --set sampling.batch_size=128
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "toy.yaml")


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m persyn_jax.train", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=None, help="YAML run config (default: the embedded toy world)")
  ap.add_argument("--stages", default="all",
                  help="comma-separated subset of probe,score,router,route,generate,sft,eval")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="dotted override, e.g. --set sft.lr=1e-5 (repeatable)")
  ap.add_argument("--run-dir", default=None, help="output directory (default runs/<name>)")
  ap.add_argument("--dry-run", action="store_true",
                  help="print the plan (stages, generations, mesh, tokens, memory per device) and exit")
  ap.add_argument("--num-prompts", type=int, default=None,
                  help="--dry-run: the number of prompts to plan for (default: read the prompt file)")
  ap.add_argument("--coordinator", default=None, help="multi-process: coordinator host:port")
  ap.add_argument("--num-processes", type=int, default=None)
  ap.add_argument("--process-id", type=int, default=None)
  return ap.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from persyn_jax import distributed  # before anything touches a device
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from persyn_jax.config import ConfigError
  from persyn_jax.run_config import STAGES, load_run_config
  overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
  try:
    cfg = load_run_config(args.config or DEFAULT_CONFIG, overrides)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(",") if s.strip())
  bad = [s for s in stages if s not in STAGES]
  if bad:
    print(f"--stages: unknown {bad}; stages: {','.join(STAGES)}", file=sys.stderr)
    return 2
  if args.dry_run:  # imports neither the stages nor the world's builder
    from persyn_jax import plan as planlib
    architectures = {}
    if cfg.world is not None:
      from persyn_jax import toyworld
      cfg = toyworld.plan_config(cfg)
      architectures = toyworld.architectures(cfg.world.scale)
    n = args.num_prompts if args.num_prompts is not None else _count_prompts(cfg)
    try:
      p = planlib.plan(cfg, num_prompts=n, architectures=architectures)
    except (planlib.PlanError, KeyError) as e:
      print(f"--dry-run: {e}", file=sys.stderr)
      return 2
    print(planlib.format_plan(p))
    return 0 if p["fits"] else 3
  enable_compilation_cache()
  from persyn_jax import toyworld
  from persyn_jax.stages import Run
  from persyn_jax.stages.context import log_to_stdout
  cfg = toyworld.resolve(cfg, log=log_to_stdout)  # `world:` -> teachers, student, prompts
  report = Run(cfg).run(stages)
  if report:
    out = os.path.join(report["run_dir"], "report")
    print(f"\nReport: {out}/report.md  (also report.json, "
          + ", ".join(os.path.basename(v) for v in report["plots"].values()) + ")")
    print(report.get("summary", ""))
  return 0


def enable_compilation_cache(path: str = "") -> str:
  """JAX's persistent compilation cache, so a rerun (or the next run) skips XLA compiles."""
  import jax
  path = path or os.environ.get("PERSYN_JAX_XLA_CACHE") or os.path.join(
      os.environ.get("PERSYN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "persyn_jax"),
      "xla")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return path


def _count_prompts(cfg) -> int:
  src = cfg.prompts.source
  if src.max_prompts:
    return src.max_prompts
  if src.path and os.path.isfile(src.path) and src.path.endswith((".jsonl", ".json")):
    with open(src.path, "rb") as f:
      return sum(1 for line in f if line.strip())
  return 0


if __name__ == "__main__":
  sys.exit(main())
