"""The router (PerSyn, arXiv 2510.10925): a decoder backbone plus a linear coefficient head, one output per
teacher, read at a token appended to the prompt; each prompt goes to argmax_m pi(x)_m.

    router = Router.from_backbone("qwen2.5-1.5b_dir", teachers, RouterConfig(), mesh=mesh)
    router, report = train_router(router, prompts, rewards)        # router_train.py
    names, scores = router.route(prompts)                           # batched, sharded
    router.save("run/router"); Router.load("run/router", mesh=mesh)  # checkpoints.save_tree

Pairs, the Bradley-Terry loss and the metrics (pairwise accuracy, Hit@1/Hit@3 against the oracle,
assignment shares) are pure functions here too.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persyn_jax import config as cfglib
from persyn_jax import fs
from persyn_jax import models
from persyn_jax import sharding as shd
from persyn_jax.checkpoints import abstract, restore_tree, save_tree
from persyn_jax.data import chat
from persyn_jax.io_utils import atomic_write_json
from persyn_jax.models.hf import config_from_hf, config_to_hf, read_json
from persyn_jax.models.transformer import Transformer, pool_last, positions_from_segments
from persyn_jax.runtime.buckets import bucket_lengths, pad_rows, plan_batches
from persyn_jax.runtime.runner import Runner


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """The router stage. The paper publishes the backbone (Qwen2.5-1.5B) and the loss; the other
  values are our defaults (README: router)."""

  backbone: str = ""  # HF directory of a decoder (any supported architecture)
  pooling: Literal["appended_token", "last_token"] = "appended_token"
  appended_token: str = "<|route|>"  # an existing token is reused; a new one gets its own row
  chat_template: bool = True  # the prompt as the backbone's chat template lays it out
  system: str | None = None
  max_len: int = 1024  # prompt tokens (incl. the appended token); longer prompts keep their tail
  freeze_backbone: bool = False  # True: train the coefficient head only
  lr: float = 1e-5  # backbone (AdamW, warmup then cosine decay)
  head_lr: float = 1e-4  # coefficient head (starts from near zero, so it may move faster)
  weight_decay: float = 0.01
  warmup_ratio: float = 0.05
  grad_clip: float = 1.0
  batch_size: int = 16  # probe prompts per step (with all their teacher pairs)
  epochs: int = 3
  held_out_fraction: float = 0.1  # of probe prompts, for early stopping and the report
  evals_per_epoch: int = 4
  patience: int = 3  # evaluations without a held-out loss improvement before stopping
  min_delta: float = 1e-4
  tie_tolerance: float = 1e-6  # reward differences at most this are ties (dropped)
  seed: int = 0
  dtype: str = "bfloat16"  # compute
  param_dtype: str = "float32"  # trained weights and the checkpoint
  batch_tokens: int = 32768  # route(): padded tokens per batch
  max_batch_size: int = 256
  min_bucket: int = 64
  mesh: shd.MeshConfig | None = None  # the router stage's own mesh; None = the run's mesh

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      cfglib.check_dtype(getattr(self, name), f"router.{name}")
    if self.pooling not in ("appended_token", "last_token"):
      raise ValueError(f"router.pooling={self.pooling!r}: expected appended_token or last_token")
    if not 0.0 <= self.held_out_fraction < 1.0:
      raise ValueError(f"router.held_out_fraction={self.held_out_fraction}: must be in [0, 1)")
    for name in ("max_len", "batch_size", "epochs", "evals_per_epoch", "batch_tokens",
                 "max_batch_size", "min_bucket"):
      if getattr(self, name) < 1:
        raise ValueError(f"router.{name}={getattr(self, name)}: must be >= 1")
    # optimizer and pair numbers: a NaN lr trains the router to NaN scores (route() then sends
    # every prompt to the first teacher), a negative tie_tolerance labels each pair both ways
    if not (math.isfinite(self.head_lr) and self.head_lr > 0):
      raise ValueError(f"router.head_lr={self.head_lr}: must be a finite number > 0")
    for name in ("lr", "weight_decay", "grad_clip", "min_delta", "tie_tolerance"):
      v = getattr(self, name)
      if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"router.{name}={v}: must be a finite number >= 0")
    if not 0.0 <= self.warmup_ratio < 1.0:
      raise ValueError(f"router.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
    if self.patience < 1:
      raise ValueError(f"router.patience={self.patience}: must be >= 1")
    if self.seed < 0:  # numpy's RNG would refuse it in router training, after the probe
      raise ValueError(f"router.seed={self.seed}: must be >= 0")
    if self.pooling == "appended_token" and not self.appended_token:
      raise ValueError("router.appended_token is empty (pooling = appended_token needs one)")


class CoefficientHead(nnx.Module):
  def __init__(self, hidden: int, k: int, *, rngs: nnx.Rngs, param_dtype):
    self.w = nnx.Param(0.02 * jax.random.normal(rngs.params(), (hidden, k), param_dtype),
                       logical_axes=("embed", "labels"))
    self.b = nnx.Param(jnp.zeros((k,), param_dtype), logical_axes=("labels",))

  def __call__(self, x):
    return x @ self.w[...].astype(jnp.float32) + self.b[...].astype(jnp.float32)


class RouterModel(nnx.Module):
  """Backbone + coefficient head: [B, T] prompt ids -> [B, k] fp32 coefficients pi(x), read at the
  last token of each row (the appended token, or the prompt's last token)."""

  def __init__(self, backbone: Transformer, num_teachers: int, *, rngs: nnx.Rngs, param_dtype):
    self.backbone = backbone
    self.head = CoefficientHead(backbone.cfg.hidden_size, num_teachers, rngs=rngs,
                                param_dtype=param_dtype)

  def __call__(self, input_ids, segment_ids):
    h, _ = self.backbone(input_ids, positions=positions_from_segments(segment_ids),
                         segment_ids=segment_ids)
    return self.head(pool_last(h, segment_ids).astype(jnp.float32))


def router_forward(model: RouterModel, input_ids, segment_ids):
  return model(input_ids, segment_ids)


# ---------------------------------------------------------------------------------------------
# pairs, loss, metrics (pure)

def build_pairs(rewards: np.ndarray, tie_tolerance: float = 1e-6) -> tuple[np.ndarray, dict]:
  """All teacher pairs of each prompt labelled by the higher combined reward (the paper's Eq. 3).

  Returns wins [P, K, K] (wins[p, i, j] = 1: teacher i beat j on prompt p) and counts: candidate
  pairs (both scored), kept pairs, ties dropped, pairs with a missing score.
  """
  r = np.asarray(rewards, np.float64)
  P, K = r.shape
  ok = ~np.isnan(r)
  both = ok[:, :, None] & ok[:, None, :]
  diff = np.where(both, r[:, :, None] - r[:, None, :], 0.0)
  wins = (both & (diff > tie_tolerance)).astype(np.float32)
  upper = np.triu(np.ones((K, K), bool), 1)[None]
  candidates = int((both & upper).sum())
  kept = int(wins.sum())
  counts = {"prompts": P, "teachers": K, "candidate_pairs": candidates, "pairs": kept,
            "ties": candidates - kept, "missing": int((~both & upper).sum()),
            "prompts_with_pairs": int((wins.sum((1, 2)) > 0).sum())}
  return wins, counts


def bt_loss(scores: jax.Array, wins: jax.Array) -> jax.Array:
  """Bradley-Terry: mean over pairs of -log sigma(pi_win - pi_lose) = softplus(pi_lose - pi_win)
  (softplus is exact and finite for any score gap)."""
  gap = scores[:, None, :] - scores[:, :, None]  # [B, i, j] = pi_j - pi_i
  total = jnp.sum(wins * jax.nn.softplus(gap))
  return total / jnp.maximum(jnp.sum(wins), 1.0)


def bt_loss_np(scores: np.ndarray, wins: np.ndarray) -> float:
  s = np.asarray(scores, np.float64)
  gap = s[:, None, :] - s[:, :, None]
  n = wins.sum()
  return float((wins * np.logaddexp(0.0, gap)).sum() / max(n, 1.0))


def router_metrics(scores: np.ndarray, rewards: np.ndarray, teachers: Sequence[str],
                   tie_tolerance: float = 1e-6, routable: Sequence[str] | None = None) -> dict:
  """Pairwise accuracy on the non-tie pairs, Hit@1 / Hit@3 of the router's top teachers against
  the oracle (argmax reward; tied best teachers all count as the oracle), per-teacher shares of
  the router's and the oracle's assignments (a tie on the best reward splits its prompt's share
  among the tied teachers), and a uniform random router's expected Hit@k.

  The router's top teachers, its shares and the random router's picks are among `routable`
  (default: every teacher), as route() chooses: an unroutable teacher's untrained score never
  counts as the router's pick."""
  s, r = np.asarray(scores, np.float64), np.asarray(rewards, np.float64)
  wins, counts = build_pairs(r, tie_tolerance)
  gap = s[:, :, None] - s[:, None, :]
  correct = (wins * ((gap > 0) + 0.5 * (gap == 0))).sum()
  keep = ~np.all(np.isnan(r), axis=1)
  s, r = s[keep], r[keep]
  P, K = r.shape
  ok = np.array([routable is None or t in routable for t in teachers])
  R = int(ok.sum())
  best = np.nanmax(r, axis=1, keepdims=True)
  oracle = r >= best - tie_tolerance  # NaN compares False
  order = np.argsort(-np.where(ok, s, -np.inf), axis=1, kind="stable")[:, :R]
  top = lambda k: np.take_along_axis(oracle, order[:, :k], axis=1).any(1)
  n_best = oracle.sum(1)
  n_hit = (oracle & ok).sum(1)  # the oracle teachers a router may pick
  rand = lambda k: float(np.mean(1.0 - np.asarray([math.comb(R - int(o), k) for o in n_hit])
                                 / math.comb(R, k))) if P else float("nan")
  choice = order[:, 0]
  share = lambda c: {t: float(np.mean(c == j)) if P else 0.0 for j, t in enumerate(teachers)}
  # a prompt whose best reward several teachers share counts 1/n for each, never for the first
  # listed one
  credit = oracle / np.maximum(n_best, 1)[:, None]
  oracle_shares = {t: float(credit[:, j].mean()) if P else 0.0 for j, t in enumerate(teachers)}
  return {"prompts": int(P), "pairs": counts["pairs"],
          "pairwise_accuracy": float(correct / counts["pairs"]) if counts["pairs"] else float("nan"),
          "hit@1": float(top(1).mean()) if P else float("nan"),
          "hit@3": float(top(min(3, R)).mean()) if P else float("nan"),
          "random_hit@1": rand(1), "random_hit@3": rand(min(3, R)),
          "shares": share(choice), "oracle_shares": oracle_shares}


# ---------------------------------------------------------------------------------------------
# the router: model + tokenizer + teachers

class Router:
  """A router ready to route: the model, the backbone's tokenizer and the teacher names."""

  def __init__(self, model: RouterModel, tokenizer, teachers: Sequence[str], config: RouterConfig,
               route_token_id: int | None, mesh: jax.sharding.Mesh | None = None,
               routable: Sequence[str] | None = None):
    if model.head.b.shape[0] != len(teachers):
      raise ValueError(f"the head has {model.head.b.shape[0]} outputs for {len(teachers)} teachers")
    self.model, self.tokenizer, self.config = model, tokenizer, config
    self.teachers = list(teachers)
    # the teachers route() may choose: train_router drops those no training pair compared (every
    # probe response failed, or tied), whose scores its head never learned
    self.routable = list(teachers) if routable is None else [t for t in teachers if t in routable]
    if not self.routable:
      raise ValueError(f"no routable teacher among {self.teachers}")
    self.route_token_id = route_token_id
    self.mesh = mesh if mesh is not None else shd.single_device_mesh()
    self.shards = shd.batch_shards(self.mesh)
    self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

  @classmethod
  def from_backbone(cls, path: str, teachers: Sequence[str], config: RouterConfig, *,
                    mesh: jax.sharding.Mesh | None = None) -> "Router":
    """A new router: the backbone of the HF model at `path`, a fresh head (seeded by config.seed).
    A new appended token gets an extra embedding row initialised to the mean embedding."""
    if len(set(teachers)) != len(teachers) or len(teachers) < 2:
      raise ValueError(f"the router needs >= 2 distinct teachers, got {list(teachers)}")
    lm, tok = models.from_pretrained(path, dtype=config.dtype, param_dtype=config.param_dtype,
                                     mesh=mesh)
    backbone = lm.model
    route_id = None
    if config.pooling == "appended_token":
      route_id = tok.convert_tokens_to_ids(config.appended_token)
      rows = backbone.embed.shape[0]
      if route_id is None or route_id == tok.unk_token_id or route_id >= rows:
        route_id = rows
        emb = backbone.embed[...]
        backbone.embed.set_value(jnp.concatenate([emb, emb.mean(0, keepdims=True)], axis=0))
        backbone.cfg = backbone.cfg.replace(vocab_size=rows + 1)
    model = RouterModel(backbone, len(teachers), rngs=nnx.Rngs(config.seed),
                        param_dtype=models.as_dtype(config.param_dtype))
    router = cls(model, tok, teachers, config, route_id, mesh)
    shd.shard_model(model, router.mesh)
    return router

  # -- routing --------------------------------------------------------------------------------
  def encode(self, prompts: Sequence) -> tuple[list[list[int]], int]:
    """Prompt ids (+ the appended token); prompts over max_len keep their tail. (ids, truncated)."""
    cfg, out, truncated = self.config, [], 0
    room = cfg.max_len - (1 if self.route_token_id is not None else 0)
    for p in prompts:
      if cfg.chat_template:
        ids = chat.prompt_ids(self.tokenizer, p, cfg.system)
      else:  # the raw text (turns joined by newlines), with the tokenizer's own BOS
        msgs = chat.to_messages(p, cfg.system)
        ids = list(self.tokenizer("\n".join(m["content"] for m in msgs))["input_ids"])
      if len(ids) > room:
        ids, truncated = ids[len(ids) - room:], truncated + 1
      out.append(ids + ([self.route_token_id] if self.route_token_id is not None else []))
    return out, truncated

  def forward_fn(self) -> tuple[Runner, Callable]:
    """(runner, forward) over the router's current parameters: forward(input_ids, segment_ids),
    both placed with `runner.put`, -> [B, k] fp32 coefficients. Compiled once per model graph and
    mesh (the runtime's cache), whatever the parameters' values."""
    runner = Runner(self.model, mesh=self.mesh, rules=shd.TRAINING)
    return runner, runner.jit(router_forward)

  def scores(self, prompts: Sequence) -> np.ndarray:
    """[n, k] coefficients pi(x) (fp32), batched by length bucket, batches sharded on the mesh."""
    cfg = self.config
    ids, _ = self.encode(prompts)
    runner, forward = self.forward_fn()
    plan = plan_batches([len(x) for x in ids], bucket_lengths(cfg.max_len, cfg.min_bucket),
                        batch_tokens=cfg.batch_tokens, max_batch_size=cfg.max_batch_size,
                        multiple=runner.shards)
    pending = []
    for b in plan:
      arr = pad_rows([ids[i] for i in b.indices], b.rows, b.length, self.pad_id)
      pending.append((b.indices, forward(runner.put(arr["input_ids"]),
                                         runner.put(arr["segment_ids"]))))
    from persyn_jax.distributed import to_host  # sharded over other hosts' devices too
    out = np.zeros((len(ids), len(self.teachers)), np.float32)
    for idx, s in pending:
      out[idx] = to_host(s)[:len(idx)]
    return out

  def route(self, prompts: Sequence) -> tuple[list[str], np.ndarray]:
    """(teacher name per prompt = argmax of its coefficients over the routable teachers, the
    [n, k] coefficients of all teachers)."""
    s = self.scores(prompts)
    ok = np.array([t in self.routable for t in self.teachers])
    return [self.teachers[j] for j in np.argmax(np.where(ok, s, -np.inf), axis=1)], s

  # -- checkpoint -----------------------------------------------------------------------------
  def save(self, path: str) -> None:
    """Orbax state + router.json (teachers, config, route token) + the backbone's config and
    tokenizer: a self-contained directory (the backbone's HF weights are not needed to load)."""
    path = fs.abspath(path)  # a gs:// path: orbax writes the state there itself
    fs.makedirs(path)
    save_tree(fs.join(path, "state"), nnx.to_pure_dict(nnx.state(self.model)))
    if jax.process_index() != 0:  # the orbax save above is collective; the rest is written once
      return
    with fs.staged_dir(fs.join(path, "tokenizer")) as tok_dir:  # transformers writes local files
      self.tokenizer.save_pretrained(tok_dir)
    atomic_write_json(fs.join(path, "backbone_config.json"),
                      config_to_hf(self.model.backbone.cfg), sort_keys=True)
    atomic_write_json(fs.join(path, "router.json"), {
        "format": 1, "teachers": self.teachers, "routable": self.routable,
        "route_token_id": self.route_token_id,
        "config": cfglib.to_dict(self.config)}, sort_keys=True)

  @classmethod
  def load(cls, path: str, *, mesh: jax.sharding.Mesh | None = None) -> "Router":
    path = fs.local_dir(path) if fs.is_remote(path) else os.path.abspath(path)  # gs://: a copy
    meta = read_json(os.path.join(path, "router.json"))
    config = cfglib.from_dict(RouterConfig, meta["config"], where=f"{path}/router.json:config")
    bcfg = config_from_hf(read_json(os.path.join(path, "backbone_config.json")),
                          source=os.path.join(path, "backbone_config.json"))
    mesh = mesh if mesh is not None else shd.single_device_mesh()
    dtype, pdtype = models.as_dtype(config.dtype), models.as_dtype(config.param_dtype)
    shapes = nnx.eval_shape(lambda: RouterModel(
        Transformer(bcfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=pdtype),
        len(meta["teachers"]), rngs=nnx.Rngs(0), param_dtype=pdtype))
    graphdef, state = nnx.split(shapes)
    shardings = nnx.to_pure_dict(shd.state_shardings(state, mesh))
    restored = restore_tree(os.path.join(path, "state"), abstract(nnx.to_pure_dict(state), shardings))
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    tok = models.load_tokenizer(os.path.join(path, "tokenizer"))
    return cls(model, tok, meta["teachers"], config, meta["route_token_id"], mesh,
               routable=meta.get("routable"))  # older checkpoints: every teacher

