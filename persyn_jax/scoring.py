"""Scores of every teacher response: learnability, quality and the combined reward (the paper's
Eqs. 1-2).

    student = LogProbScorer.from_pretrained("student_dir", config, mesh=mesh)
    learn, stats = student.learnability(prompts, responses)        # Eq. 1, [n] float
    rm = RewardScorer.from_pretrained("reward_model_dir", config, mesh=mesh)
    quality, stats = rm.score(prompts, responses)
    reward = combine(quality_matrix, learn_matrix, alpha=0.4)       # Eq. 2, per prompt
    scored, stats = score_records(records, config, student=student, reward_model=rm)

Each model tokenizes the (prompt, response) text itself with its own chat template
(`data.chat.pair_ids`; the reward model reads the conversation tokenized in one piece,
`data.chat.conversation_ids`). With `packing` (the default) pairs are packed longest first into rows of
a few bucket lengths (`data.batches.pack_decreasing`, laid out with segment ids and per-segment
positions by `data.batches.build_batch`), so padding is only the tail of each row; the student's
LM head runs only on response tokens (gathered before the vocabulary projection), and the reward
model's score head only on each segment's last token. Without it, each pair takes a padded row of
its length bucket (`runtime.buckets`). Either way each batch shape compiles once; batches are
sharded over the mesh's (data, fsdp) axes, and both models run on the device runtime
(`runtime.runner`) under the training rule set.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from persyn_jax import config as cfglib
from persyn_jax import models
from persyn_jax import sharding as shd
from persyn_jax.data import chat
from persyn_jax.data.batches import build_batch, pack_decreasing
from persyn_jax.metrics import progress
from persyn_jax.rewards import (combine, group_matrix, normalize, NORMALIZERS,  # noqa: F401
                                response_rewards)
from persyn_jax.runtime import logprob
from persyn_jax.runtime.buckets import bucket_lengths, fit_prompt_response, pad_rows, plan_batches
from persyn_jax.runtime.runner import Runner
from persyn_jax.verify import get_verifier


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  """The score stage. Defaults: the paper's (alpha = 0.4; the normalizer is our choice)."""

  alpha: float = 0.4  # Eq. 2: weight of learnability in the combined reward
  normalizer: Literal["minmax", "zscore", "rank"] = "minmax"  # per prompt, across teachers
  quality: Literal["reward_model", "verifier"] = "reward_model"
  reward_model: str = ""  # HF directory of a sequence-classification reward model
  verifier: str = "math"  # `verify.get_verifier` name, for quality = verifier
  reference_field: str = "reference"  # the record field holding the reference answer
  system: str | None = None  # system prompt given to both the student and the reward model
  max_len: int = 4096  # tokens of prompt + response
  overlong: Literal["truncate", "skip"] = "truncate"
  min_prompt_tokens: int = 256  # truncate: prompt tokens kept (its tail) at least
  batch_tokens: int = 32768  # padded tokens per batch (rows = batch_tokens // bucket length)
  max_batch_size: int = 64
  min_bucket: int = 64  # the shortest bucket length
  logits_chunk: int = 512  # sequence chunk of the fp32 log-softmax (bounds [B, chunk, vocab])
  packing: bool = True  # pack pairs into rows with segment ids (False: one padded row per pair)
  pack_len: int = 512  # packed rows are at least this long (a bucket length; capped by max_len)
  dtype: str = "bfloat16"  # compute dtype of the student and the reward model
  mesh: shd.MeshConfig | None = None  # the score stage's own mesh; None = the run's mesh

  def __post_init__(self):
    cfglib.check_dtype(self.dtype, "scoring.dtype")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"scoring.alpha={self.alpha}: must be in [0, 1]")
    for name in ("max_len", "pack_len", "batch_tokens", "max_batch_size", "min_bucket", "logits_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"scoring.{name}={getattr(self, name)}: must be >= 1")
    if self.normalizer not in NORMALIZERS:
      raise ValueError(f"scoring.normalizer={self.normalizer!r}: not one of {list(NORMALIZERS)}")
    if self.overlong not in ("truncate", "skip"):
      raise ValueError(f"scoring.overlong={self.overlong!r}: expected truncate or skip")
    if self.quality not in ("reward_model", "verifier"):
      raise ValueError(f"scoring.quality={self.quality!r}: expected reward_model or verifier")
    if self.quality == "verifier":
      get_verifier(self.verifier)  # fails early on an unknown name


# ---------------------------------------------------------------------------------------------
# jitted forwards (pure functions of a model and one padded batch)

def response_logprobs(model: models.CausalLM, batch: Mapping[str, jax.Array], chunk: int
                      ) -> tuple[jax.Array, jax.Array]:
  """(sum of log p(target) over loss_mask, number of masked tokens), per row, the fp32
  log-softmax run over sequence chunks (`runtime.logprob`)."""
  hidden, _ = model.hidden_states(batch["input_ids"], segment_ids=batch["segment_ids"])
  logits_fn = lambda h: shd.constrain(model.logits(h), ("batch", "seq", "act_vocab"))  # fp32
  return logprob.masked_logprob_sums(logits_fn, hidden, batch["targets"], batch["loss_mask"],
                                     chunk)


def reward_forward(model: models.SequenceClassifier, batch: Mapping[str, jax.Array]) -> jax.Array:
  """The reward model's scalar score [B] (its score head at the last token)."""
  return model(batch["input_ids"], batch["segment_ids"])[:, 0]


def packed_response_logprobs(model: models.CausalLM, batch: Mapping[str, jax.Array], chunk: int
                             ) -> jax.Array:
  """log p(target) [R, K] of a packed batch at its rows' response positions
  (`response_index`, `response_targets`, [R, K]); the LM head runs on those K positions only."""
  hidden, _ = model.hidden_states(batch["input_ids"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])
  logits_fn = lambda h: shd.constrain(model.logits(h), ("batch", "seq", "act_vocab"))  # fp32
  return logprob.gathered_logprobs(logits_fn, hidden, batch["response_index"],
                                   batch["response_targets"], chunk)


def packed_reward_forward(model: models.SequenceClassifier, batch: Mapping[str, jax.Array]
                          ) -> jax.Array:
  """The reward model's score [R, S] at the last token of each of a packed row's segments
  (`last_index` [R, S]), as the unpacked model pools a row's last token."""
  hidden, _ = model.model(batch["input_ids"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"])
  pooled = jnp.take_along_axis(hidden, batch["last_index"][..., None], axis=1)  # [R, S, D]
  return jnp.einsum("RSD,DL->RSL", pooled, model.score[...].astype(pooled.dtype),
                    preferred_element_type=jnp.float32)[..., 0]


def _round_up(n: int, multiple: int, cap: int) -> int:
  return min(cap, max(multiple, -(-n // multiple) * multiple))


def score_offset(ids: Sequence[int], pad_id: int | None) -> int:
  """Where a sequence classifier reads a sequence (transformers' rule): its last token that is
  not `pad_id` (with pad = EOS, before a trailing EOS); 0 if every token is `pad_id`."""
  if pad_id is not None:
    for t in range(len(ids) - 1, -1, -1):
      if ids[t] != pad_id:
        return t
    return 0
  return len(ids) - 1


def packed_batches(pairs: Sequence[tuple[list[int], list[int]]], config: ScoringConfig,
                   multiple: int = 1, pad_id: int | None = None):
  """The packed batches of (ids, response mask) pairs: yields (items per row, numpy batch) with
  the SFT batch keys plus `response_index`/`response_targets` [R, K] (the positions whose target
  is a response token, in row order, zero-padded) and `last_index` [R, S] (where each segment is
  scored: its last token not equal to `pad_id`, `score_offset`). K and S are fixed per row length
  (the most any row of that length needs, K rounded up to 64), so each (rows, length) shape
  compiles once. Items are indices into `pairs`."""
  buckets = bucket_lengths(config.max_len, config.min_bucket)
  rows = pack_decreasing([len(ids) for ids, _ in pairs], buckets, config.pack_len)
  plan = plan_batches([length for length, _ in rows], buckets, batch_tokens=config.batch_tokens,
                      max_batch_size=config.max_batch_size, multiple=multiple)
  counts = [sum(mask[1:]) for _, mask in pairs]  # response targets of each pair
  width_k, width_s = {}, {}
  for length, items in rows:
    width_k[length] = max(width_k.get(length, 0), sum(counts[i] for i in items))
    width_s[length] = max(width_s.get(length, 0), len(items))
  for b in plan:
    group = [rows[r][1] for r in b.indices]
    batch = build_batch([[pairs[i] for i in items] for items in group], b.length, b.rows)
    k = _round_up(width_k[b.length], 64, b.length)
    batch["response_index"] = np.zeros((b.rows, k), np.int32)
    batch["response_targets"] = np.zeros((b.rows, k), np.int32)
    batch["last_index"] = np.zeros((b.rows, width_s[b.length]), np.int32)
    for r, items in enumerate(group):
      where = np.flatnonzero(batch["loss_mask"][r])
      batch["response_index"][r, :where.size] = where
      batch["response_targets"][r, :where.size] = batch["targets"][r, where]
      starts = np.cumsum([0] + [len(pairs[i][0]) for i in items[:-1]])
      batch["last_index"][r, :len(items)] = starts + [score_offset(pairs[i][0], pad_id)
                                                      for i in items]
    yield group, batch


def encode_pairs(tokenizer, prompts: Sequence, responses: Sequence[str], config: ScoringConfig,
                 pair_fn=chat.pair_ids):
  """Token ids and response masks of the pairs (`pair_fn`: `chat.pair_ids` for the student,
  `chat.conversation_ids` for a reward model), over-long ones truncated or dropped (None).
  Returns (list of (ids, mask) or None, {"truncated": n, "skipped": n})."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  out, truncated, skipped = [], 0, 0
  for prompt, response in zip(prompts, responses):
    ids, mask = pair_fn(tokenizer, prompt, response, config.system)
    if len(ids) > config.max_len:
      if config.overlong == "skip":
        out.append(None)
        skipped += 1
        continue
      ids, mask = fit_prompt_response(ids, mask, config.max_len, config.min_prompt_tokens)
      truncated += 1
    out.append((ids, mask))
  return out, {"truncated": truncated, "skipped": skipped}


class _PairScorer:
  kind = ""
  score_pad_id = None  # packed: a segment is read at its last token that is not this id
  pair_fn = staticmethod(chat.pair_ids)  # (tokenizer, prompt, response, system) -> (ids, mask)

  def __init__(self, model, tokenizer, config: ScoringConfig, mesh=None):
    self.model, self.tokenizer, self.config = model, tokenizer, config
    self.runner = Runner(model, mesh=mesh, rules=shd.TRAINING)
    fn, static = self._packed_fn() if config.packing else self._batch_fn()
    self._forward = self.runner.jit(fn, static=static)
    self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

  def _run(self, prompts, responses) -> tuple[list, list, dict]:
    cfg = self.config
    pairs, stats = encode_pairs(self.tokenizer, prompts, responses, cfg, self.pair_fn)
    kept = [i for i, p in enumerate(pairs) if p is not None]
    if cfg.packing:
      return pairs, *self._run_packed(pairs, kept, stats)
    plan = plan_batches([len(pairs[i][0]) for i in kept], bucket_lengths(cfg.max_len, cfg.min_bucket),
                        batch_tokens=cfg.batch_tokens, max_batch_size=cfg.max_batch_size,
                        multiple=self.runner.shards)
    results = []  # dispatched asynchronously; fetched once all batches are queued
    padded = 0
    for b in plan:
      seqs = [pairs[kept[i]] for i in b.indices]
      arrays = pad_rows([s[0] for s in seqs], b.rows, b.length, self.pad_id, [s[1] for s in seqs])
      inputs = self.runner.put_batch(self._inputs(arrays))
      results.append(([kept[i] for i in b.indices], self._forward(inputs)))
      padded += b.rows * b.length
    tokens = sum(len(pairs[i][0]) for i in kept)
    stats.update(pairs=len(pairs), scored=len(kept), batches=len(plan), tokens=tokens,
                 padded_tokens=padded, shapes=len({(b.rows, b.length) for b in plan}))
    from persyn_jax.distributed import tree_to_host  # sharded over other hosts' devices too
    fetched = []
    # the bar moves as results come back: dispatching the batches above takes no time
    with progress(len(kept), f"score/{self.kind}", unit="pair") as bar:
      for idx, r in results:
        fetched.append((idx, tree_to_host(r)))
        bar.update(len(idx))
    return pairs, fetched, stats

  def _run_packed(self, pairs, kept, stats) -> tuple[list, dict]:
    results, padded, shapes = [], 0, set()
    for group, batch in packed_batches([pairs[i] for i in kept], self.config, self.runner.shards,
                                       self.score_pad_id):
      inputs = self.runner.put_batch({k: batch[k] for k in self._packed_keys})
      results.append(([[kept[i] for i in items] for items in group], self._forward(inputs)))
      padded += batch["input_ids"].size
      shapes.add(batch["input_ids"].shape)
    tokens = sum(len(pairs[i][0]) for i in kept)
    stats.update(pairs=len(pairs), scored=len(kept), batches=len(results), tokens=tokens,
                 padded_tokens=padded, shapes=len(shapes))
    from persyn_jax.distributed import tree_to_host  # sharded over other hosts' devices too
    out = []
    with progress(len(kept), f"score/{self.kind}", unit="pair") as bar:
      for rows, r in results:
        out.append(self._unpack(pairs, rows, np.asarray(tree_to_host(r))))
        bar.update(sum(map(len, rows)))
    return out, stats

  @classmethod
  def from_pretrained(cls, path: str, config: ScoringConfig, *, mesh=None):
    head = "lm" if cls is LogProbScorer else "classifier"
    model, tok = models.load_model(path, dtype=config.dtype, mesh=mesh, head=head,
                                   rules=shd.TRAINING)
    return cls(model, tok, config, mesh)


class LogProbScorer(_PairScorer):
  """Learnability (Eq. 1): mean log-probability of the response tokens under the student, prompt
  excluded, with the student's tokenizer and chat template."""

  kind = "learnability"

  def _batch_fn(self):
    return response_logprobs, {"chunk": self.config.logits_chunk}

  def _inputs(self, arrays):
    return arrays

  _packed_keys = ("input_ids", "segment_ids", "positions", "response_index", "response_targets")

  def _packed_fn(self):
    return packed_response_logprobs, {"chunk": self.config.logits_chunk}

  def _unpack(self, pairs, rows, logp):
    """(pair indices, (sums, counts)) from a packed batch's [R, K] response log-probs: each row's
    pairs own consecutive runs of its response positions, in order (summed in float64)."""
    idx, sums, counts = [], [], []
    for r, items in enumerate(rows):
      n = [sum(pairs[i][1][1:]) for i in items]
      ends = np.cumsum(n)
      for i, c, e in zip(items, n, ends):
        idx.append(i)
        sums.append(float(np.sum(logp[r, e - c:e], dtype=np.float64)))
        counts.append(c)
    return idx, (np.asarray(sums), np.asarray(counts))

  def learnability(self, prompts: Sequence, responses: Sequence[str]) -> tuple[np.ndarray, dict]:
    """[n] float64 mean log-probs (NaN for skipped pairs) and counts."""
    pairs, results, stats = self._run(prompts, responses)
    out = np.full(len(pairs), np.nan)
    response_tokens = 0
    for idx, (sums, counts) in results:
      n = len(idx)
      counts = np.asarray(counts[:n], np.float64)
      response_tokens += int(counts.sum())
      out[idx] = np.where(counts > 0, np.asarray(sums[:n], np.float64) / np.maximum(counts, 1),
                          np.nan)
    stats["response_tokens"] = response_tokens
    return out, stats


class RewardScorer(_PairScorer):
  """Quality from a reward model: a sequence-classification model's scalar score of the full
  conversation, formatted with the reward model's own chat template."""

  kind = "quality"
  pair_fn = staticmethod(chat.conversation_ids)  # the full conversation tokenized as one text

  def __init__(self, model, tokenizer, config: ScoringConfig, mesh=None):
    width = getattr(getattr(model, "config", None), "num_labels", 1)
    if width != 1:  # reading column 0 of a k-class classifier would be silently wrong
      raise ValueError(f"scoring.reward_model {config.reward_model or '(given model)'}: its score "
                       f"head has width {width} (num_labels={width}); a reward model has one output")
    # transformers reads the last token that is not pad_token_id (pad = EOS: the one before EOS)
    self.score_pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    super().__init__(model, tokenizer, config, mesh)

  def _batch_fn(self):
    return reward_forward, None

  def _inputs(self, arrays):
    return {"input_ids": arrays["input_ids"], "segment_ids": arrays["segment_ids"]}

  _packed_keys = ("input_ids", "segment_ids", "positions", "last_index")

  def _packed_fn(self):
    return packed_reward_forward, None

  def _unpack(self, pairs, rows, scores):
    idx = [i for items in rows for i in items]
    return idx, np.asarray([scores[r, s] for r, items in enumerate(rows)
                            for s in range(len(items))])

  def score(self, prompts: Sequence, responses: Sequence[str]) -> tuple[np.ndarray, dict]:
    pairs, results, stats = self._run(prompts, responses)
    out = np.full(len(pairs), np.nan)
    for idx, scores in results:
      out[idx] = np.asarray(scores[:len(idx)], np.float64)
    return out, stats


def verifier_quality(responses: Sequence[str], references: Sequence[str | None],
                     name: str = "math") -> np.ndarray:
  """Quality from a verifier: 1/0 per response (the paper's math setting); NaN where there is no reference."""
  fn = get_verifier(name)
  return np.asarray([np.nan if ref is None else fn(resp, str(ref))
                     for resp, ref in zip(responses, references)], np.float64)


# ---------------------------------------------------------------------------------------------
# records

def _finite(x: float) -> float | None:
  return None if x is None or not math.isfinite(x) else float(x)


def score_records(records: Sequence[Mapping[str, Any]], config: ScoringConfig, *,
                  student: LogProbScorer, reward_model: RewardScorer | None = None
                  ) -> tuple[list[dict], dict]:
  """Adds `scores` {quality, learnability, reward} to probe records (`id`, `prompt`, `teacher`,
  `response`, and for verifiers the reference under `config.reference_field`).

  Normalization (Eq. 2) runs per prompt id across all its responses. A response with a missing
  score (over-long and skipped; no reference) gets reward None and is left out of the router's
  pairs. Returns (new records, counts).
  """
  for i, r in enumerate(records):
    for key in ("id", "prompt", "teacher", "response"):
      if key not in r:
        raise ValueError(f"record {i} (id {r.get('id')!r}) has no {key!r} field")
  prompts = [r["prompt"] for r in records]
  responses = [r["response"] for r in records]
  learn, lstats = student.learnability(prompts, responses)
  if config.quality == "reward_model":
    if reward_model is None:
      raise ValueError("scoring.quality=reward_model needs a reward model (scoring.reward_model)")
    quality, qstats = reward_model.score(prompts, responses)
  else:
    missing = [r["id"] for r in records if r.get(config.reference_field) is None]
    if missing:
      raise ValueError(f"scoring.quality=verifier: {len(missing)} record(s) have no "
                       f"{config.reference_field!r} field, e.g. id {missing[0]!r}")
    quality = verifier_quality(responses, [r[config.reference_field] for r in records],
                               config.verifier)
    qstats = {"pairs": len(records), "verified": len(records)}
  keys = [r["id"] for r in records]
  reward = response_rewards(keys, [(r["teacher"], r.get("sample", 0)) for r in records], quality,
                            learn, config.alpha, config.normalizer)
  out = [{**rec, "scores": {"quality": _finite(qv), "learnability": _finite(lv),
                            "reward": _finite(rv)}}
         for rec, lv, qv, rv in zip(records, learn, quality, reward)]
  stats = {"records": len(records), "prompts": len(set(keys)), "learnability": lstats,
           "quality": qstats, "unscored": int(sum(o["scores"]["reward"] is None for o in out))}
  return out, stats


def reward_matrix(records: Sequence[Mapping[str, Any]], teachers: Sequence[str] | None = None,
                  field: str = "reward") -> tuple[list, list[str], np.ndarray]:
  """(prompt ids, teacher names, [prompts, teachers] matrix of `scores[field]`) of scored records
  (the router's training target; several samples of a teacher are averaged, missing -> NaN)."""
  vals = [np.nan if r["scores"].get(field) is None else r["scores"][field] for r in records]
  return group_matrix([r["id"] for r in records], [r["teacher"] for r in records], vals, teachers)
