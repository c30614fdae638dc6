"""generate_to_records: shards in input order, and a crashed job resumes to the same records."""
import json
import os

import pytest

from persyn_jax import models, sampling
from persyn_jax.data import shards
from persyn_jax.sampling import records as srec

# the batch shape and constants of test_sampler.py's SAMPLED config: no new compile (12 prompts,
# 3 per shard and batches of 4 rows)
CFG = sampling.SamplingConfig(max_new_tokens=32, temperature=1.0, top_k=40, top_p=0.9, seed=11,
                              stop_token_ids=(), batch_size=4, min_bucket=64)
ITEMS = [{"schema": 1, "id": f"q{i}", "prompt": text, "reference": str(i)}
         for i, text in enumerate(["hi", "what is 3 + 4?", "count to ten", "name a color",
                                   "hello world", "def f(x):", "2 + 2 =", "tell me a joke",
                                   "why?", "ok", "good morning", "list three primes"])]
ITEMS[3] = {"schema": 1, "id": "q3", "prompt": "name a color",
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "name a color"}]}


@pytest.fixture(scope="module")
def llama(model_dir):
  path, _ = model_dir("llama")
  return models.from_pretrained(path, dtype="float32")


def run(llama, out, **kw):
  model, tok = llama
  return sampling.generate_to_records(model, tok, ITEMS, CFG, str(out), "probe", teacher="t1",
                                      records_per_shard=3, progress=False, **kw)


def test_records_are_the_generations_in_input_order(llama, tmp_path):
  model, tok = llama
  manifest = run(llama, tmp_path)
  recs = list(shards.read_records(str(tmp_path), "probe"))
  assert manifest["records"] == len(recs) == len(ITEMS) and len(manifest["shards"]) == 4
  assert [r["id"] for r in recs] == [it["id"] for it in ITEMS]
  # the keys of a record job: (seed, teacher, prompt id, sample), not the prompt's position
  direct = sampling.generate(model, tok, [srec.prompt_of(it) for it in ITEMS], CFG,
                             indices=[srec.prompt_key("t1", it["id"]) for it in ITEMS])
  assert [r["response"] for r in recs] == [d.text for d in direct]
  assert recs[3]["messages"][0]["role"] == "system" and recs[5]["reference"] == "5"
  assert all(r["teacher"] == "t1" and r["provenance"]["stage"] == "probe" for r in recs)
  assert manifest["extra"]["counts"]["length"] == len(ITEMS)


def test_crash_and_resume_gives_the_uninterrupted_records(llama, tmp_path, monkeypatch):
  whole = tmp_path / "whole"
  run(llama, whole)
  crashed = tmp_path / "crashed"
  calls = []

  def failing_record(item, result, **kw):
    if item["id"] == "q7":  # the first prompt of shard 2
      raise RuntimeError("injected crash")
    return srec.default_record(item, result, **kw)

  with pytest.raises(RuntimeError, match="injected crash"):
    run(llama, crashed, make_record=failing_record)
  assert shards.complete_shards(str(crashed), "probe", 4, host=0) == {0, 1}
  mtimes = {f: os.path.getmtime(crashed / f) for f in os.listdir(crashed)
            if f.endswith(".array_record")}

  real = srec.generate
  def spy(*a, **kw):
    calls.append(list(kw["indices"]))
    return real(*a, **kw)

  monkeypatch.setattr(srec, "generate", spy)
  run(llama, crashed)
  keys = [[srec.prompt_key("t1", f"q{i}") for i in range(j, j + 3)] for j in (6, 9)]
  assert calls == keys, "finished shards must not be generated again"
  assert all(os.path.getmtime(crashed / f) == t for f, t in mtimes.items())
  assert list(shards.read_records(str(crashed), "probe")) == \
      list(shards.read_records(str(whole), "probe"))


def test_resume_with_other_inputs_is_refused(llama, tmp_path):
  model, tok = llama
  run(llama, tmp_path)
  with pytest.raises(shards.ShardError, match="config_hash"):
    sampling.generate_to_records(model, tok, ITEMS, CFG.replace(seed=3), str(tmp_path), "probe",
                                 teacher="t1", records_per_shard=3, progress=False)
  # a resume on another number of processes would lay the prompts out over hosts differently
  plan_path = tmp_path / "probe-0.plan.json"
  plan = json.loads(plan_path.read_text())
  plan_path.write_text(json.dumps(dict(plan, hosts=2, host_prompts=[0, 3])))
  with pytest.raises(shards.ShardError, match=r"other host_prompts, hosts.*rerun with 2 processes"):
    sampling.generate_to_records(model, tok, ITEMS, CFG, str(tmp_path), "probe", teacher="t1",
                                 records_per_shard=3, progress=False)
  # shards sampled under the old rule (keys by position in the job) are not resumed
  plan_path.write_text(json.dumps({k: v for k, v in plan.items() if k != "keys"}))
  with pytest.raises(shards.ShardError, match="other keys"):
    run(llama, tmp_path)
  plan_path.write_text(json.dumps(plan))
  # batch size changes no result: a job that ran out of memory may resume with a smaller one
  run_small = sampling.generate_to_records(model, tok, ITEMS, CFG.replace(batch_size=2),
                                           str(tmp_path), "probe", teacher="t1",
                                           records_per_shard=3, progress=False)
  assert run_small["records"] == len(ITEMS)


