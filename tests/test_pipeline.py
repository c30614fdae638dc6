"""The whole Route-then-Generate run at small sizes: stages, manifests, resume, policies, report."""
import glob
import json
import os
import subprocess
import sys

import pytest
from array_record.python.array_record_module import ArrayRecordReader

from persyn_jax import config as C
from persyn_jax import policies as pol
from persyn_jax.stages import Run
from persyn_jax.run_config import STAGES, RunConfig, load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def explicit_config(world, run_dir, **over) -> RunConfig:
  """A config that names its teachers, student and prompts (world: null), all seven policies."""
  data = C.load_yaml(os.path.join(ROOT, "configs", "toy.yaml"))
  data.update(world=None, run_dir=str(run_dir),
              compare=["persyn", "strong", "family_strong", "mix", "car", "random", "oracle"],
              teachers=[{"name": n, "path": p, "family": f, "dtype": "float32"}
                        for n, p, f in world.teachers],
              student={"name": world.student[0], "path": world.student[1],
                       "family": world.student[2], "dtype": "float32"},
              prompts={"source": {"path": world.prompts_path, "reference_field": "reference",
                                  "keep_fields": ["kind"]},
                       "probe": world.probe, "eval": world.eval})
  data["seeds"] = []  # one student per policy here; tests/test_run_stats.py runs several seeds
  data["router"] = dict(data["router"], backbone=world.student[1], epochs=2)
  data["sft"] = dict(data["sft"], epochs=1, checkpoint_every=2)
  data["sampling"] = dict(data["sampling"], max_new_tokens=24)
  data["eval"] = dict(data["eval"], sampling=dict(data["eval"]["sampling"], max_new_tokens=24),
                      exports=["jsonl", "alpaca_eval", "arena_hard", "ifeval"])
  return C.from_dict(RunConfig, C.apply_overrides(data, over.get("sets", [])))


@pytest.fixture(scope="session")
def finished_run(tiny_world, tmp_path_factory):
  cfg = explicit_config(tiny_world, tmp_path_factory.mktemp("run"))
  logs = []
  report = Run(cfg, log=logs.append).run()
  return cfg, report, logs


def test_every_stage_writes_its_manifest(finished_run):
  cfg, report, logs = finished_run
  for s in STAGES:
    m = json.load(open(os.path.join(report["run_dir"], s, "DONE.json")))
    assert m["stage"] == s and m["key"]
  assert all(f"[{s}] running" in logs for s in STAGES)


def test_every_json_file_of_the_run_is_strict_json(finished_run):
  """No NaN / Infinity token (which json.dumps writes and jq, JavaScript and RFC 8259 parsers
  refuse) in any JSON or JSON Lines file of a finished run; docs/RUN_DIR.md."""
  cfg, report, logs = finished_run

  def refuse(token):
    raise ValueError(f"non-JSON token {token}")
  files = [p for pattern in ("**/*.json", "**/*.jsonl")
           for p in glob.glob(os.path.join(report["run_dir"], pattern), recursive=True)]
  assert any(p.endswith("report.json") for p in files)
  for path in files:
    text = open(path, encoding="utf-8").read()
    lines = text.splitlines() if path.endswith(".jsonl") else [text]
    for line in filter(str.strip, lines):
      json.loads(line, parse_constant=refuse)


def test_rerun_skips_every_stage(finished_run):
  cfg, report, _ = finished_run
  before = {s: open(os.path.join(report["run_dir"], s, "DONE.json")).read() for s in STAGES}
  logs = []
  again = Run(cfg, log=logs.append).run()
  assert [l for l in logs if "running" in l] == []
  assert sum("skipped" in l for l in logs) == len(STAGES)
  after = {s: open(os.path.join(report["run_dir"], s, "DONE.json")).read() for s in STAGES}
  assert before == after
  assert again["eval"] == report["eval"]


def read_array_record(pattern):
  out = []
  for path in sorted(glob.glob(pattern)):
    r = ArrayRecordReader(path)
    out += [json.loads(b) for b in r.read_all()]
    r.close()
  return out


def test_shards_are_plain_array_record_and_match_the_report(finished_run):
  cfg, report, _ = finished_run
  d = report["run_dir"]
  k, P, N = len(report["teachers"]), report["prompts"]["probe"], report["prompts"]["train"]
  probe = read_array_record(os.path.join(d, "probe", "*.array_record"))
  assert len(probe) == k * P == report["costs"]["probe_generations"]
  assert len({(r["id"], r["teacher"]) for r in probe}) == len(probe)
  for policy in report["policies"]:
    recs = read_array_record(os.path.join(d, "data", policy, "*.array_record"))
    assert len(recs) == N == report["costs"]["policies"][policy]["prompts"]
    assert len({r["id"] for r in recs}) == N  # one response per prompt: no duplicate, no gap
    assert all(r["policy"] == policy and r["provenance"]["run"] == cfg.name for r in recs)
    shares = pol.shares({r["id"]: r["teacher"] for r in recs}, report["teachers"])
    assert shares == pytest.approx(report["shares"][policy])


