"""Eval on the benchmarks' own prompt files (AlpacaEval, Arena-Hard, IFEval), read locally, and the
answers written in the files those tools read."""
import glob
import json
import os

import pytest

from persyn_jax import config as C
from persyn_jax import evaluate as ev
from persyn_jax.run_config import BenchmarkConfig, RunConfig

ALPACA = [{"instruction": "Name a colour.", "output": "reference answer", "generator": "gpt4",
           "dataset": "helpful_base"},
          {"instruction": "Count to three.", "dataset": "koala"}]
ARENA = [{"question_id": "328c149ed45a41c0b9d6f14659e63599", "category": "arena-hard-v0.1",
          "cluster": "ABC", "turns": [{"content": "Write a haiku about rain."}]},
         {"question_id": 17, "turns": [{"content": "What is 7 * 6?"}]}]
IFEVAL = [{"key": 1000, "prompt": "Write a 2 sentence story. Use no commas.",
           "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
          {"key": 1001, "prompt": "Answer in lowercase: what is the capital of France?",
           "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}]


def write_files(d):
  paths = {"alpaca_eval": d / "alpaca_eval.json", "arena_hard": d / "question.jsonl",
           "ifeval": d / "input_data.jsonl"}
  paths["alpaca_eval"].write_text(json.dumps(ALPACA))
  paths["arena_hard"].write_text("".join(json.dumps(q) + "\n" for q in ARENA))
  paths["ifeval"].write_text("".join(json.dumps(q) + "\n" for q in IFEVAL) + "\n")  # a blank line
  return {k: str(v) for k, v in paths.items()}


def test_each_format_reads_its_prompts_in_file_order(tmp_path):
  paths = write_files(tmp_path)
  alpaca = ev.read_benchmark("alpaca_eval", paths["alpaca_eval"])
  assert [(x["id"], x["prompt"]) for x in alpaca] == [("0", "Name a colour."),
                                                      ("1", "Count to three.")]
  arena = ev.read_benchmark("arena_hard", paths["arena_hard"])
  assert [(x["id"], x["prompt"]) for x in arena] == [
      ("328c149ed45a41c0b9d6f14659e63599", "Write a haiku about rain."), ("17", "What is 7 * 6?")]
  ifeval = ev.read_benchmark("ifeval", paths["ifeval"])
  assert [(x["id"], x["prompt"]) for x in ifeval] == [("1000", IFEVAL[0]["prompt"]),
                                                      ("1001", IFEVAL[1]["prompt"])]
  assert ifeval[0]["source"] == IFEVAL[0]


@pytest.mark.parametrize("fmt, content, match", [
    ("alpaca_eval", json.dumps({"instruction": "x"}), "a JSON list"),
    ("alpaca_eval", json.dumps([{"instruction": "x"}, {"input": "y"}]), r"item 1: .*'instruction'"),
    ("arena_hard", '{"question_id": "a", "turns": [{"content": "x"}, {"content": "y"}]}\n',
     "question 'a' has 2 turns"),
    ("arena_hard", '{"question_id": "a", "turns": [{"content": "x"}]}\n{oops\n', r":2: not a JSON"),
    ("ifeval", '{"prompt": "x"}\n', r":1: needs a 'key'"),
    ("ifeval", '{"key": 1, "prompt": "x"}\n{"key": 1, "prompt": "y"}\n', r"duplicated ids \['1'\]"),
])
def test_a_bad_benchmark_file_is_named_with_the_item(tmp_path, fmt, content, match):
  path = tmp_path / "bench"
  path.write_text(content)
  with pytest.raises(ValueError, match=match) as e:
    ev.read_benchmark(fmt, str(path))
  assert str(path) in str(e.value)


def test_a_missing_benchmark_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.json"):
    ev.read_benchmark("alpaca_eval", str(tmp_path / "nowhere.json"))


def test_the_config_refuses_an_unknown_format_and_a_reused_name():
  with pytest.raises(ValueError, match="format='mmlu'"):
    BenchmarkConfig("x", "mmlu", "/p")
  with pytest.raises(ValueError, match=r"names \['a'\] are used twice"):
    C.from_dict(RunConfig, {"eval": {"benchmarks": [
        {"name": "a", "format": "ifeval", "path": "/p"},
        {"name": "a", "format": "alpaca_eval", "path": "/q"}]}})


def answered(items, prefix="answer to "):
  """Each item answered, with a made-up token count (the eval stage's is evaluate.token_len)."""
  return [{**x, "response": prefix + x["prompt"], "token_len": 10 + i}
          for i, x in enumerate(items)]


def arena_hard_lengths(answer_dir: str) -> dict[str, int]:
  """Each model's summed answer length, read as Arena-Hard's show_result.py reads it (its
  load_model_answers, then turns[0]["token_len"], else conv_metadata["token_len"])."""
  out = {}
  for path in sorted(glob.glob(os.path.join(answer_dir, "*.jsonl"))):
    with open(path, encoding="utf-8") as f:
      answers = {a["question_id"]: a for a in map(json.loads, f)}
    length = 0
    for row in answers.values():
      turn = row["choices"][0]["turns"][0]
      length += turn["token_len"] if "token_len" in turn else row["conv_metadata"]["token_len"]
    out[os.path.basename(path)[:-len(".jsonl")]] = length
  return out


def test_answers_are_written_as_each_tool_reads_them(tmp_path):
  paths = write_files(tmp_path)
  out = tmp_path / "out"
  model = "toy-persyn"

  p = ev.export(answered(ev.read_benchmark("alpaca_eval", paths["alpaca_eval"])), model,
                str(out / "ae"), ["alpaca_eval"])["alpaca_eval"]
  got = json.load(open(p))
  # AlpacaEval matches outputs to its set by instruction; dataset is kept, output/generator are ours
  assert [(g["instruction"], g["dataset"], g["output"], g["generator"]) for g in got] == [
      ("Name a colour.", "helpful_base", "answer to Name a colour.", model),
      ("Count to three.", "koala", "answer to Count to three.", model)]

  p = ev.export(answered(ev.read_benchmark("arena_hard", paths["arena_hard"])), model,
                str(out / "ah"), ["arena_hard"])["arena_hard"]
  assert os.path.basename(p) == f"{model}.jsonl"
  lines = [json.loads(x) for x in open(p)]
  assert [x["question_id"] for x in lines] == [q["question_id"] for q in ARENA]  # types kept
  assert [x["choices"][0]["turns"][0]["content"] for x in lines] == [
      "answer to " + q["turns"][0]["content"] for q in ARENA]
  assert {x["model_id"] for x in lines} == {model}
  assert len({x["answer_id"] for x in lines}) == 2
  # show_result.py's average length reads each answer's token_len (a KeyError before)
  assert [x["choices"][0]["turns"][0]["token_len"] for x in lines] == [10, 11]
  assert arena_hard_lengths(os.path.dirname(p)) == {model: 21}

  p = ev.export(answered(ev.read_benchmark("ifeval", paths["ifeval"])), model, str(out / "if"),
                ["ifeval"])["ifeval"]
  # IFEval's evaluation looks responses up by the exact prompt text
  assert [json.loads(x) for x in open(p)] == [
      {"prompt": q["prompt"], "response": "answer to " + q["prompt"]} for q in IFEVAL]


def test_an_arena_hard_model_id_is_its_answer_file_name(tmp_path):
  """Arena-Hard names a model by its answer file (load_model_answers: the name less .jsonl) and
  by its answers' model_id (gen_judgment writes it as the judgment's model; show_result looks
  that model up among the answer files for its length, and keys style control by model_id): the
  two must agree, also for a run name that is no file name as is."""
  model = "my run/2-persyn"
  p = ev.export(answered(ev.read_benchmark("arena_hard", write_files(tmp_path)["arena_hard"])),
                model, str(tmp_path / "out"), ["arena_hard"])["arena_hard"]
  stem = os.path.basename(p)[:-len(".jsonl")]
  assert stem == "my_run_2-persyn"
  lines = [json.loads(x) for x in open(p)]
  assert {x["model_id"] for x in lines} == {stem}
  judged = {x["model_id"] for x in lines}  # gen_judgment's "model" of each judgment
  assert {m: arena_hard_lengths(os.path.dirname(p)).get(m) for m in judged} == {stem: 21}


def test_an_arena_hard_answer_without_its_token_count_is_refused(tmp_path):
  rows = answered(ev.read_benchmark("arena_hard", write_files(tmp_path)["arena_hard"]))
  del rows[1]["token_len"]
  with pytest.raises(ValueError, match=r"row '17' needs a 'token_len'"):
    ev.export(rows, "m", str(tmp_path / "out"), ["arena_hard"])
  assert not os.path.exists(tmp_path / "out" / "arena_hard")


def test_token_len_counts_the_answer_tokens_without_the_stop_token():
  from persyn_jax.sampling.config import GenerationResult
  def result(ids, reason, stop):
    return GenerationResult(0, 0, "text", tuple(ids), reason, 3, len(ids), stop)
  assert ev.token_len(result([5, 6, 7, 2], "stop", 2)) == 3     # EOS ended it: not counted
  assert ev.token_len(result([5, 6], "stop", "###")) == 2       # a stop string: already cut
  assert ev.token_len(result([5, 6, 7, 8], "length", None)) == 4
  assert ev.token_len(result([], "skipped", None)) == 0


def test_the_eval_stage_answers_each_benchmark_with_each_student(tmp_path, model_dir):
  from persyn_jax import models
  from persyn_jax.sampling import generate
  from persyn_jax.stages import eval as eval_stage
  from persyn_jax.stages.context import Context

  path, _ = model_dir("qwen2")
  files = write_files(tmp_path)
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n"
                             for i in range(4)))
  cfg = C.from_dict(RunConfig, {
      "world": None, "run_dir": str(tmp_path / "run"), "compare": [],
      "teachers": [{"name": "t", "path": path}],
      "student": {"name": "s", "path": path, "dtype": "float32"},
      "prompts": {"source": {"path": str(prompts)}, "probe": 1.0, "eval": 0},
      "eval": {"verifier": None, "sampling": {"max_new_tokens": 6, "batch_size": 8},
               "benchmarks": [{"name": n, "format": f, "path": p} for n, f, p in [
                   ("ae", "alpaca_eval", files["alpaca_eval"]),
                   ("ah", "arena_hard", files["arena_hard"]),
                   ("if", "ifeval", files["ifeval"])]]}})
  ctx = Context(cfg, log=lambda m: None)
  out = eval_stage.run(ctx)
  assert set(out) == {"base_student"}
  bench = out["base_student"]["benchmarks"]
  assert {k: v["n"] for k, v in bench.items()} == {"ae": 2, "ah": 2, "if": 2}

  # the exported answers are the student's greedy answers to the benchmark prompts
  model, tok = models.load_model(path, dtype="float32")
  want = {x["prompt"]: r.text for x, r in zip(IFEVAL, generate(
      model, tok, [x["prompt"] for x in IFEVAL], cfg.eval.sampling))}
  got = [json.loads(x) for x in open(bench["if"]["file"])]
  assert {g["prompt"]: g["response"] for g in got} == want
  assert bench["if"]["file"] == ctx.path("eval", "base_student", "benchmarks", "if",
                                         "ifeval_responses.jsonl")
  assert len(json.load(open(bench["ae"]["file"]))) == 2
  # Arena-Hard's token_len: the student's tokens of each answer
  lens = {x["turns"][0]["content"]: ev.token_len(r) for x, r in zip(ARENA, generate(
      model, tok, [x["turns"][0]["content"] for x in ARENA], cfg.eval.sampling))}
  lines = [json.loads(x) for x in open(bench["ah"]["file"])]
  assert len(lines) == 2
  assert [x["choices"][0]["turns"][0]["token_len"] for x in lines] == [
      lens[q["turns"][0]["content"]] for q in ARENA]
  assert all(0 <= n <= cfg.eval.sampling.max_new_tokens for n in lens.values())


def test_per_prompt_correctness_keeps_a_verifiers_partial_credit():
  """eval.json's `correct` (the report's bootstrap reads it) is each prompt's verifier score: its
  mean is the accuracy, also for a verifier that gives partial credit (not truncated to 0)."""
  from persyn_jax import verify
  if "partial_credit_test" not in verify.verifier_names():
    verify.register_verifier("partial_credit_test",
                             lambda r, a: {"right": 1.0, "half": 0.5}.get(r.strip(), 0.0))
  prompts = [{"id": str(i), "prompt": "q", "reference": "x", "kind": k}
             for i, k in enumerate(["a", "a", "b", "b"])]
  out = ev.score_generations(prompts, ["right", "half", "wrong", "half"],
                             verifier="partial_credit_test")
  assert out["correct"] == [1, 0.5, 0, 0.5] and isinstance(out["correct"][0], int)
  assert out["score"] == sum(out["correct"]) / 4 == 0.5
  assert out["by_kind"] == {"a": 0.75, "b": 0.25}
  math_out = ev.score_generations(prompts[:2], ["#### 3", "#### 4"], verifier="math")
  assert math_out["correct"] == [0, 0] and ev.score_generations(
      [dict(prompts[0], reference="3")], ["#### 3"], verifier="math")["correct"] == [1]


def test_a_missing_response_is_refused_not_dropped_from_the_accuracy():
  """score_generations paired prompts and responses with zip: one response short, the last
  prompt vanished from n, the accuracy's denominator and the per-prompt vector the report
  bootstraps, and the score read 1/1 for 1 right of 2."""
  prompts = [{"id": "a", "prompt": "q", "reference": "3"}, {"id": "b", "prompt": "q", "reference": "4"}]
  with pytest.raises(ValueError, match="1 responses for 2 eval prompts"):
    ev.score_generations(prompts, ["#### 3"], verifier="math")
  with pytest.raises(ValueError, match="3 responses for 2 eval prompts"):
    ev.score_generations(prompts, ["#### 3", "#### 4", "#### 5"], verifier="math")
  assert ev.score_generations(prompts, ["#### 3", "#### 5"], verifier="math")["correct"] == [1, 0]
