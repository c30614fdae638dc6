"""A run where one teacher is served (`engine: openai`, by `python -m persyn_jax.serve` on
localhost over real HTTP) and the others run in-process: the run completes, the served teacher's
probe records equal an all in-process run's for greedy sampling apart from provenance, its cost
is the server's token counts, and the API key reaches no file of the run."""
import dataclasses
import os

import pytest

from persyn_jax.engines import OpenAIEngineConfig
from persyn_jax.stages import Run
from test_pipeline import explicit_config
from test_serve import Server

SECRET = "sk-engine-pipeline-test-9876"
# greedy, the shapes the toy config's teachers are sampled with
SETS = ["sampling.temperature=0.0", "sampling.top_p=1.0", "sampling.max_new_tokens=16",
        "compare=[persyn,strong]", "sft.epochs=1", "eval.base_student=false"]


def config(world, run_dir, served=None):
  cfg = explicit_config(world, run_dir, sets=SETS)
  if served is None:
    return cfg
  t0 = cfg.teachers[0]
  ref = dataclasses.replace(t0, engine="openai", openai=OpenAIEngineConfig(
      served.url, "tiny", api_key_env="ENGINE_PIPELINE_KEY", concurrency=4, timeout_s=120,
      retries=2, backoff_s=0.2))
  return dataclasses.replace(cfg, teachers=(ref, *cfg.teachers[1:]))


@pytest.fixture(scope="module")
def served(tiny_world, tmp_path_factory):
  name, path, _ = tiny_world.teachers[0]
  cfg = explicit_config(tiny_world, "unused", sets=SETS).sampling
  s = Server(path, str(tmp_path_factory.mktemp("serve") / "server.log"),
             env={"ENGINE_PIPELINE_KEY": SECRET},
             # the server's prompt shapes are the run's: the same buckets, the same answers
             extra=["--api-key-env", "ENGINE_PIPELINE_KEY", "--max-prompt-len",
                    str(cfg.max_prompt_len), "--min-bucket", str(cfg.min_bucket)])
  yield s
  s.kill()


def without_provenance(recs):
  return [{k: v for k, v in r.items() if k != "provenance"} for r in recs]


def test_a_served_teacher_answers_as_in_process(tiny_world, served, tmp_path, monkeypatch):
  monkeypatch.setenv("ENGINE_PIPELINE_KEY", SECRET)
  logs = []
  mixed = config(tiny_world, tmp_path / "mixed", served)
  report = Run(mixed, log=logs.append).run()
  assert set(report["eval"]) >= set(mixed.compare)
  local = config(tiny_world, tmp_path / "local")
  Run(local, log=lambda m: None).run(("probe",))

  name = mixed.teachers[0].name
  a, b = Run(mixed, log=lambda m: None).ctx, Run(local, log=lambda m: None).ctx
  got, want = a.teacher_records("probe", [name]), b.teacher_records("probe", [name])
  assert len(got) == len(a.prompts()["probe"]) > 0
  assert without_provenance(got) == without_provenance(want)
  assert {r["provenance"]["engine"] for r in got} == {"openai"}
  assert all(r["provenance"]["usage"]["completion_tokens"] == r["tokens"]["response"]
             for r in got)
  # the other teachers ran in-process in the same run
  for t in mixed.teachers[1:]:
    assert without_provenance(a.teacher_records("probe", [t.name])) == \
        without_provenance(b.teacher_records("probe", [t.name]))
  # cost: the server's token counts
  probe_counts = report["costs"]["teachers"][name]
  assert probe_counts["tokens"] >= sum(r["tokens"]["response"] for r in got)
  assert any(f"on {served.url}" in m for m in logs)

  # a server that moved (another url, other connection settings) keeps every finished stage
  moved = dataclasses.replace(mixed.teachers[0], openai=dataclasses.replace(
      mixed.teachers[0].openai, url=served.url.replace("127.0.0.1", "localhost"), concurrency=2))
  again = []
  Run(dataclasses.replace(mixed, teachers=(moved, *mixed.teachers[1:])), log=again.append).run()
  assert [m for m in again if "running" in m] == []

  # the key is in no file of the run (configs, records, progress files, manifests, report)
  for root, _, files in os.walk(a.dir):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        assert SECRET.encode() not in fh.read(), os.path.join(root, f)
  assert not any(SECRET in m for m in logs)


def test_a_served_teachers_connection_is_not_part_of_the_stage_keys(tmp_path):
  """Where a teacher is served (url, key variable, concurrency, retries) changes no stage key; the
  served model does, and so does switching the engine."""
  from test_stages import config as stage_config
  from test_stages import keys
  base = stage_config(tmp_path)
  t1 = base.teachers[0]

  def served(**kw):
    ref = dataclasses.replace(t1, engine="openai", openai=OpenAIEngineConfig(**{
        "url": "http://10.0.0.5:8000/v1", "model": "m", **kw}))
    return keys(dataclasses.replace(base, teachers=(ref, *base.teachers[1:])))

  assert served() == served(url="https://teachers.internal/v1", api_key_env="K", concurrency=64,
                            retries=9, timeout_s=5, rate_limit_rps=3)
  assert served(model="other")["probe"] != served()["probe"]
  assert served()["probe"] != keys(base)["probe"]
  # the in-process default hashes as a teacher did before engines existed: old runs keep keys
  from persyn_jax import config as C
  from persyn_jax.stages.graph import _without_layout
  assert _without_layout(C.to_dict(base.teachers)) == [
      {"name": t.name, "path": t.path, "family": t.family, "dtype": t.dtype}
      for t in base.teachers]
