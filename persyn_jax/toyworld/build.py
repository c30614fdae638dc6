"""The embedded world's builder: PerSyn end to end on a laptop CPU, built offline in minutes.

A task with checkable answers (arithmetic word problems of four kinds, tasks.py), a
tokenizer trained here, four teachers of different sizes and families each trained by our own SFT
on one answer style, and a student smaller than every teacher whose prior ("pretraining") is
generic (every style equally, tasks.student_prior). Each teacher's greedy accuracy per kind is
then measured on held-out problems and checked against its design (check.py). Everything is saved as HF-layout checkpoints, so the run uses the real
loading path, and cached under ~/.cache/persyn_jax/toyworld/<key>/ (or $PERSYN_JAX_CACHE).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

import jax
import numpy as np

from persyn_jax import fs
from persyn_jax import sharding as shd
from persyn_jax.io_utils import atomic_write_json, atomic_write_text, sha256_file
from persyn_jax.models import build_model, save_pretrained
from persyn_jax.tokenizer import train_tokenizer
from persyn_jax.toyworld import tasks
from persyn_jax.toyworld.specs import (SCALES, TOKENIZER_VOCAB, WORLD_VERSION, Scale, Spec,
                                       model_config)

@dataclasses.dataclass(frozen=True)
class World:
  root: str
  prompts_path: str
  teachers: tuple[tuple[str, str, str], ...]  # (name, path, family)
  student: tuple[str, str, str]
  probe: int
  eval: int
  info: dict


def cache_root(cache_dir: str = "") -> str:
  base = cache_dir or os.environ.get("PERSYN_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "persyn_jax")
  return fs.join(base, "toyworld")


def world_key(scale: str, seed: int) -> str:
  blob = json.dumps([WORLD_VERSION, scale, seed, dataclasses.asdict(SCALES[scale])], sort_keys=True)
  return f"{scale}-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _train(spec: Spec, style, scale: Scale, tok, problems, out_dir: str, seed: int, mesh, log) -> str:
  """Trains one model of the world with our SFT and saves it in HF layout; returns its path."""
  from persyn_jax import sft
  from persyn_jax.data.chat import pair_ids_batch
  from persyn_jax.data.batches import pack

  rng = random.Random(seed)
  records = [{"id": p["id"], "prompt": p["prompt"], "response": style(p, rng)} for p in problems]
  cfg = model_config(spec, len(tok), tok)
  model = build_model(cfg, dtype="float32", seed=seed)
  model = shd.shard_model(model, mesh)
  sft_cfg = sft.SFTConfig(lr=scale.lr, schedule="cosine", warmup_steps=max(1, spec.steps // 20),
                          batch_size=scale.batch, seq_len=scale.seq_len, max_steps=spec.steps,
                          compute_dtype="float32", param_dtype="float32", weight_decay=0.0,
                          checkpoint_every=10**9, keep_checkpoints=1, async_checkpoint=False,
                          log_every=max(1, spec.steps // 10), tensorboard=False, export=False,
                          seed=seed, progress=True)

  # Tokenized once (the chat template is the slow part), packed anew each epoch in a seeded order.
  pairs = pair_ids_batch(tok, [r["prompt"] for r in records], [r["response"] for r in records])
  examples = [(np.asarray(i, np.int32), np.asarray(m, np.int8)) for i, m in pairs]

  def batches(start):
    epoch, step = 0, 0
    while True:
      order = np.random.default_rng([seed, epoch]).permutation(len(examples))
      for b in pack([examples[i] for i in order], scale.batch, scale.seq_len):
        if step >= start:
          yield b
        step += 1
      epoch += 1

  work = out_dir + ".train"
  shutil.rmtree(work, ignore_errors=True)
  log(f"[toyworld] training {spec.name} ({spec.style}, {spec.model_type}, "
        f"{cfg.num_params() / 1e6:.2f}M params, {spec.steps} steps)")
  result = sft.train(model, tok, batches, sft_cfg, out_dir=work, mesh=mesh)
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  save_pretrained(result.model, tok, tmp, dtype="float32")
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  shutil.rmtree(work, ignore_errors=True)
  return out_dir


def build(scale: str = "default", seed: int = 0, cache_dir: str = "", *, force: bool = False,
          log=print) -> World:
  """Builds the world (or loads it from the cache). Deterministic: same seed, same checkpoints.
  Safe to call from several processes at once (a lock file beside the world); in a multi-process
  jax job the world is built by a one-process subprocess on CPU."""
  if scale not in SCALES:
    raise ValueError(f"toy world scale {scale!r}: one of {sorted(SCALES)}")
  root = fs.join(cache_root(cache_dir), world_key(scale, seed))
  if fs.is_remote(root):
    return _remote_world(root, scale, seed, force, log)
  info_path = os.path.join(root, "world.json")
  if os.path.exists(info_path) and not force:
    log(f"[toyworld] using the cached world at {root}")
    return _world(root, json.load(open(info_path)))
  with _build_lock(root):  # processes sharing the cache: one builds, the others wait, then load
    if os.path.exists(info_path) and not force:
      log(f"[toyworld] using the world just built at {root}")
      return _world(root, json.load(open(info_path)))
    if jax.process_count() > 1:
      _build_in_subprocess(scale, seed, cache_dir, force, root, log)
      return _world(root, json.load(open(info_path)))
    return _build(scale, seed, root, log)


def _remote_world(root: str, scale: str, seed: int, force: bool, log) -> World:
  """A world cached on gs://: built in this machine's working directory for it and uploaded,
  world.json last (naming the uploaded paths), so that a world whose upload was cut short is
  built again; its models and prompts are then read by their gs:// paths (copied locally)."""
  info_path = fs.join(root, "world.json")
  if fs.exists(info_path) and not force:
    log(f"[toyworld] using the cached world at {root}")
    return _world(root, json.loads(fs.read_bytes(info_path)))
  world = upload_world(build(scale, seed, fs.work_dir(root), force=force, log=log), root)
  log(f"[toyworld] uploaded the world to {root}")
  return world


