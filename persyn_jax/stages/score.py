"""score: quality and learnability of every probe response; the combined reward (Eq. 2)."""
from __future__ import annotations

import dataclasses

from persyn_jax.data import shards
from persyn_jax.run_config import ModelRef
from persyn_jax.scoring import LogProbScorer, RewardScorer, score_records
from persyn_jax.stages.context import Context
from persyn_jax.stages.graph import Stage


def score(ctx: Context, records: list[dict]) -> tuple[list[dict], dict]:
  """`records` scored by the student (and the reward model, if any) on the scoring mesh."""
  sc = ctx.cfg.scoring
  mesh = ctx.mesh_for(sc.mesh)
  # The student in scoring.dtype (bfloat16 by default; float32 where close learnabilities must
  # not be reordered by rounding), not student.dtype: the storage dtype does not decide it.
  student, stok = ctx.load(dataclasses.replace(ctx.cfg.student, dtype=sc.dtype), mesh)
  scorer = LogProbScorer(student, stok, sc, mesh=mesh)
  rm = None
  if sc.quality == "reward_model":
    if not sc.reward_model:
      raise ValueError("scoring.quality=reward_model needs scoring.reward_model (an HF directory)")
    rmodel, rtok = ctx.load(ModelRef("reward_model", sc.reward_model, dtype=sc.dtype), mesh,
                            head="classifier")
    rm = RewardScorer(rmodel, rtok, sc, mesh=mesh)
  return score_records(records, sc, student=scorer, reward_model=rm)


def run(ctx: Context) -> dict:
  scored, stats = score(ctx, ctx.teacher_records("probe"))
  shards.write_stage_records(ctx.path("score"), "score", scored,
                             records_per_shard=ctx.cfg.records_per_shard, extra={"stats": stats})
  return stats


STAGE = Stage("score", run, reads=("probe",),
              config=("teachers", "student", "scoring", "records_per_shard"), doc=__doc__)
