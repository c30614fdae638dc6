"""python -m persyn_jax.train: the whole Route-then-Generate run (or some of its stages).

    python -m persyn_jax.train                       # the embedded toy world, end to end
    python -m persyn_jax.train --config configs/math.yaml --dry-run
    python -m persyn_jax.train --config configs/instruct.yaml --stages probe,score --set sampling.batch_size=128
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "toy.yaml")


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m persyn_jax.train", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=None, help="YAML run config (default: the embedded toy world)")
  ap.add_argument("--stages", default="all",
                  help="comma-separated subset of probe,score,router,route,generate,sft,eval")
  ap.add_argument("--redo", default="", metavar="STAGE[,STAGE]",
                  help="run these stages again even if done: their complete shards are checked and "
                       "kept, the missing or corrupt ones regenerated")
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
  """The CLI's one error handler. Known errors (bad input: exit 2; failures: exit 1) print one
  line; any other error keeps its traceback and adds a line saying what the run was doing."""
  args = parse_args(argv)
  try:
    return _main(args)
  except Exception as e:  # noqa: BLE001 - sorted below; imported late to keep start-up light
    bad_input, failures = _known_errors()
    if isinstance(e, bad_input + failures):
      print(f"error: {_one_line(e)}", file=sys.stderr)
      if getattr(e, "redo", None):
        cmd = list(sys.argv[1:] if argv is None else argv)
        print(f"to regenerate it, run: python -m persyn_jax.train {shlex.join(cmd)} --redo "
              f"{e.redo}", file=sys.stderr)
      return 2 if isinstance(e, bad_input) else 1
    from persyn_jax.stages.context import activity
    traceback.print_exc()
    print(f"persyn_jax.train failed while running: {activity() or 'start-up'}", file=sys.stderr)
    return 1


def _known_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
  """(bad input, failures): the error types the CLI reports in one line."""
  from persyn_jax.config import ConfigError
  from persyn_jax.data.chat import ChatTemplateError
  from persyn_jax.data.records import RecordError
  from persyn_jax.data.shards import ShardError
  from persyn_jax.data.sources import PromptFileError
  from persyn_jax.models.checks import CheckpointError
  from persyn_jax.models.hub import HubError
  from persyn_jax.models.safetensors_io import SafetensorsError
  from persyn_jax.plan import PlanError
  from persyn_jax.sft.log import NonFiniteError
  from persyn_jax.stages.lock import RunDirError, RunLockedError
  return ((ConfigError, PromptFileError, ChatTemplateError, CheckpointError, SafetensorsError,
           HubError, PlanError, RunDirError),
          (ShardError, RecordError, RunLockedError, NonFiniteError))


def _one_line(e: BaseException) -> str:
  return f"{type(e).__name__}: " + " ".join(str(e).split())


def _main(args: argparse.Namespace) -> int:
  from persyn_jax import distributed  # before anything touches a device
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from persyn_jax.config import ConfigError
  from persyn_jax.run_config import STAGES, load_run_config
  overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
  cfg = load_run_config(args.config or DEFAULT_CONFIG, overrides)
  stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(",") if s.strip())
  redo = tuple(s.strip() for s in args.redo.split(",") if s.strip())
  bad = [s for s in stages + redo if s not in STAGES]
  if bad:
    raise ConfigError(f"--stages / --redo: unknown {bad}; stages: {','.join(STAGES)}")
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
    except KeyError as e:
      raise planlib.PlanError(f"--dry-run: {e}") from None
    print(planlib.format_plan(p))
    return 0 if p["fits"] else 3
  enable_compilation_cache()
  from persyn_jax import toyworld
  from persyn_jax.stages import Run
  from persyn_jax.stages.context import log_to_stdout
  cfg = toyworld.resolve(cfg, log=log_to_stdout)  # `world:` -> teachers, student, prompts
  report = Run(cfg).run(stages, redo=redo)
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