@pytest.mark.parametrize("text,why", [("{trunc", r"not JSON: Expecting property name"),
                                      ("[1]", r"a JSON list, not an object")])
def test_a_damaged_plan_is_named(llama, tmp_path, text, why):
  """A plan that is not a JSON object failed with a raw JSONDecodeError or AttributeError naming
  no file."""
  run(llama, tmp_path)
  (tmp_path / "probe-0.plan.json").write_text(text)
  with pytest.raises(shards.ShardError, match=r"probe-0\.plan\.json: the plan of an earlier run "
                                              r"of stage 'probe' is unreadable \(" + why):
    run(llama, tmp_path)


def test_skipped_prompts_are_counted_not_written(llama, tmp_path):
  model, tok = llama
  items = ITEMS[:3] + [{"schema": 1, "id": "long", "prompt": "Once upon a time " * 20}]
  manifest = sampling.generate_to_records(
      model, tok, items, CFG.replace(max_prompt_len=64, overlong="skip"), str(tmp_path), "probe",
      teacher="t1", records_per_shard=4, progress=False)
  assert manifest["records"] == 3
  assert manifest["extra"]["counts"]["skipped"] == 1
  assert manifest["extra"]["skipped_ids"] == ["long"]
  plan = json.loads((tmp_path / "probe-0.plan.json").read_text())
  assert plan["prompts"] == 4 and plan["shards"] == 1


# The paper's decoding temperature: a sample is a real draw, not the argmax.
WARM = CFG.replace(temperature=0.7, top_k=0, top_p=0.95)


def responses(llama, out, items, cfg=WARM, teacher="t1", **kw):
  model, tok = llama
  sampling.generate_to_records(model, tok, items, cfg, str(out), "probe", teacher=teacher,
                               records_per_shard=3, progress=False, **kw)
  return {r["id"]: r["response"] for r in shards.read_records(str(out), "probe")}


def test_prompt_key_is_a_stable_hash_of_teacher_and_prompt_id():
  # pinned: a new key function would silently change every run's samples
  assert srec.prompt_key("t1", "q0") == 1510722066
  assert srec.prompt_key("t1", "q0") != srec.prompt_key("t2", "q0")
  assert srec.prompt_key("t1", "q0") != srec.prompt_key("t1", "q1")
  assert 0 <= srec.prompt_key("a" * 100, 10**30) < 2**32


def test_a_prompt_gets_the_same_sample_whatever_else_the_job_asks(llama, tmp_path):
  whole = responses(llama, tmp_path / "whole", ITEMS)
  # another subset, in another order, other shards and batches: the shared prompts keep theirs
  subset = [ITEMS[i] for i in (11, 2, 7, 0, 5)]
  part = responses(llama, tmp_path / "part", subset, WARM.replace(batch_size=2))
  assert part == {i: whole[i] for i in part}
  # and the draws are real: the job is not greedy
  greedy = responses(llama, tmp_path / "greedy", ITEMS, WARM.replace(temperature=0.0))
  assert sum(whole[i] != greedy[i] for i in whole) >= len(ITEMS) // 2


def test_teachers_with_the_same_weights_draw_different_samples(llama, tmp_path):
  one = responses(llama, tmp_path / "one", ITEMS, teacher="t1")
  two = responses(llama, tmp_path / "two", ITEMS, teacher="t2")
  assert sum(one[i] != two[i] for i in one) >= len(ITEMS) - 1


def test_greedy_records_do_not_depend_on_keys(llama, tmp_path):
  model, tok = llama
  greedy = WARM.replace(temperature=0.0)
  recs = responses(llama, tmp_path, ITEMS, greedy, teacher="t9")
  direct = sampling.generate(model, tok, [srec.prompt_of(it) for it in ITEMS], greedy)
  assert [recs[it["id"]] for it in ITEMS] == [d.text for d in direct]
