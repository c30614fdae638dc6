"""Preflight: every problem of a run config that would fail a stage later, found before any work.

`problems(cfg, stages)` reads only the config, the environment and the file system (no weights,
no devices, no network), so `--dry-run` lists them all at once on a laptop, and a real run checks
them again before its first stage: a run must not spend hours on the probe and then fail in eval
because `prompts.eval` is 0.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from persyn_jax.run_config import STAGES, RunConfig

# The earlier stages whose outputs each stage reads (each stage module's Stage.reads). Kept here
# as data because importing the stages' graph imports every stage module (jax, the trainer), which
# --dry-run must not; tests/test_dry_run_checks.py checks that it equals GRAPH's.
READS: dict[str, tuple[str, ...]] = {
    "probe": (), "score": ("probe",), "router": ("score",), "route": ("score", "router"),
    "generate": ("probe", "score", "route"), "sft": ("generate",), "eval": ("sft",),
    "study": ("probe", "score")}


def problems(cfg: RunConfig, stages: Sequence[str] = STAGES, *,
             architectures: Mapping[str, object] | None = None,
             num_prompts: int | None = None) -> list[str]:
  """Every problem of `cfg` for running `stages`, one sentence each naming the key and the fix;
  [] when the run can start. `architectures`: ModelConfigs by path that have no config.json yet
  (the toy world's before it is built); `num_prompts`: the prompt count, when known. With
  `world` set the embedded world supplies the prompts (file and reference answers): those are
  not checked."""
  out: list[str] = []
  sel = set(stages)
  world = cfg.world is not None
  scoring = sel & {"score", "generate"}  # the oracle scores in generate
  out += _run_dir_problems(cfg, stages)
  out += _prompt_problems(cfg, world, num_prompts)
  out += _model_problems(cfg, sel, architectures or {})
  names = {t.name for t in cfg.teachers}
  sc = cfg.scoring
  refs = world or bool(cfg.prompts.source.reference_field)
  if scoring and sc.quality == "verifier" and not refs:
    out.append(f"scoring.quality=verifier ({sc.verifier}) needs reference answers, but "
               "prompts.source.reference_field is not set (name the prompt file's answer field)")
  if scoring and sc.quality == "reward_model" and not sc.reward_model:
    out.append("scoring.quality=reward_model but scoring.reward_model is empty (a reward model "
               "directory or hub id), or set scoring.quality=verifier")
  if "router" in sel and not cfg.router.backbone:
    out.append("router.backbone is empty: the router stage needs a decoder (e.g. the student's "
               "path)")
  if sel & {"router", "route"} and len(cfg.teachers) < 2:
    out.append(f"the router needs at least 2 teachers; teachers: {sorted(names)}")
  pc = cfg.policies
  for key in ("strong", "family_strong", "weak"):
    v = getattr(pc, key)
    if v is not None and v not in names:
      out.append(f"policies.{key}={v!r} is not a teacher; teachers: {sorted(names)}")
  if "route" in sel or "generate" in sel:
    if "family_strong" in cfg.compare and pc.family_strong is None:
      fam = cfg.student.family if cfg.student else ""
      if not fam or not any(t.family == fam for t in cfg.teachers):
        out.append(f"compare has family_strong, but no teacher shares the student's family "
                   f"({fam!r}); set teachers' `family`, or policies.family_strong, or drop it")
    if "mix" in cfg.compare and len(cfg.teachers) < 2:
      out.append("compare has mix, which needs at least 2 teachers")
  if cfg.wandb is not None and cfg.wandb.mode != "disabled" and not _installed("wandb"):
    out.append(f"wandb.mode={cfg.wandb.mode} needs the wandb package: install the extra with "
               '`pip install "persyn-jax[wandb]"` (or set wandb: null)')
  if "eval" in sel:
    out += _eval_problems(cfg, refs, num_prompts)
  if "study" in sel and cfg.study.enabled:
    unknown = [t for t in cfg.study.teachers if t not in names]
    if unknown and cfg.teachers:
      out.append(f"study.teachers: {unknown} are not teachers; teachers: {sorted(names)}")
    if cfg.eval.verifier is None:
      out.append("study.enabled needs eval.verifier (its gains are measured accuracies)")
    if cfg.prompts.eval == 0:
      out.append("study.enabled needs held-out prompts: set prompts.eval (a count or a fraction)")
  return out


def _run_dir_problems(cfg: RunConfig, stages: Sequence[str]) -> list[str]:
  """The run dir is a file (the run would refuse it), or a selected stage reads an earlier stage
  that neither runs now nor finished in the run dir (its DONE.json): the real run would fail in
  that stage, with a missing file. A gs:// run dir
  is not checked (a dry run does not reach the bucket)."""
  run_dir = cfg.out_dir
  if "://" in run_dir:
    return []
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    return [f"{run_dir}: the run directory is a file, not a directory (use another --run-dir, "
            "or move the file away)"]
  sel = set(stages)
  out, seen = [], set()
  for s in STAGES:
    for r in READS.get(s, ()) if s in sel else ():
      if r in sel or r in seen or os.path.exists(os.path.join(run_dir, r, "DONE.json")):
        continue
      seen.add(r)
      out.append(f"stage {s} reads stage {r}, which is not selected and has not finished in "
                 f"{run_dir} (no {r}/DONE.json): add {r} to --stages")
  return out


def _prompt_problems(cfg: RunConfig, world: bool, num_prompts: int | None) -> list[str]:
  src = cfg.prompts.source
  out = []
  if not world and not src.path:
    out.append("prompts.source.path is empty")
  elif not world and src.format != "hub" and "://" not in src.path and not os.path.exists(src.path):
    out.append(f"prompts.source.path={src.path!r}: no such file or directory")
  if num_prompts:
    # eval first: held-out prompts are taken before the probe's, so an eval count past the prompt
    # count is its own problem (the probe check would blame probe, against a negative count)
    p = cfg.prompts
    ev = int(p.eval) if p.eval >= 1 else round(p.eval * num_prompts)  # as split_prompts
    if ev >= num_prompts:
      out.append(f"prompts.eval={p.eval:g} leaves no training prompts: the prompt set has "
                 f"{num_prompts} (set a smaller count, or a fraction)")
      return out
    train = num_prompts - ev
    probe = int(p.probe) if p.probe >= 1 else round(p.probe * train)
    if probe > train:
      out.append(f"prompts.probe={p.probe:g} exceeds the {train} training prompts")
  return out


def _installed(module: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(module) is not None


def _dir_or_url(path: str) -> bool:
  """A local directory, or a gs:// URL (checked when the model is loaded: a dry run does not
  reach the bucket)."""
  return "://" in path or os.path.isdir(path)


def _model_problems(cfg: RunConfig, sel: set[str], archs: Mapping[str, object]) -> list[str]:
  from persyn_jax.models import hub
  out = []
  refs = [("teachers", t) for t in cfg.teachers] + ([("student", cfg.student)] if cfg.student
                                                      else [])
  for where, ref in refs:
    if ref.served:
      env = ref.openai.api_key_env
      if env and not os.environ.get(env):
        out.append(f"teacher {ref.name!r}: openai.api_key_env={env!r} but that environment "
                   "variable is not set")
      continue
    if (ref.path not in archs and not _dir_or_url(ref.path)
        and hub.parse_id(ref.path) is None):
      out.append(f"{where} {ref.name!r}: path {ref.path!r} is neither a directory nor a hub id "
                 "('org/name[@revision]')")
  for key, path in (("router.backbone", cfg.router.backbone),
                    ("scoring.reward_model", cfg.scoring.reward_model)):
    if path and path not in archs and not _dir_or_url(path) and hub.parse_id(path) is None:
      out.append(f"{key}={path!r} is neither a directory nor a hub id")
  out += _stop_problems(cfg, archs)
  return out


def _stop_problems(cfg: RunConfig, archs: Mapping[str, object]) -> list[str]:
  """Stop token ids each in-process model that samples with them can emit (an id past the
  vocabulary never stops): `sampling`'s for the teachers, `eval.sampling`'s for the student."""
  from persyn_jax import zoo
  out = []
  for key, ids, models in (
      ("sampling", cfg.sampling.stop_token_ids, [("teacher", t) for t in cfg.teachers]),
      ("eval.sampling", cfg.eval.sampling.stop_token_ids,
       [("student", cfg.student)] if cfg.student else [])):
    for role, m in models:
      if not ids or m.served:
        continue
      try:
        vocab = (archs[m.path] if m.path in archs else zoo.architecture(m.path)).vocab_size
      except (KeyError, ValueError, OSError):
        continue  # an unknown architecture: planning says so
      bad = [i for i in ids if not 0 <= i < vocab]
      if bad:
        out.append(f"{key}.stop_token_ids {bad} are outside the vocabulary of {role} {m.name!r} "
                   f"(0..{vocab - 1})")
  return out


def _eval_problems(cfg: RunConfig, refs: bool, num_prompts: int | None) -> list[str]:
  from persyn_jax.evaluate import EXPORTS
  from persyn_jax.verify import get_verifier
  out = []
  e = cfg.prompts.eval
  if e == 0 or (num_prompts and e < 1 and int(e * num_prompts) == 0):
    out.append(f"prompts.eval={e} leaves no held-out prompts, but the eval stage is selected: set "
               "prompts.eval (a count or a fraction), or leave eval out of --stages")
  c = cfg.eval
  if c.verifier is not None:
    try:
      get_verifier(c.verifier)
    except ValueError as err:
      out.append(f"eval.verifier: {err}")
    if not refs:
      out.append(f"eval.verifier={c.verifier!r} needs reference answers, but "
                 "prompts.source.reference_field is not set (or set eval.verifier: null)")
  for b in c.benchmarks:  # read after SFT: a missing file would fail hours in
    if "://" not in b.path and not os.path.exists(b.path):
      out.append(f"eval.benchmarks {b.name!r}: path={b.path!r}: no such file or directory")
  bad = [f for f in c.exports if f not in EXPORTS]
  if bad:
    out.append(f"eval.exports: unknown formats {bad}; known: {list(EXPORTS)}")
  return out


def format_problems(found: Sequence[str]) -> str:
  return (f"{len(found)} problem(s) would fail this run:\n" +
          "\n".join(f"  - {p}" for p in found))
