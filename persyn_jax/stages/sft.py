"""sft: one student per compared policy, trained on that policy's dataset (data/<policy>/).

With a gs:// run directory a policy trains in a local working directory (fs.work_dir: its
checkpoints, metrics and exported student), uploaded to sft/<policy>/ once trained and before its
DONE.json; a run resumed on the same machine continues from the local checkpoints."""
from __future__ import annotations

import dataclasses
import gc
import json

import jax

from persyn_jax import fs, sft
from persyn_jax.data.batches import epoch_batches
from persyn_jax.io_utils import safe_name
from persyn_jax.report.assemble import loss_curve
from persyn_jax.stages.context import Context
from persyn_jax.stages.graph import Stage


def run(ctx: Context) -> dict:
  cfg = ctx.cfg
  c = cfg.sft
  mesh = ctx.mesh_for(c.mesh)
  out = {}
  for policy in cfg.compare:
    d = ctx.path("sft", safe_name(policy))
    done = fs.join(d, "DONE.json")
    if fs.exists(done):
      out[policy] = json.loads(fs.read_bytes(done))
      ctx.log(f"[sft] {policy}: done earlier")
      continue
    # The student in sft.param_dtype (the master weights the optimizer updates; float32 by
    # default), not student.dtype, which is how it is stored and served.
    model, tok = ctx.load(dataclasses.replace(cfg.student, dtype=c.param_dtype), mesh)
    batches, per_epoch = epoch_batches(ctx.path("data", safe_name(policy)), tok, c)
    ctx.log(f"[sft] {policy}: {per_epoch} batches per epoch")
    work = fs.work_dir(d)
    if work != d and jax.process_count() > 1:
      # orbax needs one checkpoint directory that every process sees; working dirs are per host
      raise ValueError(f"{d}: SFT into a gs:// run directory runs on one process only (its "
                       f"checkpoints are kept on the machine until the policy is trained); run "
                       f"the sft stage with one process, or use a shared filesystem run dir")
    res = sft.train(model, tok, batches, c, out_dir=work, mesh=mesh, num_batches=per_epoch,
                    wandb=cfg.wandb, run_name=f"{cfg.name}-{policy}")
    final_loss = res.losses.get(res.step)
    if final_loss is None:  # resumed after the last step (killed while exporting): from the log
      final_loss = dict(loss_curve(res.metrics_path)).get(res.step)
    if work != d and ctx.is_writer():
      fs.put(work, d)
    in_run = lambda p: (p if work == d or not p  # noqa: E731
                        else fs.join(d, p[len(work):].lstrip("/")))
    summary = {"steps": res.step, "final_loss": final_loss,
               "export_dir": in_run(res.export_dir), "metrics": in_run(res.metrics_path)}
    ctx.write_json(summary, "sft", safe_name(policy), "DONE.json")
    out[policy] = summary
    del model, res
    gc.collect()
  return out


STAGE = Stage("sft", run, reads=("generate",), config=("student", "compare", "sft"), doc=__doc__)
