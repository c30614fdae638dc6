"""A stage is a declaration: its name, the earlier stages whose outputs it reads, the sections of
the run config it reads, and its run function. Its DONE key is derived from that declaration
alone, so a stage reruns exactly when something it reads has changed."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from persyn_jax import config as C

if TYPE_CHECKING:
  from persyn_jax.stages.context import Context


@dataclasses.dataclass(frozen=True)
class Stage:
  """One step of the run. `run(ctx)` writes into run_dir/<name>/ and returns its counts (the
  manifest's "counts"). `reads`: earlier stages whose files it reads; `config`: the RunConfig
  fields it reads (top-level names: "sampling", "teachers", "records_per_shard", ...);
  `outputs`: run-directory folders it writes besides its own (generate: data/), moved aside
  with it when its config or inputs change."""

  name: str
  run: Callable[["Context"], dict]
  reads: tuple[str, ...] = ()
  config: tuple[str, ...] = ()
  doc: str = ""
  outputs: tuple[str, ...] = ()


# A model's default engine and quantization settings, left out of the keys: runs made before
# teachers had them keep their stages (set, they are part of the key: they change the answers).
_IN_PROCESS = (("engine", "jax"), ("openai", None), ("quantize", ""))


def _without_layout(v: Any) -> Any:
  """A config section as plain data, less its `mesh` fields: the mesh is a layout, and what a
  stage writes does not depend on it (tests/test_multihost.py holds several processes to the
  records of one), so a run may resume on another mesh without redoing its stages. (The run's own
  `mesh` is never a stage's config for the same reason.) Likewise a served teacher's connection
  settings (its `openai` block less the served model name): a server that moved, or a new
  concurrency, resumes the stage (engines' progress files) instead of redoing it."""
  if isinstance(v, dict):
    return {k: ({"model": x.get("model")} if k == "openai" and isinstance(x, dict) else
                _without_layout(x)) for k, x in v.items()
            if k != "mesh" and (k, x) not in _IN_PROCESS}
  if isinstance(v, list):
    return [_without_layout(x) for x in v]
  return v


def stage_key(stage: Stage, cfg, keys: Mapping[str, str]) -> str:
  """hash(stage name, the keys of the stages it reads, the config sections it reads)."""
  sections = {f: _without_layout(C.to_dict(getattr(cfg, f))) for f in stage.config}
  return C.config_hash([stage.name, {s: keys[s] for s in stage.reads}, sections])


def check_graph(stages: Sequence[Stage], order: Sequence[str],
                config_fields: Sequence[str]) -> None:
  """The declarations are in `order`, read only earlier stages and name real config fields."""
  names = [s.name for s in stages]
  if tuple(names) != tuple(order):
    raise AssertionError(f"stages {names} are not in the run's order {list(order)}")
  for i, s in enumerate(stages):
    later = [r for r in s.reads if r not in names[:i]]
    if later:
      raise AssertionError(f"stage {s.name} reads {later}, which do not run before it")
    unknown = [f for f in s.config if f not in config_fields]
    if unknown:
      raise AssertionError(f"stage {s.name} reads unknown config fields {unknown}")
