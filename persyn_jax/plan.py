"""--dry-run: the plan of a run before any weights are present.

Stages, teachers, generations per teacher, the mesh, estimated tokens, and memory per device
(parameters, KV cache, optimizer state, activations) for each stage on that stage's own mesh
(`<stage>.mesh`, or the run's `mesh`); a plan that does not fit the devices' memory is refused,
naming the stage and the sizes. Teachers served by their own engine (`engine: openai`) take no
memory here. The config's other problems are persyn_jax.preflight's.

Layouts: the sampling stages use the SERVING layout (weights split over `tensor` only, rows over
data x fsdp: no FSDP gathers inside a decode loop); the others the TRAINING layout (weights over
fsdp x tensor, rows over data x fsdp). The planner knows no particular world: architectures of
models that have no config.json (the toy world's, before it is built) come in `architectures`.
"""
from __future__ import annotations

from typing import Mapping

import jax

from persyn_jax import zoo
from persyn_jax.models import as_dtype
from persyn_jax.models.config import ModelConfig
from persyn_jax.run_config import RunConfig
from persyn_jax.sharding import AXES, MeshConfig

GB = 1024**3


class PlanError(ValueError):
  pass


def _bytes(dtype: str) -> int:
  return as_dtype(dtype).itemsize


def _mesh(mc: MeshConfig, devices: int, field: str) -> dict[str, int]:
  try:
    return dict(zip(AXES, mc.shape(devices)))
  except ValueError as e:
    raise PlanError(f"{field}: {e} (plan.devices={devices}: set plan.devices to the target's "
                    "device count)") from None


def _layout(mesh: dict[str, int], layout: str) -> tuple[int, int]:
  """(ways the weights are split, ways the rows are split) of a stage's mesh and layout."""
  weights = mesh["tensor"] if layout == "serving" else mesh["fsdp"] * mesh["tensor"]
  return weights, mesh["data"] * mesh["fsdp"]


