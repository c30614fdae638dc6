"""sft: one student per compared policy and seed, trained on that policy's dataset (data/<policy>/)
with sft.seed = the seed (its data order): sft/<policy>/seed<k>/, or sft/<policy>/ when the run
lists no seeds. Each student resumes on its own (its DONE.json, its checkpoints).

Two policies whose datasets hold the same examples in the same order (car or family_strong often
pick the strong teacher) train the same student: the later one is not trained again; its
DONE.json names the student it shares (`same_as`) and the eval stage scores that student once.

With a gs:// run directory a student's checkpoints go to its run directory (orbax writes gs://),
so any machine and every process of a multi-host job resumes from them; its metrics and exported
student are written in a local working directory (fs.work_dir) and uploaded once it is trained,
before its DONE.json."""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json

from persyn_jax import fs, sft
from persyn_jax.data.batches import epoch_batches, record_dataset
from persyn_jax.io_utils import safe_name
from persyn_jax.report.assemble import loss_curve
from persyn_jax.stages.context import Context
from persyn_jax.stages.graph import Stage


def seeds(cfg) -> list[int | None]:
  """The run's SFT seeds; [None]: one student per policy, trained with sft.seed."""
  return list(cfg.seeds) or [None]


def student_parts(policy: str, seed: int | None) -> tuple[str, ...]:
  """The run-dir parts of the student of (`policy`, `seed`): sft/<policy>/[seed<k>/]."""
  return ("sft", safe_name(policy), *([] if seed is None else [f"seed{seed}"]))


def student_dir(ctx: Context, policy: str, seed: int | None) -> str:
  """Where the student of (`policy`, `seed`) is trained: sft/<policy>/[seed<k>/]."""
  return ctx.path(*student_parts(policy, seed))


def examples_key(data_dir: str) -> str:
  """A hash of a dataset's training examples (prompt or messages, response) in record order:
  what SFT reads of it (not provenance, nor which policy wrote it)."""
  h = hashlib.sha256()
  for r in record_dataset(data_dir):
    h.update(json.dumps([r.get("messages") or r["prompt"], r.get("response")]).encode() + b"\n")
  return h.hexdigest()


def run(ctx: Context) -> dict:
  cfg = ctx.cfg
  out = {}
  first_with: dict[str, str] = {}  # examples key -> the first policy with those examples
  trained: dict[tuple, dict] = {}   # (policy, seed) -> summary, in memory (no file race)
  for policy in cfg.compare:
    key = examples_key(ctx.path("data", safe_name(policy)))
    twin = first_with.setdefault(key, policy)
    for seed in seeds(cfg):
      summary = (train_one(ctx, policy, seed) if twin == policy else
                 share_student(ctx, policy, twin, seed, trained[twin, seed]))
      trained[policy, seed] = summary
      if seed is None:
        out[policy] = summary
      else:
        out.setdefault(policy, {})[f"seed{seed}"] = summary
  return out


def share_student(ctx: Context, policy: str, twin: str, seed: int | None, twins: dict) -> dict:
  """The student of (`policy`, `seed`) is that of (`twin`, `seed`) (summary `twins`), trained on
  the same examples: its summary with `same_as`, written as this policy's DONE.json."""
  summary = {**twins, "same_as": twin}
  ctx.log(f"[sft] {policy}{'' if seed is None else f' seed {seed}'}: the same examples as "
          f"{twin}, so the same student (not trained again)")
  ctx.write_json(summary, *student_parts(policy, seed), "DONE.json")
  return summary


def train_one(ctx: Context, policy: str, seed: int | None) -> dict:
  """Trains (or resumes, or finds done) the student of (`policy`, `seed`); its summary."""
  cfg = ctx.cfg
  c = cfg.sft if seed is None else dataclasses.replace(cfg.sft, seed=seed)
  mesh = ctx.mesh_for(c.mesh)
  d = student_dir(ctx, policy, seed)
  label = policy if seed is None else f"{policy} seed {seed}"
  earlier = ctx.read_marker(fs.join(d, "DONE.json"))
  if earlier is not None:
    ctx.log(f"[sft] {label}: done earlier")
    return earlier
  # The student in sft.param_dtype (the master weights the optimizer updates; float32 by
  # default), not student.dtype, which is how it is stored and served.
  model, tok = ctx.load(dataclasses.replace(cfg.student, dtype=c.param_dtype), mesh)
  batches, per_epoch = epoch_batches(ctx.path("data", safe_name(policy)), tok, c)
  ctx.log(f"[sft] {label}: {per_epoch} batches per epoch")
  if batches.stats.get("skipped_unfinished"):
    ctx.log(f"[sft] {label}: {batches.stats['skipped_unfinished']} responses cut by "
            "max_new_tokens left out (sft.unfinished: drop)")
  run_name = f"{cfg.name}-{policy}" + ("" if seed is None else f"-seed{seed}")
  # gs://: checkpoints straight into the run dir (every process, and a machine replacing a
  # preempted one, sees them); metrics and the exported student in a local working dir
  work = fs.work_dir(d)
  ckpt_dir = None if work == d else fs.join(d, "checkpoints")
  res = sft.train(model, tok, batches, c, out_dir=work, mesh=mesh, num_batches=per_epoch,
                  wandb=cfg.wandb, run_name=run_name, checkpoint_dir=ckpt_dir)
  final_loss = res.losses.get(res.step)
  if final_loss is None:  # resumed after the last step (killed while exporting): from the log
    final_loss = dict(loss_curve(res.metrics_path)).get(res.step)
  if work != d and ctx.is_writer():
    fs.put(work, d)
  in_run = lambda p: p if work == d or not p else fs.join(d, p[len(work):].lstrip("/"))  # noqa: E731
  summary = {"steps": res.step, "final_loss": final_loss,
             "export_dir": in_run(res.export_dir), "metrics": in_run(res.metrics_path)}
  ctx.write_json(summary, *student_parts(policy, seed), "DONE.json")
  del model, res
  gc.collect()
  return summary


STAGE = Stage("sft", run, reads=("generate",), config=("student", "compare", "sft", "seeds"),
              doc=__doc__)
