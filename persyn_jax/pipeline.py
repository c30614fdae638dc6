"""The Route-then-Generate run: stages, their manifests, resume, policies, costs and the report.

Each stage is a function of its inputs and config. It writes into `run_dir/<stage>/` and, when
done, a `DONE.json` manifest holding a key (a hash of its config and of the keys of the stages it
reads) and its counts. A rerun skips a stage whose manifest key matches; a stopped stage resumes
from its completed shards (and SFT from its last checkpoint). With several processes each host
writes its own shards; only process 0 writes manifests and reports.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from persyn_jax import config as C
from persyn_jax import distributed as dist
from persyn_jax import evaluate as ev
from persyn_jax import policies as pol
from persyn_jax import sharding as shd
from persyn_jax.data import shards
from persyn_jax.data.sources import PromptSourceConfig, load_prompts, split_prompts
from persyn_jax.io_utils import atomic_write_json, safe_name
from persyn_jax.run_config import STAGES, ModelRef, RunConfig

Log = Callable[[str], None]


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def resolve_world(cfg: RunConfig, log: Log = _print) -> RunConfig:
  """With `world` set, builds (or loads from the cache) the toy world and points the run at it."""
  if cfg.world is None:
    return cfg
  from persyn_jax import toyworld
  # several processes: the first to get the lock builds it (in a one-process subprocess), the
  # others wait and load it (or build their own copy when the cache is not shared)
  w = toyworld.build(cfg.world.scale, cfg.world.seed, cfg.world.cache_dir, log=log)
  teachers = tuple(ModelRef(name=n, path=p, family=f, dtype="float32") for n, p, f in w.teachers)
  n, p, f = w.student
  source = dataclasses.replace(cfg.prompts.source, path=w.prompts_path, format="jsonl",
                               prompt_field="prompt", reference_field="reference", id_field="id",
                               keep_fields=("kind",))
  prompts = dataclasses.replace(cfg.prompts, source=source, probe=float(w.probe), eval=float(w.eval))
  router = cfg.router if cfg.router.backbone else dataclasses.replace(cfg.router, backbone=p)
  return dataclasses.replace(cfg, teachers=teachers, student=ModelRef(n, p, f, "float32"),
                             prompts=prompts, router=router)


def enable_compilation_cache(path: str = "") -> str:
  """JAX's persistent compilation cache, so a rerun (or the next run) skips XLA compiles."""
  path = path or os.environ.get("PERSYN_JAX_XLA_CACHE") or os.path.join(
      os.environ.get("PERSYN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "persyn_jax"),
      "xla")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return path


def _key(*parts) -> str:
  return C.config_hash([C.to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts])


class Run:
  """One run directory. `run(stages)` executes the stages in order, skipping finished ones."""

  def __init__(self, cfg: RunConfig, *, log: Log = _print):
    self.log = log
    self.cfg = resolve_world(cfg, log)
    self.dir = os.path.abspath(self.cfg.out_dir)
    self.mesh = shd.make_mesh(self.cfg.mesh)
    self.teachers = [t.name for t in self.cfg.teachers]
    for t in self.cfg.teachers:
      safe_name(t.name, "teacher name")
    self._prompts: dict[str, list[dict]] | None = None
    self.keys: dict[str, str] = {}

  # -- bookkeeping ------------------------------------------------------------------------------
  def path(self, *parts: str) -> str:
    return os.path.join(self.dir, *parts)

  def manifest(self, stage: str) -> dict | None:
    p = self.path(stage, "DONE.json")
    if not os.path.exists(p):
      return None
    with open(p) as f:
      return json.load(f)

  def stage_key(self, stage: str) -> str:
    c = self.cfg
    teachers = [dataclasses.asdict(t) for t in c.teachers]
    parts = {
        "probe": ("probe", teachers, c.prompts, c.sampling, c.seed, c.records_per_shard),
        "score": ("score", self.keys.get("probe"), c.scoring, c.student),
        "router": ("router", self.keys.get("score"), c.router),
        "route": ("route", self.keys.get("router"), c.policies, c.compare),
        "generate": ("generate", self.keys.get("route"), c.sampling, c.scoring),
        "sft": ("sft", self.keys.get("generate"), c.sft),
        "eval": ("eval", self.keys.get("sft"), c.eval),
    }[stage]
    return _key(*parts)

  def done(self, stage: str, counts: dict, seconds: float) -> None:
    if jax.process_index() == 0:
      atomic_write_json(self.path(stage, "DONE.json"), {
          "stage": stage, "key": self.keys[stage], "counts": counts,
          "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})

  def run(self, stages: Sequence[str] = STAGES) -> dict | None:
    bad = [s for s in stages if s not in STAGES]
    if bad:
      raise ValueError(f"unknown stages {bad}; stages: {', '.join(STAGES)}")
    os.makedirs(self.dir, exist_ok=True)
    if dist.is_writer():
      atomic_write_json(self.path("config.json"), C.to_dict(self.cfg))
    for stage in STAGES:
      self.keys[stage] = self.stage_key(stage)
      m = dist.broadcast_json(self.manifest(stage))  # process 0's view: all run or skip alike
      if stage not in stages:
        continue
      if m is not None and m.get("key") == self.keys[stage]:
        self.log(f"[{stage}] done earlier ({m['seconds']} s); skipped")
        continue
      if m is not None:  # inputs or config changed: keep the old outputs aside, never delete them
        stale = self.path(f"{stage}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        self.log(f"[{stage}] config or inputs changed since it ran; moving it to {stale}")
        if dist.is_writer():
          os.replace(self.path(stage), stale)
        dist.barrier(f"{stage}:stale")
      self.log(f"[{stage}] running")
      t0 = time.time()
      counts = getattr(self, f"stage_{stage}")()
      self.done(stage, counts, time.time() - t0)
      dist.barrier(f"{stage}:done")  # its files exist before the next stage reads them
      self.log(f"[{stage}] done in {time.time() - t0:.1f} s")
      gc.collect()
    if dist.is_writer() and all(self.manifest(s) is not None for s in STAGES):
      return self.write_report()
    return None

  # -- prompts ----------------------------------------------------------------------------------
  def prompts(self) -> dict[str, list[dict]]:
    if self._prompts is None:
      c = self.cfg.prompts
      items, skipped = load_prompts(c.source)
      if not items:
        raise ValueError(f"{c.source.path}: no usable prompts (skipped: {skipped})")
      amount = lambda v: int(v) if v >= 1 else v  # noqa: E731
      self._prompts = split_prompts(items, probe=amount(c.probe), eval=amount(c.eval), seed=c.seed)
      self._prompts["skipped"] = skipped
    return self._prompts

  # -- models ---------------------------------------------------------------------------------
  def load(self, ref: ModelRef, **kw):
    from persyn_jax.models import load_model  # an HF directory or a persyn_jax.convert output
    return load_model(ref.path, dtype=ref.dtype, mesh=self.mesh, **kw)

  def _generate(self, ref: ModelRef, items: list[dict], stage_dir: str, stage: str, sampling) -> dict:
    from persyn_jax.sampling import generate_to_records
    model, tok = self.load(ref)
    t0 = time.time()
    man = generate_to_records(model, tok, items, sampling, stage_dir, stage, teacher=ref.name,
                              records_per_shard=self.cfg.records_per_shard, mesh=self.mesh,
                              provenance={"run": self.cfg.name})
    seconds = time.time() - t0  # every host's shards and the manifest are written: all may read
    del model
    extra = man.get("extra", {}) if man else {}
    counts = extra.get("counts", {})
    return {"generations": int(counts.get("results", len(items) * sampling.num_samples)),
            "tokens": int(counts.get("response_tokens", 0)), "seconds": round(seconds, 2)}

  # -- stages ---------------------------------------------------------------------------------
  def stage_probe(self) -> dict:
    """Every teacher answers every probe prompt (k·p generations)."""
    probe = self.prompts()["probe"]
    per_teacher = {}
    for ref in self.cfg.teachers:
      self.log(f"[probe] {ref.name}: {len(probe)} prompts")
      per_teacher[ref.name] = self._generate(ref, probe, self.path("probe"),
                                             f"probe-{safe_name(ref.name)}", self.cfg.sampling)
    return {"prompts": len(probe), "teachers": per_teacher,
            "skipped_prompts": self.prompts()["skipped"]}

  def _records(self, stage_dir: str, stage: str) -> list[dict]:
    return list(shards.read_records(stage_dir, stage))

  def probe_records(self) -> list[dict]:
    out = []
    for t in self.teachers:
      out += self._records(self.path("probe"), f"probe-{safe_name(t)}")
    return out

  def _score(self, records: list[dict]) -> tuple[list[dict], dict]:
    from persyn_jax.scoring import LogProbScorer, RewardScorer, score_records
    sc = self.cfg.scoring
    student, stok = self.load(dataclasses.replace(self.cfg.student, dtype=sc.dtype))
    scorer = LogProbScorer(student, stok, sc, mesh=self.mesh)
    rm = None
    if sc.quality == "reward_model":
      if not sc.reward_model:
        raise ValueError("scoring.quality=reward_model needs scoring.reward_model (an HF directory)")
      rmodel, rtok = self.load(ModelRef("reward_model", sc.reward_model, dtype=sc.dtype),
                               head="classifier")
      rm = RewardScorer(rmodel, rtok, sc, mesh=self.mesh)
    return score_records(records, sc, student=scorer, reward_model=rm)

  def stage_score(self) -> dict:
    """Quality and learnability of every probe response; the combined reward per prompt (Eq. 2)."""
    scored, stats = self._score(self.probe_records())
    shards.write_stage_records(self.path("score"), "score", scored,
                               records_per_shard=self.cfg.records_per_shard, extra={"stats": stats})
    return stats

  def score_table(self) -> pol.ScoreTable:
    from persyn_jax.scoring import reward_matrix
    recs = self._records(self.path("score"), "score")
    ids, teachers, reward = reward_matrix(recs, self.teachers, "reward")
    _, _, quality = reward_matrix(recs, self.teachers, "quality")
    _, _, learn = reward_matrix(recs, self.teachers, "learnability")
    return pol.ScoreTable(tuple(ids), tuple(teachers), quality, learn, reward)

  def stage_router(self) -> dict:
    """Bradley–Terry router on all teacher pairs of the probe prompts (Eq. 3)."""
    from persyn_jax.router_train import fit_router
    table = self.score_table()
    by_id = {p["id"]: p for p in self.prompts()["probe"]}
    prompts = [ev.prompt_of(by_id[i]) for i in table.ids]
    router, report = fit_router(self.cfg.router, prompts, table.reward, self.teachers,
                                mesh=self.mesh, log=None)
    router.save(self.path("router", "checkpoint"))
    if jax.process_index() == 0:
      atomic_write_json(self.path("router", "router_eval.json"), report)
    return {k: v for k, v in report.items() if not isinstance(v, (dict, list))}

  def stage_route(self) -> dict:
    """The router assigns every non-probe training prompt; every compared policy gets its
    assignment of all training prompts."""
    from persyn_jax.router import Router
    p = self.prompts()
    rest = p["rest"]
    router = Router.load(self.path("router", "checkpoint"), mesh=self.mesh)
    names, scores = router.route([ev.prompt_of(x) for x in rest]) if rest else ([], np.zeros((0, 0)))
    routes = {x["id"]: t for x, t in zip(rest, names)}
    route_records = [{**x, "route": {"teacher": t, "scores": dict(zip(self.teachers, map(float, s)))}}
                     for x, t, s in zip(rest, names, scores)]
    shards.write_stage_records(self.path("route"), "route", route_records,
                               records_per_shard=self.cfg.records_per_shard)
    table = self.score_table()
    train_ids = [x["id"] for x in p["train"]]
    families = {t.name: t.family for t in self.cfg.teachers}
    assignments = {}
    for policy in self.cfg.compare:
      if policy == "oracle":
        continue  # known only after every teacher answered every prompt (generate stage)
      assignments[policy] = pol.assign(policy, train_ids, table, self.cfg.policies,
                                       families=families, student_family=self.cfg.student.family,
                                       routes=routes)
    if jax.process_index() == 0:
      atomic_write_json(self.path("route", "assignments.json"), assignments)
    return {"routed": len(rest), "router_shares": pol.shares(routes, self.teachers),
            "policies": {k: pol.shares(v, self.teachers) for k, v in assignments.items()}}

  def stage_generate(self) -> dict:
    """Each teacher answers only the prompts some policy gave it and the probe did not already
    cover; then one dataset per policy is assembled (data/<policy>/)."""
    p = self.prompts()
    with open(self.path("route", "assignments.json")) as f:
      assignments: dict[str, dict[str, str]] = json.load(f)
    probe_ids = {x["id"] for x in p["probe"]}
    by_id = {x["id"]: x for x in p["train"]}
    need: dict[str, set[str]] = {t: set() for t in self.teachers}
    for a in assignments.values():
      for i, t in a.items():
        if i not in probe_ids:
          need[t].add(i)
    oracle = "oracle" in self.cfg.compare
    if oracle:  # Generate then Select: every teacher on every prompt
      for t in self.teachers:
        need[t] |= {i for i in by_id if i not in probe_ids}
    per_teacher = {}
    for ref in self.cfg.teachers:
      items = [x for x in p["train"] if x["id"] in need[ref.name]]
      self.log(f"[generate] {ref.name}: {len(items)} prompts")
      if items:
        per_teacher[ref.name] = self._generate(ref, items, self.path("generate"),
                                               f"gen-{safe_name(ref.name)}", self.cfg.sampling)
      else:
        per_teacher[ref.name] = {"generations": 0, "tokens": 0, "seconds": 0.0}
    responses: dict[tuple[str, str], dict] = {}
    for r in self.probe_records():
      if r.get("sample", 0) == 0:
        responses[(r["id"], r["teacher"])] = r
    for t in self.teachers:
      if per_teacher[t]["generations"]:
        for r in self._records(self.path("generate"), f"gen-{safe_name(t)}"):
          responses[(r["id"], r["teacher"])] = r
    if oracle:
      scored, _ = self._score([r for (i, _), r in responses.items() if i in by_id])
      from persyn_jax.scoring import reward_matrix
      ids, teachers, reward = reward_matrix(scored, self.teachers, "reward")
      best = np.argmax(np.where(np.isnan(reward), -np.inf, reward), axis=1)
      assignments["oracle"] = {i: teachers[j] for i, j in zip(ids, best)}
      if jax.process_index() == 0:
        atomic_write_json(self.path("generate", "oracle_assignment.json"), assignments["oracle"])
    datasets = {}
    for policy in self.cfg.compare:
      a = assignments[policy]
      recs = []
      for x in p["train"]:
        r = responses.get((x["id"], a[x["id"]]))
        if r is None:
          raise RuntimeError(f"internal: no response of {a[x['id']]} for prompt {x['id']!r}")
        recs.append({**r, "policy": policy})
      shards.write_stage_records(self.path("data", safe_name(policy)), "data", recs,
                                 records_per_shard=self.cfg.records_per_shard)
      datasets[policy] = {"records": len(recs),
                          "teacher_shares": pol.shares(a, self.teachers)}
    return {"teachers": per_teacher, "datasets": datasets}

  def stage_sft(self) -> dict:
    """One student per compared policy, trained on that policy's dataset."""
    from persyn_jax import sft
    out = {}
    for policy in self.cfg.compare:
      d = self.path("sft", safe_name(policy))
      done = os.path.join(d, "DONE.json")
      if os.path.exists(done):
        out[policy] = json.load(open(done))
        self.log(f"[sft] {policy}: done earlier")
        continue
      c = self.cfg.sft
      model, tok = self.load(dataclasses.replace(self.cfg.student, dtype=c.param_dtype))
      batches, per_epoch = epoch_batches(self.path("data", safe_name(policy)), tok, c)
      self.log(f"[sft] {policy}: {per_epoch} batches per epoch")
      res = sft.train(model, tok, batches, c, out_dir=d, mesh=self.mesh, num_batches=per_epoch)
      final_loss = res.losses.get(res.step)
      if final_loss is None:  # resumed after the last step (killed while exporting): from the log
        final_loss = dict(_loss_curve(res.metrics_path)).get(res.step)
      summary = {"steps": res.step, "final_loss": final_loss,
                 "export_dir": res.export_dir, "metrics": res.metrics_path}
      if jax.process_index() == 0:
        atomic_write_json(done, summary)
      out[policy] = summary
      del model, res
      gc.collect()
    return out

  def stage_eval(self) -> dict:
    """Every student (and the base student) answers the held-out prompts."""
    from persyn_jax.sampling import generate
    c = self.cfg.eval
    prompts = self.prompts()["eval"]
    if not prompts:
      raise ValueError("eval: no held-out prompts (set prompts.eval)")
    students = {}
    if c.base_student:
      students["base_student"] = self.cfg.student.path
    for policy in self.cfg.compare:
      students[policy] = self.path("sft", safe_name(policy), "student")
    out = {}
    for name, path in students.items():
      model, tok = self.load(ModelRef(name, path, dtype=self.cfg.student.dtype))
      t0 = time.time()
      results = generate(model, tok, ev.prompts_for_model(prompts), c.sampling, mesh=self.mesh)
      scored = ev.score_generations(prompts, [r.text for r in results], verifier=c.verifier,
                                    reference_field=c.reference_field)
      d = self.path("eval", safe_name(name))
      if jax.process_index() == 0:
        ev.export(scored["rows"], f"{self.cfg.name}-{name}", d, c.exports)
      out[name] = {k: v for k, v in scored.items() if k != "rows"}
      out[name]["seconds"] = round(time.time() - t0, 2)
      self.log(f"[eval] {name}: {out[name].get('score', float('nan')):.3f}")
      del model
    if jax.process_index() == 0:
      atomic_write_json(self.path("eval", "eval.json"), out)
    return out

  # -- report ---------------------------------------------------------------------------------
  def write_report(self) -> dict:
    from persyn_jax.report import write_report
    m = {s: self.manifest(s) for s in STAGES}
    table = self.score_table()
    best = table.best()
    with open(self.path("route", "assignments.json")) as f:
      assignments = json.load(f)
    oracle_path = self.path("generate", "oracle_assignment.json")
    if os.path.exists(oracle_path):
      assignments["oracle"] = json.load(open(oracle_path))
    shares = {p: pol.shares(assignments[p], self.teachers) for p in self.cfg.compare}
    shares["oracle best (probe)"] = pol.shares(best, self.teachers)
    mq, ml = table.mean_quality(), table.mean_nll()
    fam = {t.name: t.family for t in self.cfg.teachers}
    probe_teachers = {t: {"family": fam[t], "mean_quality": mq[t], "mean_learnability": -ml[t],
                          "oracle_share": shares["oracle best (probe)"][t]} for t in self.teachers}
    kinds = {x["id"]: x.get("kind") for x in self.prompts()["probe"]}
    by_kind: dict[str, dict[str, float]] = {}
    if any(kinds.values()):
      for k in sorted({v for v in kinds.values() if v}):
        ids = [i for i in best if kinds.get(i) == k]
        by_kind[k] = pol.shares({i: best[i] for i in ids}, self.teachers)
    probe_c, gen_c = m["probe"]["counts"], m["generate"]["counts"]
    teachers_cost = {}
    for t in self.teachers:
      a, b = probe_c["teachers"].get(t, {}), gen_c["teachers"].get(t, {})
      teachers_cost[t] = {k: a.get(k, 0) + b.get(k, 0) for k in ("generations", "tokens", "seconds")}
    k, P = len(self.teachers), probe_c["prompts"]
    N = len(self.prompts()["train"])
    probe_ids = set(best)
    # measured seconds per generation of each teacher (probe and generate stages together)
    tsec = {t: c["seconds"] / max(1, c["generations"]) for t, c in teachers_cost.items()}
    probe_secs = sum(probe_c["teachers"][t]["seconds"] for t in self.teachers)
    costs = {"teachers": teachers_cost, "probe_generations": k * P, "routed_generations": N - P,
             "route_then_generate": {"generations": k * P + (N - P)},
             "generate_then_select": {"generations": k * N,
                                      "teacher_seconds_estimate": round(sum(tsec.values()) * N, 1)},
             "policies": {}}
    for p in self.cfg.compare:
      a = assignments[p]
      if p == "oracle":  # Generate then Select on the full set
        gens, secs = k * N, sum(tsec.values()) * N
      else:  # the probe (needed to score, route, or pick the teacher), then one answer per prompt
        rest = [i for i in a if i not in probe_ids]
        gens, secs = k * P + len(rest), probe_secs + sum(tsec[a[i]] for i in rest)
      costs["policies"][p] = {"prompts": len(a), "generations": gens, "teacher_seconds": round(secs, 2)}
    evals = m["eval"]["counts"]
    metric = "accuracy" if self.cfg.eval.verifier else "n"
    eval_table = {p: {"score": evals[p].get("score", float("nan")), "n": evals[p]["n"],
                      "by_kind": evals[p].get("by_kind", {})} for p in evals}
    router_eval = json.load(open(self.path("router", "router_eval.json")))
    held = router_eval.get("held_out", {})
    router_summary = {k2: held[k2] for k2 in ("hit@1", "hit@3", "pairwise_accuracy", "random_hit@1")
                      if k2 in held}
    router_summary.update(held_out_prompts=router_eval.get("held_out_prompts"),
                          pairs=router_eval.get("pairs", {}).get("pairs"),
                          ties_dropped=router_eval.get("pairs", {}).get("ties"))
    curves = {}
    for p in self.cfg.compare:
      curves[p] = _loss_curve(self.path("sft", safe_name(p), "metrics.jsonl"))
    report = {"run": self.cfg.name, "run_dir": self.dir, "teachers": self.teachers,
              "student": self.cfg.student.name, "policies": list(self.cfg.compare),
              "eval_metric": metric, "eval": eval_table, "router": router_summary,
              "shares": shares, "probe": {"prompts": P, "teachers": probe_teachers,
                                          "by_kind": by_kind},
              "costs": costs, "prompts": {"train": N, "probe": P,
                                          "eval": len(self.prompts()["eval"])},
              "stage_seconds": {s: m[s]["seconds"] for s in STAGES}}
    report["summary"] = summarize(report)
    return write_report(report, self.path("report"), curves)


def _loss_curve(path: str) -> list[tuple[int, float]]:
  pts = []
  if os.path.exists(path):
    for line in open(path):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "loss" in row and "step" in row and row.get("split", "train") == "train":
        pts.append((int(row["step"]), float(row["loss"])))
  return pts


def summarize(report: dict) -> str:
  """Plain words on what the run showed: who won, and whether the oracle needs several teachers."""
  ev_ = {p: e["score"] for p, e in report["eval"].items() if p != "base_student"}
  if not ev_:
    return ""
  best = max(ev_, key=ev_.get)
  oracle_shares = report["shares"]["oracle best (probe)"]
  top_t = max(oracle_shares, key=oracle_shares.get)
  lines = [f"Best student: **{best}** ({report['eval_metric']} {ev_[best]:.3f}); "
           + ", ".join(f"{p} {v:.3f}" for p, v in sorted(ev_.items(), key=lambda x: -x[1]) if p != best)
           + (f"; the student before SFT: {report['eval']['base_student']['score']:.3f}."
              if "base_student" in report["eval"] else ".")]
  lines.append(f"The oracle's per-prompt best teacher is {top_t} for {oracle_shares[top_t]:.0%} of "
               f"probe prompts; " + ("no single teacher is best everywhere." if oracle_shares[top_t] < 0.9
                                     else "one teacher is best almost everywhere."))
  if "persyn" in ev_ and "strong" in ev_:
    d = ev_["persyn"] - ev_["strong"]
    lines.append(f"PerSyn vs the strongest teacher: {d:+.3f}.")
  r = report.get("router", {})
  if "hit@1" in r:
    lines.append(f"Router Hit@1 {r['hit@1']:.2f} (random {r.get('random_hit@1', float('nan')):.2f}).")
  return " ".join(lines)


def epoch_batches(data_dir: str, tokenizer, c) -> tuple[Callable, int]:
  """(start -> microbatches from index `start` on, across epochs; microbatches per epoch).
  The records are tokenized once, for the count and every epoch."""
  from persyn_jax.data.pipeline import TokenizedRecords, sft_batches
  tokenized = TokenizedRecords(data_dir, tokenizer, seq_len=c.seq_len, stage="data")
  kw = dict(seq_len=c.seq_len, batch_size=c.batch_size, seed=c.seed, tokenized=tokenized)
  first = sft_batches(data_dir, tokenizer, epoch=0, **kw)
  per_epoch = sum(1 for _ in first)
  if per_epoch == 0:
    raise ValueError(f"{data_dir}: no SFT examples to train on ({len(tokenized)} records; "
                     f"{dict(first.stats) or 'none tokenized'}); check sft.seq_len and the data")

  def batches(start: int):
    epoch, skip = divmod(start, per_epoch)
    while True:
      yield from sft_batches(data_dir, tokenizer, epoch=epoch, start_step=skip, **kw)
      epoch, skip = epoch + 1, 0

  return batches, per_epoch
