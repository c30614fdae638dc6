"""The toy world as a config: `world:` resolved into teachers, student, prompts and the router's
backbone. The CLI calls this before it builds the run; the stages never see `world`."""
from __future__ import annotations

import dataclasses
from typing import Callable

from persyn_jax.toyworld.specs import SCALES, architectures, pseudo_path

__all__ = ["resolve", "plan_config", "architectures"]


def resolve(cfg, log: Callable[[str], None] = print):
  """With `world` set, builds (or loads from the cache) the toy world and points the run at it;
  without, returns `cfg` unchanged."""
  if cfg.world is None:
    return cfg
  from persyn_jax.run_config import ModelRef
  from persyn_jax.toyworld.build import build
  # several processes: the first to get the lock builds it (in a one-process subprocess), the
  # others wait and load it (or build their own copy when the cache is not shared)
  w = build(cfg.world.scale, cfg.world.seed, cfg.world.cache_dir, log=log)
  teachers = tuple(ModelRef(name=n, path=p, family=f, dtype="float32") for n, p, f in w.teachers)
  n, p, f = w.student
  source = dataclasses.replace(cfg.prompts.source, path=w.prompts_path, format="jsonl",
                               prompt_field="prompt", reference_field="reference", id_field="id",
                               keep_fields=("kind",))
  prompts = dataclasses.replace(cfg.prompts, source=source, probe=float(w.probe), eval=float(w.eval))
  router = cfg.router if cfg.router.backbone else dataclasses.replace(cfg.router, backbone=p)
  return dataclasses.replace(cfg, teachers=teachers, student=ModelRef(n, p, f, "float32"),
                             prompts=prompts, router=router)


def plan_config(cfg):
  """The run config with the world's models and sizes filled in from its specs, without building
  it (for --dry-run): model paths are `toyworld:<scale>/<name>` pseudo-paths, whose architectures
  `architectures(scale)` gives the planner."""
  from persyn_jax.data.sources import PromptSourceConfig
  from persyn_jax.run_config import ModelRef
  scale = cfg.world.scale
  sc = SCALES[scale]
  teachers = tuple(ModelRef(s.name, pseudo_path(scale, s.name), s.model_type, "float32")
                   for s in sc.teachers)
  st = ModelRef(sc.student.name, pseudo_path(scale, sc.student.name), sc.student.model_type,
                "float32")
  prompts = dataclasses.replace(cfg.prompts, probe=float(sc.probe), eval=float(sc.eval),
                                source=PromptSourceConfig(path="", max_prompts=sc.prompts))
  router = dataclasses.replace(cfg.router, backbone=cfg.router.backbone or st.path)
  return dataclasses.replace(cfg, teachers=teachers, student=st, prompts=prompts, router=router)
