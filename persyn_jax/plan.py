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
only other way would gather weights inside decode. Weights are counted parameter by parameter
(biases and extra norms included), each split only over the mesh axes that divide it, as
sharding.logical_to_spec places it. Rows per device: the sampler, scoring and router pad their
batches to a multiple of data x fsdp; SFT pads none, so its rows split only over the batch axes
that divide sft.batch_size (the other axes hold copies). The planner knows no particular world:
architectures of models that have no config.json (the toy world's, before it is built) come in `architectures`.
"""
from __future__ import annotations

import math
import os
import types
from typing import Mapping

import jax

from persyn_jax import zoo
from persyn_jax.models import as_dtype
from persyn_jax.models.config import ModelConfig
from persyn_jax.run_config import ModelRef, RunConfig
from persyn_jax.sampling.config import SamplingConfig
from persyn_jax.runtime.buckets import bucket_lengths
from persyn_jax.sharding import (AXES, SERVING, TRAINING, MeshConfig, Rules, kv_head_replicas,
                                 logical_to_spec)

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


def _split(n: int, ways: int) -> int:
  """Ways a dimension of size n is split: the rule sets keep a dimension whole when the mesh
  axis does not divide it (sharding.logical_to_spec)."""
  return ways if n % ways == 0 else 1


def _ways(shape: tuple[int, ...], axes: tuple[str, ...], mesh: dict[str, int], rules: Rules) -> int:
  """Devices an array of `shape` with logical `axes` is split over by `rules` on `mesh` (the
  placement's own rule: sharding.logical_to_spec, a mesh axis only where it divides)."""
  spec = logical_to_spec(axes, shape, types.SimpleNamespace(shape=mesh), rules=rules)
  used = [a for e in spec if e for a in ((e,) if isinstance(e, str) else e)]
  return math.prod(mesh[a] for a in used)


def _tensors(a: ModelConfig, *, head: str = "lm") -> list[tuple[tuple, tuple, tuple | None]]:
  """Every parameter of `a` as the model holds it (models/transformer.py, models/layers.py):
  (shape, logical axes, int8 scale) where the scale, (shape, axes) of one value per output
  channel, is given for the seven decoder projections (models/quant.py) and None otherwise.
  head: "lm" (the LM head, unless tied) or "score" (a reward model's [D, num_labels] head)."""
  D, N, K, H, F, V, L = (a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim,
                         a.intermediate_size, a.vocab_size, a.num_layers)

  def lay(shape, axes, out=None):  # stacked over the layers; `out`: a projection's output dims
    scale = None if out is None else ((L,) + tuple(shape[i] for i in out),
                                      ("layers",) + tuple(axes[i] for i in out))
    return (L,) + shape, ("layers",) + axes, scale

  qh, kvh = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
  out = [((V, D), ("vocab", "embed"), None), ((D,), ("norm",), None),  # embedding, final norm
         lay((D, N, H), qh, (1, 2)), lay((D, K, H), kvh, (1, 2)), lay((D, K, H), kvh, (1, 2)),
         lay((N, H, D), ("heads", "head_dim", "embed"), (2,)),
         lay((D, F), ("embed", "mlp"), (1,)), lay((D, F), ("embed", "mlp"), (1,)),
         lay((F, D), ("mlp", "embed"), (1,))]
  out += [lay((D,), ("norm",))] * (4 if a.post_norms else 2)
  if a.qkv_bias:
    out += [lay((N, H), qh[1:]), lay((K, H), kvh[1:]), lay((K, H), kvh[1:])]
  if a.o_bias:
    out.append(lay((D,), ("embed",)))
  if a.qk_norm:
    out += [lay((H,), ("norm",))] * 2
  if a.mlp_bias:
    out += [lay((F,), ("mlp",)), lay((F,), ("mlp",)), lay((D,), ("embed",))]
  if head == "score":
    out.append(((D, a.num_labels), ("embed", "labels"), None))
  elif not a.tie_embeddings:
    out.append(((D, V), ("embed", "vocab"), None))
  return out


def weight_bytes(a: ModelConfig, mesh: dict[str, int], rules: Rules, nbytes: float, *,
                 int8: bool = False, head: str = "lm") -> float:
  """Bytes per device of `a`'s parameters placed by `rules` on `mesh`, `nbytes` per value; with
  int8, the decoder projections take 1 byte per value plus their scales in `nbytes`."""
  total = 0.0
  for shape, axes, scale in _tensors(a, head=head):
    n = math.prod(shape) / _ways(shape, axes, mesh, rules)
    if int8 and scale is not None:
      total += n + math.prod(scale[0]) / _ways(*scale, mesh, rules) * nbytes
    else:
      total += n * nbytes
  return total


def num_params(a: ModelConfig, *, head: str = "lm") -> int:
  """Every parameter of `a`, biases and extra norms included."""
  return sum(math.prod(shape) for shape, _, _ in _tensors(a, head=head))


def _rows(n: int, mesh: dict[str, int], *, padded: bool) -> float:
  """Rows per device of a batch of n rows over the mesh's batch axes (data x fsdp): padded to a
  multiple of them (the runner's and the router's batches), or, unpadded (SFT's), split only over
  the axes that divide n (the others hold copies)."""
  if padded:
    return -(-n // (mesh["data"] * mesh["fsdp"]))
  return n / _ways((n,), ("batch",), mesh, TRAINING)


def _score_rows(sc, mesh: dict[str, int], cap: int | None = None) -> tuple[int, int]:
  """(rows, tokens) per device of the scoring batch with the most tokens (each row's first `cap`
  of them, when given): runtime.buckets.plan_batches makes a bucket's batches batch_tokens //
  length rows, clipped to [shards, max_batch_size] and a multiple of the shards (data x fsdp)."""
  m = mesh["data"] * mesh["fsdp"]
  best = (0, 0)
  for length in bucket_lengths(sc.max_len, sc.min_bucket):
    rows = max(m, min(sc.max_batch_size, sc.batch_tokens // length) // m * m) // m
    best = max(best, (rows * min(length, cap or length), rows))
  return best[1], best[0]


def serving_plan(a: ModelConfig, ref: ModelRef, s: SamplingConfig, mesh: dict[str, int],
                 mem: float) -> tuple[dict, list[str]]:
  """One teacher on the sampling mesh under SERVING: bytes per device and rows per replica.

  Allocated sizes, not means: the cache holds max_prompt_len + max_new_tokens slots per row.
  Returns (plan, problems)."""
  t, replicas = mesh["tensor"], mesh["data"] * mesh["fsdp"]
  who = f"teacher {ref.name} ({ref.path})"
  N, K, H, V, L = a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size, a.num_layers
  try:
    copies = kv_head_replicas(N, K, t, what=who)
  except ValueError as e:
    return {"name": ref.name}, [f"{e} (sampling.mesh.tensor={t})"]
  K2 = K * copies
  wb = _bytes(ref.dtype)
  # the weights as loaded (kv heads copied, models/loading.serving_layout), placed by SERVING;
  # int8 keeps the projections in 1 byte plus one scale per output channel in the model's dtype
  weights = weight_bytes(a.replace(num_kv_heads=K2), mesh, SERVING, wb,
                         int8=ref.quantize == "int8")
  cb = wb if s.cache_dtype == "auto" else _bytes(s.cache_dtype)
  slots = s.max_prompt_len + s.max_new_tokens
  # per row: k and v [L, slots, K2, H] split over tensor, and the cache's int32 segment ids
  kv_row = 2 * L * slots * K2 / _split(K2, t) * H * cb + slots * 4
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

  def stage_mesh(field: str, mc: MeshConfig | None) -> dict[str, int]:
    return mesh if mc is None else _mesh(mc, devices, field)

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

  def add(stage, model, stage_mesh_, rows=None, **m):
    total = sum(m.values())
    row = {"stage": stage, "model": model, "mesh": stage_mesh_, "rows_per_device": rows,
           **{k2: round(v / GB, 3) for k2, v in m.items()}, "total_gb": round(total / GB, 3)}
    stages.append(row)
    if mem and total > mem:
      problems.append(f"{stage} ({model}): needs {total / GB:.1f} GB per device "
                      f"({', '.join(f'{k2} {v / GB:.1f}' for k2, v in m.items())}), "
                      f"but a device has {mem / GB:.1f} GB")

  teachers, serving = [], []
  smesh = stage_mesh("sampling.mesh", s.mesh)
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
      add("probe/generate", t.name, tmesh, sp["rows_per_replica"], params=sp["weights"],
          kv_cache=sp["kv_cache"], activations=sp["activations"])
      serving.append({k2: round(v / GB, 3) if k2 in ("weights", "kv_cache", "activations") else v
                      for k2, v in sp.items()})
    teachers.append({"name": t.name, "path": t.path, "params_b": round(num_params(a) / 1e9, 2),
                     "quantize": t.quantize or None, "engine": "jax",
                     "probe_generations": P * s.num_samples})
  if cfg.student is not None:
    a = arch(cfg.student.path)
    c = cfg.sft
    tmesh = stage_mesh("sft.mesh", c.mesh)
    pb = _bytes(c.param_dtype)
    n = weight_bytes(a, tmesh, TRAINING, 1)  # parameters per device, as placed by TRAINING
    # SFT does not pad its rows: they split over the batch axes that divide sft.batch_size
    rows = _rows(c.batch_size, tmesh, padded=False)
    # AdamW's two moments take the parameters' dtype (optax); grad_accum > 1 adds the step's
    # fp32 accumulator (training/step.py) to one microbatch's gradients
    grads = n * pb + (n * 4 if c.grad_accum > 1 else 0)
    # saved activations per layer per token: ~ (residual, norms, q/k/v, attention out, MLP in/out)
    act = rows * c.seq_len * a.num_layers * (10 * a.hidden_size + 3 * a.intermediate_size) * \
        _bytes(c.compute_dtype)
    act += rows * min(c.loss_chunk or c.seq_len, c.seq_len) * a.vocab_size * 4
    add("sft", cfg.student.name, tmesh, rows, params=n * pb, grads=grads, optimizer=2 * n * pb,
        activations=act)
    sc = cfg.scoring
    cmesh = stage_mesh("scoring.mesh", sc.mesh)
    rows, tokens = _score_rows(sc, cmesh, sc.logits_chunk)  # [rows, chunk, V] fp32 logits
    add("score", cfg.student.name, cmesh, rows,
        params=weight_bytes(a, cmesh, TRAINING, _bytes(sc.dtype)),
        activations=tokens * a.vocab_size * 4)
  if cfg.scoring.quality == "reward_model" and cfg.scoring.reward_model:
    a = arch(cfg.scoring.reward_model)
    sc = cfg.scoring
    cmesh = stage_mesh("scoring.mesh", sc.mesh)
    rows, tokens = _score_rows(sc, cmesh)
    add("score", "reward_model", cmesh, rows,
        params=weight_bytes(a, cmesh, TRAINING, _bytes(sc.dtype), head="score"),
        activations=tokens * a.hidden_size * 4 * 4)
  if cfg.router.backbone:
    a = arch(cfg.router.backbone)
    r = cfg.router
    rmesh = stage_mesh("router.mesh", r.mesh)
    pb = _bytes(r.param_dtype)
    n = weight_bytes(a, rmesh, TRAINING, 1)
    rows = _rows(r.batch_size, rmesh, padded=True)  # router_train pads rows to the batch shards
    add("router", "router", rmesh, rows, params=n * pb, optimizer=2 * n * pb, grads=n * pb,
        activations=rows * r.max_len * a.num_layers * 12 * a.hidden_size * _bytes(r.dtype))
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
                      if k not in ("stage", "model", "total_gb", "mesh", "rows_per_device"))
    m = "x".join(str(r["mesh"][a]) for a in AXES)
    rows = "" if r.get("rows_per_device") is None else f", rows/device {r['rows_per_device']:g}"
    lines.append(f"    {r['stage']:<15} {r['model']:<28} {r['total_gb']:>8.2f}  ({parts}; mesh {m}"
                 f"{rows})")
  lines.append(f"  host memory per process (GB; a host has {p.get('host_memory_gb') or 'unknown'}):")
  for r in p.get("memory_per_host", []):
    parts = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("stage", "total_gb"))
    lines.append(f"    {r['stage']:<15} {r['total_gb']:>8.2f}  ({parts})")
  lines.append("  fits: yes" if p["fits"] else "  DOES NOT FIT:\n    " + "\n    ".join(p["problems"]))
  return "\n".join(lines)
