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
import shlex
import sys
import traceback

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "toy.yaml")


def parse_args(argv=None) -> argparse.Namespace:
  argv = sys.argv[1:] if argv is None else list(argv)
  # the key table imports the config dataclasses: only built when help is asked for
  helping = bool({"-h", "--help"} & set(argv))
  epilog = "config keys (YAML, or --set KEY=VALUE):\n" + config_help() if helping else None
  if helping:
    from persyn_jax.run_config import STAGES
    stage_names = ",".join(STAGES)
  else:
    stage_names = "the stages"
  ap = argparse.ArgumentParser(prog="python -m persyn_jax.train", description=__doc__,
                               epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=None, help="YAML run config (default: the embedded toy world)")
  ap.add_argument("--stages", default="all",
                  help=f"comma-separated subset of {stage_names} (default: all)")
  ap.add_argument("--redo", default="", metavar="STAGE[,STAGE]",
                  help="run these stages again even if done: their complete shards are checked and "
                       "kept, the missing or corrupt ones regenerated")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="dotted override, e.g. --set sft.lr=1e-5 (repeatable)")
  ap.add_argument("--run-dir", default=None, help="output directory (default runs/<name>)")
  ap.add_argument("--dry-run", action="store_true",
                  help="print the plan (stages, generations, mesh, tokens, memory per device) and exit")
  ap.add_argument("--num-prompts", type=_positive_int, default=None,
                  help="--dry-run: the number of prompts to plan for (default: read the prompt file)")
  ap.add_argument("--help-config", action="store_true",
                  help="list every config section and key with its type and default, and exit")
  ap.add_argument("--coordinator", default=None, help="multi-process: coordinator host:port")
  ap.add_argument("--num-processes", type=int, default=None)
  ap.add_argument("--process-id", type=int, default=None)
  return ap.parse_args(argv)


def _positive_int(text: str) -> int:
  """An argparse type: an integer >= 1 (a count of prompts: 0 or fewer plans nothing)."""
  try:
    n = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if n < 1:
    raise argparse.ArgumentTypeError(f"{n} is not a positive count (>= 1)")
  return n


def _stage_list(text: str) -> tuple[str, ...]:
  """Comma-separated stage names, in their first order, each once."""
  return tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))


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
  if args.help_config:
    print(config_help())
    return 0
  from persyn_jax import distributed  # before anything touches a device
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from persyn_jax.config import ConfigError
  from persyn_jax.run_config import STAGES, load_run_config
  overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
  cfg = load_run_config(args.config or DEFAULT_CONFIG, overrides)
  stages = STAGES if args.stages == "all" else _stage_list(args.stages)
  redo = _stage_list(args.redo)
  if not stages:
    raise ConfigError(f"--stages {args.stages!r} names no stage; stages: {','.join(STAGES)} "
                      "(or all)")
  bad = [s for s in stages + redo if s not in STAGES]
  if bad:
    raise ConfigError(f"--stages / --redo: unknown {bad}; stages: {','.join(STAGES)}")
  from persyn_jax import preflight
  planned, architectures = _planning_config(cfg)
  n = args.num_prompts if args.num_prompts is not None else _count_prompts(planned)
  found = preflight.problems(planned, stages, architectures=architectures, num_prompts=n or None)
  if args.dry_run:  # imports neither the stages nor the world's builder
    from persyn_jax import plan as planlib
    p = None
    try:
      p = planlib.plan(planned, num_prompts=n, architectures=architectures)
    except (planlib.PlanError, KeyError) as e:
      found.append(str(e).strip("'\""))
    if p is not None:
      print(planlib.format_plan(p))
    if found:  # every problem at once, not the first one per try
      print(f"--dry-run: {preflight.format_problems(found)}", file=sys.stderr)
      return 2
    return 0 if p["fits"] else 3
  if found:  # checked again before a real run does any work
    print(preflight.format_problems(found), file=sys.stderr)
    return 2
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


def _planning_config(cfg):
  """(the config the planner and the preflight checks read, architectures by pseudo-path): the
  embedded world's models and sizes from its specs, without building it."""
  if cfg.world is None:
    return cfg, {}
  from persyn_jax import toyworld
  planned = toyworld.plan_config(cfg)
  return planned, toyworld.architectures(planned.world.scale)


def config_help(cls=None) -> str:
  """Every config section and key (dotted, as --set takes them) with its type and default,
  read from the run config's dataclasses; `[]` marks the fields of each list entry."""
  import typing

  from persyn_jax.run_config import RunConfig
  rows: list[tuple[str, str, str]] = []

  def walk(c, prefix: str, defaults) -> None:
    hints = typing.get_type_hints(c)
    for f in dataclasses.fields(c):
      key, t = prefix + f.name, hints[f.name]
      if defaults is not None:
        d = getattr(defaults, f.name)
      elif f.default is not dataclasses.MISSING:
        d = f.default
      elif f.default_factory is not dataclasses.MISSING:
        d = f.default_factory()
      else:
        d = dataclasses.MISSING
      sub = _dataclass_of(t)
      if sub is not None:
        is_list = typing.get_origin(t) is tuple
        default = ("required" if d is dataclasses.MISSING else
                   "[]" if is_list and not d else "null" if d is None else "(section)")
        rows.append((key, _type_name(t), default))
        walk(sub, key + ("[]." if is_list else "."),
             d if dataclasses.is_dataclass(d) and not isinstance(d, type) else None)
      else:
        rows.append((key, _type_name(t), "required" if d is dataclasses.MISSING else _show(d)))

  walk(cls or RunConfig, "", None)
  width = max(len(k) for k, _, _ in rows)
  twidth = min(40, max(len(t) for _, t, _ in rows))
  return "\n".join(f"  {k:<{width}}  {t:<{twidth}}  default: {d}" for k, t, d in rows)


def _dataclass_of(t):
  """The dataclass inside `t` (X, X | None, tuple[X, ...]), or None."""
  import typing
  if dataclasses.is_dataclass(t):
    return t
  for a in typing.get_args(t):
    if dataclasses.is_dataclass(a):
      return a
  return None


def _type_name(t) -> str:
  import types
  import typing
  origin, args = typing.get_origin(t), typing.get_args(t)
  if origin is typing.Literal:
    return " | ".join(repr(a) for a in args)
  if origin in (typing.Union, types.UnionType):
    return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
  if origin is tuple:
    return f"list of {_type_name(args[0])}" if args else "list"
  return getattr(t, "__name__", str(t))


def _show(v) -> str:
  if v is None:
    return "null"
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, tuple):
    return "[" + ", ".join(map(str, v)) + "]"
  return json.dumps(v) if isinstance(v, str) else str(v)


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
