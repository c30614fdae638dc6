"""Held-out evaluation of a student: greedy answers scored by a verifier, and exports of the
generations in the formats judge-based benchmarks read (IFEval, AlpacaEval, Arena-Hard); and the
prompts of those benchmarks' own files (read_benchmark), whose answers are exported the same way."""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, Mapping, Sequence

from persyn_jax import fs
from persyn_jax.io_utils import atomic_write_json, atomic_write_text, safe_name
from persyn_jax.io_utils import dumps as io_dumps
from persyn_jax.sampling.records import prompt_of
from persyn_jax.verify import get_verifier

EXPORTS = ("jsonl", "alpaca_eval", "arena_hard", "ifeval")


def score_generations(prompts: Sequence[Mapping[str, Any]], texts: Sequence[str], *,
                      verifier: str | None, reference_field: str = "reference") -> dict:
  """Accuracy of `texts` against the prompts' references (and per `kind`, when prompts have one),
  and `correct`: each prompt's verifier score in prompt order (0 and 1 as ints; a verifier's
  partial credit as it gave it), whose mean is the accuracy."""
  if len(texts) != len(prompts):  # a missing answer must not shrink the accuracy's denominator
    raise ValueError(f"score_generations: {len(texts)} responses for {len(prompts)} eval prompts")
  rows = []
  check = get_verifier(verifier) if verifier else None
  for p, t in zip(prompts, texts):
    row = {"id": p["id"], "prompt": p["prompt"], "response": t}
    if check is not None:
      ref = p.get(reference_field)
      if ref is None:
        raise ValueError(f"eval prompt {p['id']!r} has no {reference_field!r} for verifier {verifier!r}")
      row.update(reference=ref, correct=float(check(t, ref)))
    if "kind" in p:
      row["kind"] = p["kind"]
    rows.append(row)
  out: dict[str, Any] = {"n": len(rows), "rows": rows}
  if check is not None:
    out["score"] = sum(r["correct"] for r in rows) / max(len(rows), 1)
    out["correct"] = [int(r["correct"]) if r["correct"] in (0.0, 1.0) else r["correct"]
                      for r in rows]
    kinds = sorted({r["kind"] for r in rows if "kind" in r})
    out["by_kind"] = {k: sum(r["correct"] for r in rows if r.get("kind") == k) /
                      max(1, sum(r.get("kind") == k for r in rows)) for k in kinds}
  return out


def _jsonl(path: str) -> list[tuple[int, Any]]:
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
  return out


def _field(item: Any, key: str, where: str, kind=str):
  if not isinstance(item, dict) or not isinstance(item.get(key), kind) or item.get(key) == "":
    raise ValueError(f"{where}: needs a non-empty {key!r} ({kind.__name__}), got "
                     f"{(item.get(key) if isinstance(item, dict) else item)!r:.80}")
  return item[key]


def _key(item: Any, key: str, where: str) -> int | str:
  """An item's id field: a non-empty str or an int, as the benchmark's files have it."""
  v = item.get(key) if isinstance(item, dict) else None
  if isinstance(v, bool) or not isinstance(v, (int, str)) or v == "":
    raise ValueError(f"{where}: needs a {key!r} (int or non-empty str), got {v!r:.80}")
  return v


