"""Held-out evaluation of a student: greedy answers scored by a verifier, and exports of the
generations in the formats judge-based benchmarks read (IFEval, AlpacaEval, Arena-Hard)."""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, Mapping, Sequence

from persyn_jax.io_utils import atomic_write_json, atomic_write_text, safe_name
from persyn_jax.sampling.records import prompt_of
from persyn_jax.verify import get_verifier

EXPORTS = ("jsonl", "alpaca_eval", "arena_hard", "ifeval")


def score_generations(prompts: Sequence[Mapping[str, Any]], texts: Sequence[str], *,
                      verifier: str | None, reference_field: str = "reference") -> dict:
  """Accuracy of `texts` against the prompts' references (and per `kind`, when prompts have one)."""
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
    kinds = sorted({r["kind"] for r in rows if "kind" in r})
    out["by_kind"] = {k: sum(r["correct"] for r in rows if r.get("kind") == k) /
                      max(1, sum(r.get("kind") == k for r in rows)) for k in kinds}
  return out


def export(rows: Sequence[Mapping[str, Any]], model_name: str, out_dir: str,
           formats: Sequence[str]) -> dict[str, str]:
  """Writes the generations in each requested format; returns {format: path}."""
  bad = [f for f in formats if f not in EXPORTS]
  if bad:
    raise ValueError(f"eval.exports: unknown formats {bad}; known: {list(EXPORTS)}")
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for f in formats:
    if f == "jsonl":
      path = os.path.join(out_dir, "generations.jsonl")
      atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    elif f == "ifeval":  # IFEval's evaluation script reads {"prompt", "response"} lines
      path = os.path.join(out_dir, "ifeval_responses.jsonl")
      atomic_write_text(path, "".join(json.dumps({"prompt": r["prompt"], "response": r["response"]})
                                      + "\n" for r in rows))
    elif f == "alpaca_eval":  # a JSON list of {instruction, output, generator}
      path = os.path.join(out_dir, "alpaca_eval_outputs.json")
      atomic_write_json(path, [{"instruction": r["prompt"], "output": r["response"],
                                "generator": model_name, "dataset": "persyn_jax"} for r in rows])
    else:  # arena_hard: model_answer/<model>.jsonl, one answer object per question
      path = os.path.join(out_dir, "arena_hard", f"{safe_name(model_name, 'model name')}.jsonl")
      lines = [json.dumps({"question_id": r["id"], "answer_id": uuid.uuid5(uuid.NAMESPACE_URL,
                           f"{model_name}/{r['id']}").hex, "model_id": model_name,
                           "choices": [{"index": 0, "turns": [{"content": r["response"]}]}],
                           "tstamp": time.time()}) for r in rows]
      atomic_write_text(path, "\n".join(lines) + "\n")
    paths[f] = path
  return paths


def prompts_for_model(prompts: Sequence[Mapping[str, Any]]):
  return [prompt_of(p) for p in prompts]
