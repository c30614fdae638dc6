"""The stages as a declared graph: keys derived from the declarations, the runner's refusal of an
old run directory, a mesh per stage, and a --dry-run that imports neither the stages nor the
toy world's builder. (The whole run: test_pipeline.py.)"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from persyn_jax import config as C
from persyn_jax import sharding as shd
from persyn_jax.run_config import STAGES, RunConfig
from persyn_jax.stages import FORMAT, GRAPH, Run, RunDirError, stage_key, teacher_shards
from persyn_jax.stages.context import Context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(tmp_path, models="/m", **over) -> RunConfig:
  data = {"world": None, "run_dir": str(tmp_path / "run"),
          "teachers": [{"name": "t1", "path": f"{models}/t1"},
                       {"name": "t/2", "path": f"{models}/t2"}],
          "student": {"name": "s", "path": f"{models}/s"},
          "prompts": {"source": {"path": str(tmp_path / "prompts.jsonl")}, "probe": 1.0}}
  return C.from_dict(RunConfig, C.apply_overrides(data, [f"{k}={v}" for k, v in over.items()]))


def keys(cfg) -> dict[str, str]:
  out = {}
  for st in GRAPH:
    out[st.name] = stage_key(st, cfg, out)
  return out


def test_the_graph_runs_in_the_documented_order_and_reads_only_earlier_stages():
  assert tuple(st.name for st in GRAPH) == STAGES == (
      "probe", "score", "router", "route", "generate", "sft", "eval", "study")
  reads = {st.name: set(st.reads) for st in GRAPH}
  assert reads["generate"] >= {"probe", "route"} and "scoring" in GRAPH[4].config
  assert reads["eval"] == {"sft"} and "prompts" in GRAPH[6].config
  fields = {f.name for f in dataclasses.fields(RunConfig)}
  for i, st in enumerate(GRAPH):
    assert set(st.reads) <= set(STAGES[:i]) and set(st.config) <= fields


@pytest.mark.parametrize("override, changed", [
    ("sft.lr=0.5", {"sft", "eval", "study"}),
    ("eval.verifier=null", {"eval", "study"}),
    ("study.eval=5", {"study"}),
    ("policies.mix_ratio=0.25", {"route", "generate", "sft", "eval"}),
    ("router.epochs=7", {"router", "route", "generate", "sft", "eval"}),
    ("scoring.alpha=0.9", {"score", "router", "route", "generate", "sft", "eval", "study"}),
    ("sampling.temperature=0.3", set(STAGES)),
    ("records_per_shard=3", set(STAGES)),
    ("seeds=[0,1]", {"sft", "eval"}),
    ("sweep.alpha=[0.0,1.0]", set()),  # the sweep's children have keys of their own
])
def test_a_change_reruns_the_stages_that_read_it_and_those_after_them(tmp_path, override, changed):
  """A key is hash(name, keys of the stages read, config read): a config change moves the keys of
  the stages that declare it and, through their keys, of every stage that reads those."""
  k, key, value = keys(config(tmp_path)), *override.split("=")
  k2 = keys(config(tmp_path, **{key: value}))
  assert {s for s in STAGES if k[s] != k2[s]} == changed


def test_a_mesh_is_layout_and_changes_no_key(tmp_path):
  k = keys(config(tmp_path))
  assert keys(config(tmp_path, **{"sft.mesh": "{data: 2, fsdp: 2, tensor: 2}",
                                  "sampling.mesh": "{data: 8, fsdp: 1, tensor: 1}",
                                  "mesh.data": 2})) == k


def test_one_function_names_a_teachers_shards():
  assert teacher_shards("probe", "t/2") == "probe-t_2"
  assert teacher_shards("generate", "t/2") == "gen-t_2"


def test_a_run_directory_from_before_the_stage_graph_is_refused(tmp_path):
  for m in ("t1", "t2", "s"):  # model directories, so that the config passes the preflight
    (tmp_path / "m" / m).mkdir(parents=True)
  (tmp_path / "prompts.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
  cfg = config(tmp_path, models=str(tmp_path / "m"))
  old = tmp_path / "run" / "probe"
  old.mkdir(parents=True)
  (old / "DONE.json").write_text(json.dumps({"stage": "probe", "key": "abc", "counts": {},
                                             "seconds": 1.0}))
  with pytest.raises(RunDirError, match=r"probe/DONE.json: a manifest of format 1, not 2 .*"
                                        r"stage keys changed.*use a new --run-dir"):
    Run(cfg, log=lambda m: None).run(["probe"])
  assert not (tmp_path / "run" / "config.json").exists()  # nothing of the old run was touched
  assert FORMAT == 2


def test_a_world_config_is_resolved_by_the_cli_not_the_stages(tmp_path):
  cfg = C.from_dict(RunConfig, {"run_dir": str(tmp_path)})  # the default: world set, no models
  with pytest.raises(ValueError, match="persyn_jax.toyworld.resolve"):
    Run(cfg)


def test_each_stage_gets_its_own_mesh_built_once(tmp_path):
  cfg = config(tmp_path, **{"sft.mesh": "{data: 2, fsdp: 2, tensor: 2}",
                            "scoring.mesh": "{data: 2, fsdp: 2, tensor: 2}"})
  ctx = Context(cfg, log=lambda m: None)
  assert dict(ctx.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}  # the run's (default) mesh
  sft_mesh = ctx.mesh_for(cfg.sft.mesh)
  assert dict(sft_mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert ctx.mesh_for(cfg.scoring.mesh) is sft_mesh  # the same MeshConfig: one mesh
  assert ctx.mesh_for(cfg.sampling.mesh) is ctx.mesh  # None: the run's mesh


def test_the_plan_gives_each_stage_its_mesh_and_layout(tmp_path):
  """Sampling is planned in the serving layout (weights over tensor only), training stages in the
  training layout (over fsdp x tensor), each on its own mesh."""
  from persyn_jax import plan
  from persyn_jax.models.config import ModelConfig
  arch = ModelConfig(model_type="llama", vocab_size=1000, hidden_size=512, intermediate_size=1024,
                     num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64)
  cfg = config(tmp_path, **{"plan.devices": 16, "mesh": "{data: 1, fsdp: 8, tensor: 2}",
                            "sampling.mesh": "{data: 4, fsdp: 1, tensor: 4}",
                            "router.backbone": "/m/s"})
  archs = {"/m/t1": arch, "/m/t2": arch, "/m/s": arch}
  p = plan.plan(cfg, num_prompts=100, architectures=archs)
  rows = {(r["stage"], r["model"]): r for r in p["memory_per_device"]}
  n = arch.num_params()
  sample, sft = rows[("probe/generate", "t1")], rows[("sft", "s")]
  assert sample["mesh"] == {"data": 4, "fsdp": 1, "tensor": 4}
  assert sample["params"] == round(n * 2 / 4 / plan.GB, 3)      # bf16 over tensor=4 only
  assert sft["mesh"] == {"data": 1, "fsdp": 8, "tensor": 2} == p["mesh"]
  assert sft["params"] == round(n * 4 / 16 / plan.GB, 3)        # fp32 over fsdp x tensor = 16
  assert "mesh 4x1x4" in plan.format_plan(p)


def test_dry_run_imports_neither_the_stages_nor_the_world_builder():
  """--dry-run of the default config (the toy world) plans from the world's specs: no builder,
  no stages, no SFT training code is imported."""
  wrapper = ("import runpy, sys\n"
             "sys.argv = ['persyn_jax.train', '--dry-run']\n"
             "try:\n  runpy.run_module('persyn_jax.train', run_name='__main__')\n"
             "except SystemExit as e:\n  code = e.code\n"
             "print('MODULES', ' '.join(sorted(sys.modules)))\n"
             "sys.exit(code)\n")
  out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "fits: yes" in out.stdout
  modules = set(out.stdout.split("MODULES ", 1)[1].split())
  assert "persyn_jax.toyworld.specs" in modules  # it did plan the world
  for name in ("persyn_jax.toyworld.build", "persyn_jax.toyworld.tasks", "persyn_jax.stages",
               "persyn_jax.sft.trainer", "persyn_jax.sft.session", "persyn_jax.router_train",
               "persyn_jax.report"):
    assert name not in modules, name
  assert not [m for m in modules if m.startswith("persyn_jax.stages.")]