def upload_world(local: World, root: str) -> World:
  """Copies a built world to the remote directory `root`, world.json last (its paths now naming
  the remote copies); returns the remote world."""
  for name in sorted(os.listdir(local.root)):
    if name != "world.json":
      fs.put(os.path.join(local.root, name), fs.join(root, name))
  info = json.loads(json.dumps(local.info).replace(json.dumps(local.root)[1:-1], root))
  atomic_write_json(fs.join(root, "world.json"), info)
  return _world(root, info)


LOCK_HELD = "PERSYN_JAX_TOYWORLD_LOCK_HELD"


@contextlib.contextmanager
def _build_lock(root: str):
  """An exclusive lock on `<root>.lock` (fcntl: also between hosts on an NFS share)."""
  if os.environ.get(LOCK_HELD) == root:  # the build subprocess of the process holding it
    yield
    return
  os.makedirs(os.path.dirname(root), exist_ok=True)
  with open(root + ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _build_in_subprocess(scale: str, seed: int, cache_dir: str, force: bool, root: str, log) -> None:
  """One process of a multi-process job: the world is built by a one-process CPU job of its own
  (building trains models, and their checkpoints would otherwise be collective over every
  process, which are not building). The same world as a one-process build: it is deterministic
  on CPU."""
  log(f"[toyworld] process {jax.process_index()}: building the {scale} world at {root} in a "
      "one-process CPU subprocess (the other processes wait for it)")
  # one CPU device, as in a plain one-process run: a forced host device count changes XLA:CPU's
  # thread partitioning, and with it the float round-off of the training
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  env = dict(os.environ, PERSYN_JAX_DISTRIBUTED="0", JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
             **{LOCK_HELD: root})
  code = ("import sys; from persyn_jax.toyworld.build import build; "
          "build(sys.argv[1], int(sys.argv[2]), sys.argv[3], force=sys.argv[4] == '1')")
  proc = subprocess.run([sys.executable, "-c", code, scale, str(seed), cache_dir,
                         "1" if force else "0"], env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"building the toy world at {root} failed (exit code {proc.returncode}; "
                       "its output is above)")


def _build(scale: str, seed: int, root: str, log) -> World:
  sc = SCALES[scale]
  info_path = os.path.join(root, "world.json")
  log(f"[toyworld] building the {scale} world at {root} (cached for later runs)")
  t0 = time.time()
  os.makedirs(root, exist_ok=True)
  # The run's prompts and the models' training problems never overlap.
  run_problems = tasks.make_problems(sc.prompts, seed)
  run_ids = {p["prompt"] for p in run_problems}
  pool = tasks.make_problems(sc.train_problems + sc.prompts, seed + 1)
  train_problems = [p for p in pool if p["prompt"] not in run_ids][:sc.train_problems]
  # The check's problems are new to every model of the world, like the run's held-out prompts.
  seen = run_ids | {p["prompt"] for p in train_problems}
  n_check = sc.check * len(tasks.KINDS)
  check_problems = [p for p in tasks.make_problems(n_check + len(seen), seed + 2)
                    if p["prompt"] not in seen][:n_check]
  lines = [json.dumps({"id": p["id"], "prompt": p["prompt"], "reference": p["answer"],
                       "kind": p["kind"]}) for p in run_problems]
  prompts_path = os.path.join(root, "prompts.jsonl")
  atomic_write_text(prompts_path, "\n".join(lines) + "\n")

  tok_dir = os.path.join(root, "tokenizer")
  tok = train_tokenizer(tasks.corpus_texts(train_problems + run_problems, seed),
                        vocab_size=TOKENIZER_VOCAB)
  tok.save_pretrained(tok_dir)
  # One device, whatever this machine has: the checkpoints do not depend on the device count.
  mesh = shd.single_device_mesh()
  hashes, teachers, measured = {}, [], {}
  for i, spec in enumerate(sc.teachers):
    path = _train(spec, tasks.STYLES[spec.style], sc, tok, train_problems,
                  os.path.join(root, "teachers", spec.name), seed * 100 + i, mesh, log)
    hashes[spec.name] = sha256_file(os.path.join(path, "model.safetensors"))
    teachers.append({"name": spec.name, "path": path, "family": spec.model_type,
                     "style": spec.style, "params": model_config(spec, len(tok), tok).num_params()})
    measured[spec.name] = _measure(spec.name, path, check_problems, mesh, log)
    _check_teacher(sc, spec, measured[spec.name], root, sc.teachers[i + 1:])
  st = sc.student
  spath = _train(st, tasks.student_prior, sc, tok, train_problems[: len(train_problems) // 2],
                 os.path.join(root, "student"), seed * 100 + 99, mesh, log)
  hashes[st.name] = sha256_file(os.path.join(spath, "model.safetensors"))
  accuracy = _accuracy(sc, measured, _measure("student", spath, check_problems, mesh, log))
  info = {"version": WORLD_VERSION, "scale": scale, "seed": seed, "teachers": teachers,
          "student": {"name": st.name, "path": spath, "family": st.model_type,
                      "params": model_config(st, len(tok), tok).num_params(),
                      "prior": tasks.STUDENT_PRIOR},
          "prompts": prompts_path, "probe": sc.probe, "eval": sc.eval, "hashes": hashes,
          "accuracy": accuracy,
          "build_seconds": round(time.time() - t0, 1)}
  atomic_write_json(info_path, info)
  return _world(root, info)


def _measure(name: str, path: str, problems: list[dict], mesh, log) -> dict:
  """{kind: greedy accuracy} of the model at `path` on `problems` ({} with no problems)."""
  if not problems:
    return {}
  from persyn_jax.toyworld import check
  accuracy, _ = check.measure(path, problems, mesh)
  log(f"[toyworld] {name}: greedy accuracy per kind {accuracy}")
  return accuracy


def _accuracy(sc: Scale, measured: dict, student: dict) -> dict:
  """world.json's record: the teachers' measured accuracy per kind beside their design (each was
  held to it by _check_teacher as it was trained), and the student's."""
  from persyn_jax.toyworld import check
  return {"problems_per_kind": sc.check, "tolerance": sc.tolerance,
          "designed": check.designed_for(sc.teachers), "measured": measured, "student": student}


def _check_teacher(sc: Scale, spec, measured: dict, root: str, untrained) -> None:
  """Raises check.WorldCheckError as soon as one teacher is further from its design than
  sc.tolerance, before the rest are trained (world.json, written last, is then never written and
  the world never cached)."""
  from persyn_jax.toyworld import check
  if sc.tolerance > 0:
    rest = (f" (the build stops at {spec.name}: {', '.join(t.name for t in untrained)} not "
            "trained)") if untrained else ""
    check.check_accuracy({spec.name: measured}, check.designed_for([spec]), sc.tolerance,
                         where=root + rest)


def _world(root: str, info: dict) -> World:
  return World(root=root, prompts_path=info["prompts"],
               teachers=tuple((t["name"], t["path"], t["family"]) for t in info["teachers"]),
               student=(info["student"]["name"], info["student"]["path"], info["student"]["family"]),
               probe=info["probe"], eval=info["eval"], info=info)
