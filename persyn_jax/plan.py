"""--dry-run: the plan of a run before any weights are present.

Stages, teachers, generations per teacher, the mesh, estimated tokens, and memory per device
(parameters, KV cache, optimizer state, activations) for each stage on that stage's own mesh
(`<stage>.mesh`, or the run's `mesh`); a plan that does not fit the devices' memory is refused,
naming the stage and the sizes. Teachers served by their own engine (`engine: openai`) take no
memory here. The config's other problems are persyn_jax.preflight's.

Layouts: the sampling stages use the SERVING layout (weights split over `tensor` only, kv heads
copied where `tensor` exceeds them, rows over data x fsdp: no FSDP gathers inside a decode loop);
the others the TRAINING layout (weights over fsdp x tensor, rows over data x fsdp). Each teacher
gets a serving plan (`serving_plan`): weights (int8 where it sets `quantize: int8`), KV cache,
rows per replica and the most rows a replica could hold; a teacher whose weights do not fit
split over `tensor` alone, or whose heads do not split over it, is refused by name, since the
only other way would gather weights inside decode. The planner knows no particular world:
architectures of models that have no config.json (the toy world's, before it is built) come in `architectures`.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax

from persyn_jax import zoo
from persyn_jax.models import as_dtype
from persyn_jax.models.config import ModelConfig
from persyn_jax.run_config import ModelRef, RunConfig
from persyn_jax.sampling.config import SamplingConfig
from persyn_jax.sharding import AXES, MeshConfig, kv_head_replicas

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


def host_memory() -> int:
  """This machine's physical memory in bytes (0 when the OS does not say)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 0


# SFT batch arrays per token held on the host: input ids, targets, loss mask, positions and
# segment ids, 4 bytes each (data/batches.py); the step takes grad_accum microbatches and the
# loader keeps PREFETCH more ready.
_SFT_BATCH_BYTES_PER_TOKEN = 5 * 4
_PREFETCH = 2


def _host_rows(cfg: RunConfig, n_train: int, prompt_toks: int, resp_toks: int) -> list[dict]:
  """Host memory per process of the stages that hold data in host RAM: (stage, setting, parts in
  bytes). Every host packs all SFT records (data.pipeline.sft_batches), so nothing here divides
  by the number of hosts."""
  c, s = cfg.sft, cfg.sampling
  batch = c.batch_size * c.seq_len * _SFT_BATCH_BYTES_PER_TOKEN
  sft = {"batches": batch * (c.grad_accum + _PREFETCH), "packing": batch,
         "tokenized": n_train * (prompt_toks + resp_toks) * 4 * 2}
  seq = prompt_toks + resp_toks
  gen = {"batches": s.batch_size * seq * 4 * 3 * _PREFETCH}
  return [{"stage": "sft", "setting": f"sft.batch_size={c.batch_size} (x sft.seq_len={c.seq_len}, "
                                      f"sft.grad_accum={c.grad_accum})", "parts": sft},
          {"stage": "probe/generate", "setting": f"sampling.batch_size={s.batch_size}",
           "parts": gen}]


def _layout(mesh: dict[str, int], layout: str) -> tuple[int, int]:
  """(ways the weights are split, ways the rows are split) of a stage's mesh and layout."""
  weights = mesh["tensor"] if layout == "serving" else mesh["fsdp"] * mesh["tensor"]
  return weights, mesh["data"] * mesh["fsdp"]


def _split(n: int, ways: int) -> int:
  """Ways a dimension of size n is split: the rule sets keep a dimension whole when the mesh
  axis does not divide it (sharding.logical_to_spec)."""
  return ways if n % ways == 0 else 1