def test_nothing_is_generated_twice(finished_run):
  _, report, _ = finished_run
  d = report["run_dir"]
  gen = read_array_record(os.path.join(d, "generate", "*.array_record"))
  probe = read_array_record(os.path.join(d, "probe", "*.array_record"))
  pairs = [(r["id"], r["teacher"]) for r in gen + probe]
  assert len(pairs) == len(set(pairs))
  # the oracle (Generate then Select) needs every teacher on every training prompt
  assert len(pairs) == report["costs"]["generate_then_select"]["generations"]


def test_every_policy_is_reported_with_eval_and_costs(finished_run):
  _, report, _ = finished_run
  for p in report["policies"]:
    assert 0.0 <= report["eval"][p]["score"] <= 1.0 and report["eval"][p]["n"] == report["prompts"]["eval"]
    c = report["costs"]["policies"][p]
    assert c["generations"] > 0 and c["teacher_seconds"] > 0
  assert "base_student" in report["eval"]
  k, P, N = len(report["teachers"]), report["prompts"]["probe"], report["prompts"]["train"]
  assert report["costs"]["policies"]["persyn"]["generations"] == k * P + (N - P)
  assert report["costs"]["policies"]["oracle"]["generations"] == k * N
  md = open(os.path.join(report["run_dir"], "report", "report.md")).read()
  for p in report["policies"]:
    assert f"| {p} |" in md
  for png in report["plots"].values():
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.exists(os.path.join(report["run_dir"], "eval", "persyn", "arena_hard",
                                     "toy-persyn.jsonl"))


def test_persyn_keeps_the_best_teacher_on_probe_prompts(finished_run):
  _, report, _ = finished_run
  d = report["run_dir"]
  scored = read_array_record(os.path.join(d, "score", "*.array_record"))
  best = {}
  for r in scored:
    if r["scores"]["reward"] is not None and r["scores"]["reward"] > best.get(r["id"], (-1, ""))[0]:
      best[r["id"]] = (r["scores"]["reward"], r["teacher"])
  data = {r["id"]: r["teacher"] for r in read_array_record(os.path.join(d, "data", "persyn", "*.array_record"))}
  ties = {r["id"] for r in scored if r["scores"]["reward"] == best[r["id"]][0] and r["teacher"] != best[r["id"]][1]}
  for i, (_, t) in best.items():
    if i not in ties:
      assert data[i] == t


def test_report_counts_the_probe_and_oracle_ties(finished_run):
  _, report, _ = finished_run
  d = report["run_dir"]
  rewards: dict[str, list[float]] = {}
  for r in read_array_record(os.path.join(d, "score", "*.array_record")):
    if r["scores"]["reward"] is not None:
      rewards.setdefault(r["id"], []).append(r["scores"]["reward"])
  ties = sum(sum(abs(v - max(vs)) <= pol.TIE_TOL * max(1.0, abs(max(vs))) for v in vs) > 1
             for vs in rewards.values())
  assert report["ties"]["probe"] == {"ties": ties, "prompts": report["prompts"]["probe"]}
  oracle = json.load(open(os.path.join(d, "generate", "DONE.json")))["counts"]["oracle"]
  assert report["ties"]["oracle"] == {"ties": oracle["ties"], "prompts": report["prompts"]["train"]}
  md = open(os.path.join(d, "report", "report.md")).read()
  assert (f"probe {ties} of {report['prompts']['probe']} prompts; oracle {oracle['ties']} of "
          f"{report['prompts']['train']} prompts") in md


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_dry_run_of_every_config(config):
  out = subprocess.run([sys.executable, "-m", "persyn_jax.train", "--config", config, "--dry-run"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "fits: yes" in out.stdout and "memory per device" in out.stdout


def test_dry_run_refuses_a_plan_that_does_not_fit():
  out = subprocess.run([sys.executable, "-m", "persyn_jax.train", "--config",
                        os.path.join(ROOT, "configs", "instruct.yaml"), "--dry-run",
                        "--set", "mesh.data=64", "--set", "mesh.fsdp=4", "--set", "mesh.tensor=1",
                        "--set", "sampling.mesh=null"],  # sampling on the run's mesh
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 3
  assert "DOES NOT FIT" in out.stdout and "llama3.1-405b" in out.stdout


def test_config_errors_name_the_key():
  out = subprocess.run([sys.executable, "-m", "persyn_jax.train", "--set", "sft.lrr=1", "--dry-run"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 2 and "unknown key(s) ['lrr']" in out.stderr


def test_duplicate_teacher_names_are_refused(tiny_world, tmp_path):
  data = C.to_dict(explicit_config(tiny_world, tmp_path))
  data["teachers"][1]["name"] = data["teachers"][0]["name"]
  with pytest.raises(C.ConfigError, match="duplicated teacher names"):
    C.from_dict(RunConfig, data)