def plan(cfg: RunConfig, *, num_prompts: int | None = None,
         architectures: Mapping[str, ModelConfig] | None = None) -> dict:
  """The plan of `cfg` (see the module docstring). `architectures`: ModelConfigs by model path,
  consulted before the path's config.json and the zoo."""
  devices = cfg.plan.devices or jax.device_count()
  mesh = _mesh(cfg.mesh, devices, "mesh")
  archs = dict(architectures or {})

  def arch(path: str) -> ModelConfig:
    return archs[path] if path in archs else zoo.architecture(path)

  def stage_mesh(field: str, mc: MeshConfig | None, layout: str):
    m = mesh if mc is None else _mesh(mc, devices, field)
    return m, *_layout(m, layout)

  mem = cfg.plan.device_memory_gb * GB
  if not mem:
    try:
      stats = jax.devices()[0].memory_stats() or {}
      mem = stats.get("bytes_limit", 0)
    except Exception:  # CPU backends report nothing
      mem = 0
  s = cfg.sampling
  prompt_toks = cfg.plan.prompt_tokens
  resp_toks = cfg.plan.response_tokens or s.max_new_tokens
  k = len(cfg.teachers)
  if num_prompts is None:
    num_prompts = cfg.prompts.source.max_prompts or 0
  N_all = num_prompts
  ev = int(cfg.prompts.eval) if cfg.prompts.eval >= 1 else int(cfg.prompts.eval * N_all)
  N = N_all - ev
  P = int(cfg.prompts.probe) if cfg.prompts.probe >= 1 else int(cfg.prompts.probe * N)
  stages, problems = [], []

  def add(stage, model, stage_mesh_, **m):
    total = sum(m.values())
    row = {"stage": stage, "model": model, "mesh": stage_mesh_,
           **{k2: round(v / GB, 3) for k2, v in m.items()}, "total_gb": round(total / GB, 3)}
    stages.append(row)
    if mem and total > mem:
      problems.append(f"{stage} ({model}): needs {total / GB:.1f} GB per device "
                      f"({', '.join(f'{k2} {v / GB:.1f}' for k2, v in m.items())}), "
                      f"but a device has {mem / GB:.1f} GB")

  teachers = []
  smesh, shard_w, shard_b = stage_mesh("sampling.mesh", s.mesh, "serving")
  for t in cfg.teachers:
    if t.served:  # answered by its own server: no memory on this run's devices
      teachers.append({"name": t.name, "path": t.path, "params_b": None, "engine": "openai",
                       "url": t.openai.url, "probe_generations": P * s.num_samples})
      continue
    a = arch(t.path)
    b = _bytes(t.dtype)
    params = a.num_params() * b / shard_w
    seq = prompt_toks + resp_toks
    rows = min(s.batch_size, max(1, P))
    kv = 2 * a.num_layers * rows * seq * a.num_kv_heads * a.head_dim * b / (
        shard_b * min(smesh["tensor"], a.num_kv_heads))
    logits = rows * a.vocab_size * 4 / shard_b
    add("probe/generate", t.name, smesh, params=params, kv_cache=kv, activations=logits)
    teachers.append({"name": t.name, "path": t.path, "params_b": round(a.num_params() / 1e9, 2),
                     "engine": "jax", "probe_generations": P * s.num_samples})
  if cfg.student is not None:
    a = arch(cfg.student.path)
    c = cfg.sft
    tmesh, shard_w, shard_b = stage_mesh("sft.mesh", c.mesh, "training")
    pb = _bytes(c.param_dtype)
    n = a.num_params()
    rows = c.batch_size
    params = n * pb / shard_w
    opt = 2 * n * 4 / shard_w
    grads = n * pb / shard_w
    # saved activations per layer per token: ~ (residual, norms, q/k/v, attention out, MLP in/out)
    act = rows * c.seq_len * a.num_layers * (10 * a.hidden_size + 3 * a.intermediate_size) * \
        _bytes(c.compute_dtype) / shard_b
    act += rows * c.seq_len * a.vocab_size * 4 / shard_b / (1 if not c.loss_chunk else c.seq_len // c.loss_chunk)
    add("sft", cfg.student.name, tmesh, params=params, grads=grads, optimizer=opt, activations=act)
    sc = cfg.scoring
    cmesh, shard_w, shard_b = stage_mesh("scoring.mesh", sc.mesh, "training")
    add("score", cfg.student.name, cmesh, params=n * _bytes(sc.dtype) / shard_w,
        activations=sc.max_batch_size * min(sc.logits_chunk, sc.max_len) * a.vocab_size * 4 / shard_b)
  if cfg.scoring.quality == "reward_model" and cfg.scoring.reward_model:
    a = arch(cfg.scoring.reward_model)
    cmesh, shard_w, shard_b = stage_mesh("scoring.mesh", cfg.scoring.mesh, "training")
    add("score", "reward_model", cmesh, params=a.num_params() * _bytes(cfg.scoring.dtype) / shard_w,
        activations=cfg.scoring.batch_tokens * a.hidden_size * 4 * 4 / shard_b)
  if cfg.router.backbone:
    a = arch(cfg.router.backbone)
    n = a.num_params()
    rmesh, shard_w, shard_b = stage_mesh("router.mesh", cfg.router.mesh, "training")
    add("router", "router", rmesh, params=n * 4 / shard_w, optimizer=2 * n * 4 / shard_w,
        grads=n * 4 / shard_w,
        activations=cfg.router.batch_size * cfg.router.max_len * a.num_layers * 12 * a.hidden_size
        * _bytes(cfg.router.dtype) / shard_b)
  gens_rtg = k * P + max(0, N - P)
  out = {
      "run": cfg.name, "run_dir": cfg.out_dir, "devices": devices, "mesh": mesh,
      "device_memory_gb": round(mem / GB, 1) if mem else None,
      "prompts": {"total": N_all, "train": N, "probe": P, "eval": ev},
      "teachers": teachers, "student": cfg.student.name if cfg.student else None,
      "policies": list(cfg.compare),
      "generations": {"probe": k * P, "routed": max(0, N - P), "route_then_generate": gens_rtg,
                      "generate_then_select": k * N,
                      "per_teacher": "probe: %d each; routed: %d in all, split by the router"
                                     % (P, max(0, N - P))},
      "tokens": {"teacher_prompt": gens_rtg * prompt_toks, "teacher_response": gens_rtg * resp_toks,
                 "sft_per_policy_epoch": N * (prompt_toks + resp_toks)},
      "memory_per_device": stages, "fits": not problems, "problems": problems,
  }
  return out


def format_plan(p: dict) -> str:
  lines = [f"Plan for run {p['run']!r} -> {p['run_dir']}",
           f"  devices {p['devices']} mesh {p['mesh']} memory/device "
           f"{p['device_memory_gb'] or 'unknown'} GB",
           f"  prompts: {p['prompts']}", f"  policies: {', '.join(p['policies'])}",
           "  stages: probe -> score -> router -> route -> generate -> sft -> eval", "  teachers:"]
  for t in p["teachers"]:
    if t.get("engine") == "openai":
      lines.append(f"    {t['name']:<28} {'served':>9}  {t['url']} (engine openai: no device memory)")
    else:
      lines.append(f"    {t['name']:<28} {t['params_b']:>8.2f}B  {t['path']}")
  g = p["generations"]
  lines.append(f"  generations: probe {g['probe']}, routed {g['routed']}: Route then Generate "
               f"{g['route_then_generate']} vs Generate then Select {g['generate_then_select']}")
  lines.append(f"  tokens: {p['tokens']}")
  lines.append("  memory per device (GB):")
  for r in p["memory_per_device"]:
    parts = ", ".join(f"{k} {v}" for k, v in r.items()
                      if k not in ("stage", "model", "total_gb", "mesh"))
    m = "x".join(str(r["mesh"][a]) for a in AXES)
    lines.append(f"    {r['stage']:<15} {r['model']:<28} {r['total_gb']:>8.2f}  ({parts}; mesh {m})")
  lines.append("  fits: yes" if p["fits"] else "  DOES NOT FIT:\n    " + "\n    ".join(p["problems"]))
  return "\n".join(lines)
