"""--dry-run finds every problem that would fail a stage later, all at once, before any work
(persyn_jax.preflight), and a real run checks them again first; --help lists every config key."""
import dataclasses
import importlib.util
import os
import subprocess
import sys
import typing

import pytest

from persyn_jax import config as C
from persyn_jax import preflight
from persyn_jax.run_config import STAGES, RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCT = os.path.join(ROOT, "configs", "instruct.yaml")
MATH = os.path.join(ROOT, "configs", "math.yaml")


def train(*args, env=None, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "persyn_jax.train", *args], capture_output=True,
                        text=True, timeout=300, cwd=cwd, env={**os.environ, **(env or {})})


def load(path, *sets):
  return C.load(RunConfig, path, list(sets))


def test_the_shipped_paper_configs_have_no_problem():
  for path in (INSTRUCT, MATH):
    assert preflight.problems(load(path), STAGES) == [], path


def test_eval_0_with_the_eval_stage_is_refused_before_any_work(tmp_path):
  run_dir = tmp_path / "run"
  out = train("--config", INSTRUCT, "--set", "prompts.eval=0", "--dry-run")
  assert out.returncode == 2
  assert "prompts.eval=0.0 leaves no held-out prompts, but the eval stage is selected" in out.stderr
  # the same config without the eval stage is fine
  assert train("--config", INSTRUCT, "--set", "prompts.eval=0", "--dry-run",
               "--stages", "probe,score,router,route,generate,sft").returncode == 0
  # a real run refuses it before its first stage: nothing is downloaded, no run dir is made
  out = train("--config", INSTRUCT, "--set", "prompts.eval=0", "--run-dir", str(run_dir),
              env={"HF_HUB_OFFLINE": "1"})
  assert out.returncode == 2 and "prompts.eval=0.0" in out.stderr
  assert not run_dir.exists()


def test_every_problem_is_listed_at_once():
  cfg = load(MATH, "prompts.source.reference_field=null", "prompts.eval=0",
             "router.backbone=", "policies.strong=gpt-x", "sampling.stop_token_ids=[151643,999999]",
             "student.family=mistral", "eval.exports=[jsonl,helm]",
             "eval.sampling.stop_token_ids=[151645,200000]")
  found = preflight.problems(cfg, STAGES)
  want = ["scoring.quality=verifier (math) needs reference answers",
          "router.backbone is empty",
          "policies.strong='gpt-x' is not a teacher",
          "compare has family_strong, but no teacher shares the student's family ('mistral')",
          "sampling.stop_token_ids [999999] are outside the vocabulary of teacher "
          "'qwen2.5-math-1.5b'",
          "eval.sampling.stop_token_ids [200000] are outside the vocabulary of student "
          "'qwen2.5-1.5b'",
          "prompts.eval=0.0 leaves no held-out prompts",
          "eval.verifier='math' needs reference answers",
          "eval.exports: unknown formats ['helm']"]
  for w in want:
    assert any(w in p for p in found), (w, found)
  # the CLI prints them all and exits 2
  sets = ["prompts.source.reference_field=null", "prompts.eval=0", "router.backbone=",
          "policies.strong=gpt-x"]
  found = preflight.problems(load(MATH, *sets), STAGES)
  assert len(found) == 5
  out = train("--config", MATH, "--dry-run", *[a for s in sets for a in ("--set", s)])
  assert out.returncode == 2
  assert "5 problem(s) would fail this run:\n" + "\n".join(f"  - {p}" for p in found) in out.stderr


def test_reward_model_quality_needs_a_reward_model_and_paths_must_be_models(tmp_path):
  cfg = load(INSTRUCT, "scoring.reward_model=", f"student.path={tmp_path}/nowhere")
  found = preflight.problems(cfg, STAGES)
  assert any(p.startswith("scoring.quality=reward_model but scoring.reward_model is empty")
             for p in found)
  assert any(f"student 'qwen2.5-0.5b': path '{tmp_path}/nowhere' is neither a directory nor a "
             "hub id" in p for p in found)
  # the score stage is what needs it: a probe-only run has no such problem
  assert preflight.problems(load(INSTRUCT, "scoring.reward_model="), ["probe"]) == []


def test_missing_prompt_file_and_family_strong_by_name():
  cfg = load(MATH, "prompts.source.path=/no/such/prompts.jsonl", "prompts.source.format=jsonl",
             "student.family=mistral", "policies.family_strong=qwq-32b")
  found = preflight.problems(cfg, STAGES)
  assert found == ["prompts.source.path='/no/such/prompts.jsonl': no such file or directory"]


