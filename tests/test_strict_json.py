"""Every JSON file the pipeline writes is strict JSON: json.dumps would write a NaN or infinity as
the tokens NaN / Infinity, which JSON lacks (jq, JavaScript's JSON.parse and most parsers refuse
the whole file). They are written as null, and the readers of those files take the null."""
import json
import math

import numpy as np

from persyn_jax import evaluate as ev
from persyn_jax import io_utils as io
from persyn_jax.report.assemble import router_summary, summarize
from persyn_jax.report.markdown import markdown
from persyn_jax.report.study import plot_gains, study_markdown
from persyn_jax.stages.study import compare_signal


def strict(text: str):
  def refuse(token):
    raise ValueError(f"non-JSON token {token}")
  return json.loads(text, parse_constant=refuse)


def test_atomic_write_json_writes_non_finite_numbers_as_null(tmp_path):
  p = str(tmp_path / "x.json")
  io.atomic_write_json(p, {"loss": float("nan"), "best": math.inf, "f32": np.float32("-inf"),
                           "rows": np.array([1.5, np.nan]), "pair": (np.float64(2.0), None),
                           "n": np.int64(3), "ok": np.bool_(True)})
  assert strict(open(p).read()) == {"loss": None, "best": None, "f32": None, "rows": [1.5, None],
                                    "pair": [2.0, None], "n": 3, "ok": True}


def test_finite_values_are_written_as_before(tmp_path):
  obj = {"b": [1, 2.5, "x", None, {"c": (True, 1e300)}], "a": -0.0}
  p = str(tmp_path / "x.json")
  io.atomic_write_json(p, obj, indent=1, sort_keys=True)
  assert open(p).read() == json.dumps(obj, indent=1, sort_keys=True) + "\n"


def test_router_eval_without_held_out_pairs_is_strict_and_the_report_reads_it(tmp_path):
  """A router whose held-out prompts hold no pair (all tied) has no held-out loss nor pairwise
  accuracy; a held-out set of unroutable prompts has no Hit@1 either."""
  p = str(tmp_path / "router_eval.json")
  io.atomic_write_json(p, {"held_out": {"hit@1": float("nan"), "hit@3": float("nan"),
                                        "pairwise_accuracy": float("nan"),
                                        "random_hit@1": float("nan"), "loss": float("nan")},
                           "held_out_prompts": 2, "pairs": {"pairs": 0, "ties": 3}})
  r = router_summary(strict(open(p).read()))
  assert r["hit@1"] is None and r["pairwise_accuracy"] is None
  report = {"eval": {"persyn": {"score": 0.5}, "strong": {"score": 0.25}}, "eval_metric": "accuracy",
            "shares": {"oracle best (probe)": {"a": 1.0}}, "router": r}
  text = summarize(report)
  assert "PerSyn vs the strongest teacher: +0.250." in text and "Router Hit@1" not in text
  r["hit@1"] = 0.5  # a Hit@1 with an undefined random baseline
  assert "Router Hit@1 0.50 (random n/a)." in summarize(report)


def test_a_report_with_null_numbers_renders():
  report = {"run": "t", "eval_metric": "n", "eval": {"strong": {"score": None, "n": 3, "by_kind": {}}},
            "costs": {"policies": {}, "teachers": {}, "probe_generations": 0,
                      "routed_generations": 0, "route_then_generate": {"generations": 0},
                      "generate_then_select": {"generations": 0}},
            "teachers": ["a"], "shares": {}, "probe": {"teachers": {}, "by_kind": {}},
            "router": {"hit@1": None, "pairs": 0}}
  md = markdown(report)
  assert "| hit@1 | n/a |" in md and "| strong | n/a |" in md


def test_study_json_with_undefined_correlations_is_strict_and_renders(tmp_path):
  """Equal gains have no rank correlation (NaN): study.json holds null, and the report's section
  and heatmap read it."""
  gains = {"a": {"x": 0.1, "all": 0.1}, "b": {"x": 0.1, "all": None}}
  sig = compare_signal({"a": {"x": 0.5}, "b": {"x": 0.5}}, {t: {"x": 0.1} for t in gains}, ["x"])
  assert math.isnan(sig["rank_correlation"])
  study = {"teachers": ["a", "b"], "categories": ["x"], "category_field": "kind", "eval_prompts": 4,
           "probe_examples": {"a": 2, "b": 2}, "accuracy": {"base_student": {"x": 0.5, "all": 0.5}},
           "gain": gains, "best_by_gain": {"x": ["a", "b"]},
           "signals": {n: {**sig, "alpha": 0.5} for n in ("quality", "learnability", "combined")}}
  p = str(tmp_path / "study.json")
  io.atomic_write_json(p, study)
  back = strict(open(p).read())
  assert back["signals"]["combined"]["rank_correlation"] is None
  assert "a, b (n/a)" in study_markdown(back)
  plot_gains({**back, "gain": {"a": {"x": 0.1}, "b": {"x": None}}}, str(tmp_path / "gain.png"))


def test_the_generations_export_is_strict_json_lines(tmp_path):
  rows = [{"id": "1", "prompt": "p", "response": "r", "token_len": 2, "correct": float("nan")}]
  ev.export(rows, "m", str(tmp_path), ["jsonl"])
  assert [strict(line)["correct"] for line in open(tmp_path / "generations.jsonl")] == [None]