def read_benchmark(fmt: str, path: str) -> list[dict]:
  """The prompts of a benchmark's own file as eval items {"id", "prompt", "source": the file's
  item}: AlpacaEval's JSON list of {instruction, ...}; Arena-Hard's question.jsonl of
  {question_id, turns: [{content}]} (one turn); IFEval's input_data.jsonl of {key, prompt}."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"eval.benchmarks: {path}: no such file (format {fmt})")
  items = []
  if fmt == "alpaca_eval":
    with open(path, encoding="utf-8") as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
      raise ValueError(f"{path}: AlpacaEval's file is a JSON list of {{instruction, ...}}, got a "
                       f"{type(data).__name__}")
    for i, x in enumerate(data):
      items.append({"id": str(i), "prompt": _field(x, "instruction", f"{path} item {i}"),
                    "source": x})
  elif fmt == "arena_hard":
    for n, x in _jsonl(path):
      where = f"{path}:{n}"
      qid = _key(x, "question_id", where)
      turns = _field(x, "turns", where, list)
      if len(turns) != 1:  # a later turn needs the model's answer to the first: not supported
        raise ValueError(f"{where}: question {qid!r} has {len(turns)} turns; only single-turn "
                         "questions are supported")
      items.append({"id": str(qid), "prompt": _field(turns[0], "content", f"{where} turns[0]"),
                    "source": x})
  elif fmt == "ifeval":
    for n, x in _jsonl(path):
      key = _key(x, "key", f"{path}:{n}")
      items.append({"id": str(key), "prompt": _field(x, "prompt", f"{path}:{n}"), "source": x})
  else:
    raise ValueError(f"eval.benchmarks: unknown format {fmt!r}; known: alpaca_eval, arena_hard, "
                     "ifeval")
  ids = [x["id"] for x in items]
  if len(set(ids)) != len(ids):
    dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
    raise ValueError(f"{path}: duplicated ids {dup}")
  if not items:
    raise ValueError(f"{path}: no prompts")
  return items


def token_len(result) -> int:
  """An answer's length in the student's tokens (a sampling GenerationResult): the tokens it
  generated, less the stop token that ended it (no part of the text). A stop string's tokens are
  already cut from token_ids. Arena-Hard's show_result.py reads it as each answer's `token_len`."""
  return len(result.token_ids) - (1 if isinstance(result.stop, int) and result.token_ids else 0)


def export(rows: Sequence[Mapping[str, Any]], model_name: str, out_dir: str,
           formats: Sequence[str]) -> dict[str, str]:
  """Writes the generations in each requested format; returns {format: path}. arena_hard needs
  each row's `token_len` (token_len() of its generation), which Arena-Hard's answer files hold."""
  bad = [f for f in formats if f not in EXPORTS]
  if bad:
    raise ValueError(f"eval.exports: unknown formats {bad}; known: {list(EXPORTS)}")
  if "arena_hard" in formats:
    for r in rows:
      n = r.get("token_len")
      if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"arena_hard export: row {r.get('id')!r} needs a 'token_len' (its "
                         f"answer's token count, a non-negative int), got {n!r:.80}")
  fs.makedirs(out_dir)
  paths = {}
  for f in formats:
    if f == "jsonl":
      path = fs.join(out_dir, "generations.jsonl")
      atomic_write_text(path, "".join(io_dumps(r) + "\n" for r in rows))
    elif f == "ifeval":  # IFEval's evaluation script reads {"prompt", "response"} lines
      path = fs.join(out_dir, "ifeval_responses.jsonl")
      atomic_write_text(path, "".join(io_dumps({"prompt": r["prompt"], "response": r["response"]})
                                      + "\n" for r in rows))
    elif f == "alpaca_eval":  # a JSON list of {instruction, output, generator}
      path = fs.join(out_dir, "alpaca_eval_outputs.json")
      # a benchmark item keeps its own fields (AlpacaEval's `dataset` names its subset)
      atomic_write_json(path, [{"dataset": "persyn_jax", **r.get("source", {}),
                                "instruction": r["prompt"], "output": r["response"],
                                "generator": model_name} for r in rows])
    else:  # arena_hard: model_answer/<model>.jsonl, one answer object per question
      # Arena-Hard names a model by its file's name and by model_id (the judgments' model, which
      # show_result looks up among the files): one name, the file's
      model_id = safe_name(model_name, "model name")
      path = fs.join(out_dir, "arena_hard", f"{model_id}.jsonl")
      lines = [io_dumps({"question_id": r.get("source", {}).get("question_id", r["id"]),
                           "answer_id": uuid.uuid5(uuid.NAMESPACE_URL,
                           f"{model_name}/{r['id']}").hex, "model_id": model_id,
                           "choices": [{"index": 0, "turns": [{"content": r["response"],
                                                               "token_len": r["token_len"]}]}],
                           "tstamp": time.time()}) for r in rows]
      atomic_write_text(path, "\n".join(lines) + "\n")
    paths[f] = path
  return paths


def prompts_for_model(prompts: Sequence[Mapping[str, Any]]):
  return [prompt_of(p) for p in prompts]