def served_teacher_sets(env_name="DRY_RUN_TEACHER_KEY"):
  """--set teachers=[...]: one teacher on a server, one in-process."""
  return ["--set", f"teachers=[{{name: served, path: Qwen/Qwen2.5-72B-Instruct, family: qwen, "
          f"engine: openai, openai: {{url: 'http://10.0.0.5:8000/v1', model: qwen-72b, "
          f"api_key_env: {env_name}}}}}, {{name: small, path: Qwen/Qwen2.5-1.5B-Instruct, "
          f"family: qwen}}]"]


def test_a_served_teacher_plans_no_device_memory_and_needs_its_key_variable():
  env = {k: v for k, v in os.environ.items() if k != "DRY_RUN_TEACHER_KEY"}
  out = subprocess.run([sys.executable, "-m", "persyn_jax.train", "--config", INSTRUCT,
                        "--dry-run", *served_teacher_sets()], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=env)
  assert out.returncode == 2
  assert ("teacher 'served': openai.api_key_env='DRY_RUN_TEACHER_KEY' but that environment "
          "variable is not set") in out.stderr
  out = train("--config", INSTRUCT, "--dry-run", *served_teacher_sets(),
              env={"DRY_RUN_TEACHER_KEY": "sk-dry-run-secret"})
  assert out.returncode == 0, out.stderr
  device = out.stdout.split("memory per device")[1].split("host memory")[0]
  rows = [line for line in device.splitlines() if "probe/generate" in line]
  assert [r.split()[1] for r in rows] == ["small"]  # no memory row for the served teacher
  assert "http://10.0.0.5:8000/v1 (engine openai: no device memory)" in out.stdout
  assert "sk-dry-run-secret" not in out.stdout + out.stderr


def test_a_bad_engine_setting_names_the_teacher():
  out = train("--config", INSTRUCT, "--dry-run", "--set",
              "teachers=[{name: t, path: Qwen/Qwen2.5-7B-Instruct, engine: openai}]")
  assert out.returncode == 2
  assert "model 't'.engine is 'openai' but model 't'.openai (url, model, ...) is missing" in \
      out.stderr


def config_keys(cls, prefix=""):
  """Every dotted key of a config dataclass, independently of train.config_help's walk."""
  keys = []
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    keys.append(prefix + f.name)
    t = hints[f.name]
    inner = [a for a in (t, *typing.get_args(t)) if dataclasses.is_dataclass(a)]
    if inner:
      sep = "[]." if typing.get_origin(t) is tuple else "."
      keys += config_keys(inner[0], prefix + f.name + sep)
  return keys


@pytest.mark.parametrize("flag", ["--help", "--help-config"])
def test_help_lists_every_config_key_with_type_and_default(flag):
  out = train(flag)
  assert out.returncode == 0, out.stderr
  lines = {line.split()[0]: line for line in out.stdout.splitlines()
           if line.startswith("  ") and "default:" in line}
  keys = config_keys(RunConfig)
  assert len(keys) > 100
  assert [k for k in keys if k not in lines] == []
  assert "'jax' | 'openai'" in lines["teachers[].engine"]
  assert lines["teachers[].engine"].endswith('default: "jax"')
  assert lines["teachers[].openai.url"].endswith("default: required")
  assert lines["sampling.temperature"].split()[1:] == ["float", "default:", "0.7"]
  assert lines["eval.base_student"].endswith("default: true")
  assert lines["sampling.stop_token_ids"].split()[1:5] == ["list", "of", "int", "|"]


def test_the_preflight_reads_table_is_the_graphs():
  """preflight.READS is a copy (the dry run imports no stage module): it must match GRAPH."""
  from persyn_jax.stages import GRAPH
  assert preflight.READS == {s.name: s.reads for s in GRAPH}