def serving_plan(a: ModelConfig, ref: ModelRef, s: SamplingConfig, mesh: dict[str, int],
                 mem: float) -> tuple[dict, list[str]]:
  """One teacher on the sampling mesh under SERVING: bytes per device and rows per replica.

  Allocated sizes, not means: the cache holds max_prompt_len + max_new_tokens slots per row.
  Returns (plan, problems)."""
  t, replicas = mesh["tensor"], mesh["data"] * mesh["fsdp"]
  who = f"teacher {ref.name} ({ref.path})"
  D, N, K, H, F, V, L = (a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim,
                         a.intermediate_size, a.vocab_size, a.num_layers)
  try:
    copies = kv_head_replicas(N, K, t, what=who)
  except ValueError as e:
    return {"name": ref.name}, [f"{e} (sampling.mesh.tensor={t})"]
  K2 = K * copies
  wb = _bytes(ref.dtype)
  qb = 1 if ref.quantize == "int8" else wb
  # per layer, per device: q and o, the (copied) k and v, gate/up/down; int8 adds one scale per
  # output channel in the model's dtype
  attn = 2 * D * N * H / _split(N, t) + 2 * D * K2 * H / _split(K2, t)
  mlp = 3 * D * F / _split(F, t)
  scales = (N * H / _split(N, t) + 2 * K2 * H / _split(K2, t) + 2 * D + 2 * F / _split(F, t)) \
      if ref.quantize == "int8" else 0
  table = V * D * wb / _split(V, t) * (1 if a.tie_embeddings else 2)
  weights = L * ((attn + mlp) * qb + scales * wb + 2 * D * wb) + D * wb + table
  cb = wb if s.cache_dtype == "auto" else _bytes(s.cache_dtype)
  slots = s.max_prompt_len + s.max_new_tokens
  kv_row = 2 * L * slots * K2 / _split(K2, t) * H * cb
  logits_row = 2 * V * 4  # fp32 logits and the sampler's working copy, whole vocab
  rows = -(-s.batch_size // replicas)
  out = {"name": ref.name, "quantize": ref.quantize or None, "mesh": mesh, "replicas": replicas,
         "rows_per_replica": rows, "kv_head_copies": copies, "weights": weights,
         "kv_cache": rows * kv_row, "activations": rows * logits_row, "gathers_in_decode": 0,
         "max_rows_per_replica": max(0, int((mem - weights) // (kv_row + logits_row))) if mem else None}
  problems = []
  if mem and weights > mem:
    int8 = "" if ref.quantize else " or set `quantize: int8` on it"
    fsdp = (f"; fsdp={mesh['fsdp']} adds replicas, it does not split weights"
            if mesh["fsdp"] > 1 else "")
    problems.append(f"{who}: its weights need {weights / GB:.1f} GB per device split over "
                    f"tensor={t}, but a device has {mem / GB:.1f} GB; fitting them otherwise would "
                    f"gather weights inside decode: raise `tensor` (sampling.mesh or the "
                    f"teacher's own mesh){int8}{fsdp}")
  return out, problems


def suggest_tensor(a: ModelConfig, ref: ModelRef, s: SamplingConfig, devices: int,
                   mem: float) -> int | None:
  """The smallest `tensor` (a power of two dividing the devices) whose serving plan of `ref`
  fits, with fsdp 1 and the rest of the devices as data replicas; None if none does."""
  t = 1
  while t <= devices:
    if devices % t == 0:
      sp, bad = serving_plan(a, ref, s, {"data": devices // t, "fsdp": 1, "tensor": t}, mem)
      if not bad and sp["weights"] + sp["kv_cache"] + sp["activations"] <= mem:
        return t
    t *= 2
  return None


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

  teachers, serving = [], []
  smesh, _, _ = stage_mesh("sampling.mesh", s.mesh, "serving")
  for t in cfg.teachers:
    if t.served:  # answered by its own server: no memory on this run's devices
      teachers.append({"name": t.name, "path": t.path, "params_b": None, "engine": "openai",
                       "url": t.openai.url, "probe_generations": P * s.num_samples})
      continue
    a = arch(t.path)
    tmesh = smesh if t.mesh is None else _mesh(t.mesh, devices, f"teachers[{t.name}].mesh")
    sp, bad = serving_plan(a, t, s, tmesh, mem)
    problems.extend(bad)
    if bad or (mem and sp["weights"] + sp["kv_cache"] + sp["activations"] > mem):
      hint = suggest_tensor(a, t, s, devices, mem)
      if hint:
        problems.append(f"teacher {t.name}: it fits with `mesh: {{data: {devices // hint}, fsdp: 1, "
                        f"tensor: {hint}}}` on this teacher")
    if "weights" in sp:
      add("probe/generate", t.name, tmesh, params=sp["weights"], kv_cache=sp["kv_cache"],
          activations=sp["activations"])
      serving.append({k2: round(v / GB, 3) if k2 in ("weights", "kv_cache", "activations") else v
                      for k2, v in sp.items()})
    teachers.append({"name": t.name, "path": t.path, "params_b": round(a.num_params() / 1e9, 2),
                     "quantize": t.quantize or None, "engine": "jax",
                     "probe_generations": P * s.num_samples})
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
  host_mem = int(cfg.plan.host_memory_gb * GB) or host_memory()
  host = []
  for r in _host_rows(cfg, N, prompt_toks, resp_toks):
    total = sum(r["parts"].values())
    host.append({"stage": r["stage"], **{k2: round(v / GB, 3) for k2, v in r["parts"].items()},
                 "total_gb": round(total / GB, 3)})
    if host_mem and total > host_mem:
      big = max(r["parts"], key=r["parts"].get)
      setting = r["setting"] if big != "tokenized" else f"{N} training prompts"
      problems.append(f"{setting}: {r['stage']} needs {total / GB:.1f} GB of host memory per "
                      f"process ({', '.join(f'{k2} {v / GB:.1f}' for k2, v in r['parts'].items())}"
                      f"), but a host has {host_mem / GB:.1f} GB")
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
      "serving": serving, "memory_per_device": stages,
      "host_memory_gb": round(host_mem / GB, 1) if host_mem else None,
      "memory_per_host": host, "fits": not problems, "problems": problems,
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
  if p.get("serving"):
    lines.append("  sampling (serving layout; GB per device):")
    for v in p["serving"]:
      m = "x".join(str(v["mesh"][a]) for a in AXES)
      lines.append(f"    {v['name']:<28} mesh {m} replicas {v['replicas']} rows/replica "
                   f"{v['rows_per_replica']} (max {v['max_rows_per_replica']}) weights "
                   f"{v['weights']}{' int8' if v['quantize'] else ''} kv {v['kv_cache']} "
                   f"kv copies {v['kv_head_copies']} gathers in decode {v['gathers_in_decode']}")
  lines.append("  memory per device (GB):")
  for r in p["memory_per_device"]:
    parts = ", ".join(f"{k} {v}" for k, v in r.items()
                      if k not in ("stage", "model", "total_gb", "mesh"))
    m = "x".join(str(r["mesh"][a]) for a in AXES)
    lines.append(f"    {r['stage']:<15} {r['model']:<28} {r['total_gb']:>8.2f}  ({parts}; mesh {m})")
  lines.append(f"  host memory per process (GB; a host has {p.get('host_memory_gb') or 'unknown'}):")
  for r in p.get("memory_per_host", []):
    parts = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("stage", "total_gb"))
    lines.append(f"    {r['stage']:<15} {r['total_gb']:>8.2f}  ({parts})")
  lines.append("  fits: yes" if p["fits"] else "  DOES NOT FIT:\n    " + "\n    ".join(p["problems"]))
  return "\n".join(lines)