def test_a_stage_whose_input_stage_is_neither_selected_nor_done_is_refused(tmp_path):
  run_dir = tmp_path / "run"
  out = train("--config", INSTRUCT, "--dry-run", "--stages", "eval", "--run-dir", str(run_dir))
  assert out.returncode == 2
  assert (f"stage eval reads stage sft, which is not selected and has not finished in {run_dir} "
          "(no sft/DONE.json): add sft to --stages") in out.stderr
  # a real run refuses it before any work (it used to evaluate the base student, then fail)
  out = train("--config", INSTRUCT, "--stages", "eval", "--run-dir", str(run_dir),
              env={"HF_HUB_OFFLINE": "1"})
  assert out.returncode == 2 and "add sft to --stages" in out.stderr
  assert not run_dir.exists()
  # selected, or finished earlier: fine
  cfg = load(INSTRUCT, f"run_dir={run_dir}")
  assert preflight.problems(cfg, STAGES) == []
  assert [p.split(",")[0] for p in preflight.problems(cfg, ["sft", "eval"])] == [
      "stage sft reads stage generate"]
  (run_dir / "sft").mkdir(parents=True)
  (run_dir / "sft" / "DONE.json").write_text("{}")
  assert preflight.problems(cfg, ["eval"]) == []
  assert preflight.problems(load(INSTRUCT, "run_dir=gs://bucket/run"), ["eval"]) == []


def test_a_run_dir_that_is_a_file_is_refused_by_the_dry_run(tmp_path):
  f = tmp_path / "afile"
  f.write_text("x")
  out = train("--config", INSTRUCT, "--dry-run", "--run-dir", str(f))
  assert out.returncode == 2
  assert (f"{f}: the run directory is a file, not a directory (use another --run-dir, or move "
          "the file away)") in out.stderr


def test_a_missing_benchmark_file_is_refused_before_sft(tmp_path):
  cfg = load(INSTRUCT, f"eval.benchmarks=[{{name: ae, format: alpaca_eval, "
                       f"path: {tmp_path}/nope.json}}, {{name: gs, format: ifeval, "
                       f"path: gs://b/input_data.jsonl}}]")
  assert preflight.problems(cfg, STAGES) == [
      f"eval.benchmarks 'ae': path='{tmp_path}/nope.json': no such file or directory"]
  assert preflight.problems(cfg, ["probe"]) == []  # only the eval stage reads it


def test_wandb_without_the_package_is_bad_input():
  if importlib.util.find_spec("wandb") is not None:
    pytest.skip("checks the error when the wandb extra is missing")
  out = train("--config", INSTRUCT, "--dry-run", "--set", "wandb={project: p, mode: offline}")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert 'pip install "persyn-jax[wandb]"' in out.stderr
  # the preflight names it too (for a config built without the load-time check)
  from persyn_jax.metrics import WandbConfig
  cfg = load(INSTRUCT)
  object.__setattr__(cfg, "wandb", WandbConfig(project="p", mode="offline"))
  assert any(p.startswith("wandb.mode=offline needs the wandb package") and
             "persyn-jax[wandb]" in p for p in preflight.problems(cfg, STAGES))


@pytest.mark.parametrize("n", ["0", "-3", "x"])
def test_num_prompts_must_be_a_positive_count(n, capsys):
  from persyn_jax import train
  with pytest.raises(SystemExit) as e:
    train.parse_args(["--dry-run", "--num-prompts", n])
  assert e.value.code == 2 and "argument --num-prompts" in capsys.readouterr().err
  assert train.parse_args(["--num-prompts", "1"]).num_prompts == 1


def test_an_empty_stage_list_is_refused_and_repeated_names_are_deduped(capsys):
  from persyn_jax import train
  assert train.main(["--dry-run", "--stages", ","]) == 2
  assert capsys.readouterr().err.startswith("error: ConfigError: --stages ',' names no stage; "
                                            f"stages: {','.join(STAGES)}")
  assert train._stage_list("eval, sft,eval,,sft") == ("eval", "sft")


def test_the_stages_help_lists_every_stage(capsys):
  from persyn_jax import train
  with pytest.raises(SystemExit):
    train.parse_args(["--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert f"comma-separated subset of {','.join(STAGES)}" in out


def test_an_eval_count_past_the_prompt_count_names_prompts_eval():
  """It blamed prompts.probe, against a negative count of training prompts."""
  found = preflight.problems(load(INSTRUCT, "prompts.eval=100", "prompts.probe=16"), ["probe"],
                             num_prompts=64)
  assert found == ["prompts.eval=100 leaves no training prompts: the prompt set has 64 (set a "
                   "smaller count, or a fraction)"]
  found = preflight.problems(load(INSTRUCT, "prompts.eval=32", "prompts.probe=40"), ["probe"],
                             num_prompts=64)
  assert found == ["prompts.probe=40 exceeds the 32 training prompts"]
  assert preflight.problems(load(INSTRUCT, "prompts.eval=32", "prompts.probe=32"), ["probe"],
                            num_prompts=64) == []
