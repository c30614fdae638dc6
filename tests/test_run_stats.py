"""Seeds, statistics and the alpha sweep in a whole run on the tiny world: one student per
(policy, seed), resumed per seed; the report's intervals recomputed from eval.json; the sweep's
child run reusing the probe and the alpha-free scores."""
import json
import os
import shutil

import numpy as np
import pytest

from persyn_jax.report import stats
from persyn_jax.report.assemble import loss_curve
from persyn_jax.run_config import RunConfig
from persyn_jax.stages import Run
from test_pipeline import explicit_config

SETS = ["compare=[persyn,strong,family_strong]", "seeds=[0,1]", "sweep.alpha=[0.0,0.4]",
        "sweep.policies=[persyn]", "sft.max_steps=2", "sft.batch_size=2", "router.epochs=1",
        "sampling.max_new_tokens=16", "eval.sampling.max_new_tokens=16"]


def without_seconds(x):
  """`x` less its (timing) `seconds` fields, at every depth."""
  if isinstance(x, dict):
    return {k: without_seconds(v) for k, v in x.items() if k != "seconds"}
  return x


@pytest.fixture(scope="module")
def seeded_run(tiny_world, tmp_path_factory):
  # strong and family_strong pinned to one teacher: two policies with the same examples
  same = next(n for n, _, f in tiny_world.teachers if f == tiny_world.student[2])
  cfg = explicit_config(tiny_world, tmp_path_factory.mktemp("seeded"),
                        sets=SETS + [f"policies.strong={same}", f"policies.family_strong={same}"])
  assert cfg.scoring.alpha == 0.4  # the sweep's 0.4 is the main run's own
  logs = []
  report = Run(cfg, log=logs.append).run()
  return cfg, report, logs


def test_the_default_comparison_has_the_oracle_and_every_baseline():
  assert RunConfig().compare == ("persyn", "strong", "family_strong", "mix", "car", "random",
                                 "oracle")
  assert RunConfig().seeds == () and RunConfig().sweep.alpha == ()


def test_each_policy_and_seed_is_its_own_student_with_its_own_data_order(seeded_run):
  cfg, report, _ = seeded_run
  d = report["run_dir"]
  for p in cfg.compare:
    for k in cfg.seeds:
      assert os.path.exists(os.path.join(d, "sft", p, f"seed{k}", "DONE.json"))
      assert os.path.exists(os.path.join(d, "eval", p, f"seed{k}", "generations.jsonl"))
  # sft.seed = k orders the data: the two seeds' first batches, hence losses, differ
  loss = {k: loss_curve(os.path.join(d, "sft", "persyn", f"seed{k}", "metrics.jsonl"))
          for k in cfg.seeds}
  assert loss[0] and loss[1] and loss[0] != loss[1]


def test_policies_with_the_same_examples_share_one_student(seeded_run):
  """family_strong's examples are strong's (one teacher): its students are not trained again, and
  scoring strong's student again under family_strong's name gives the same answers."""
  cfg, report, _ = seeded_run
  d = report["run_dir"]
  ev = json.load(open(os.path.join(d, "eval", "eval.json")))
  for k in cfg.seeds:
    twin = json.load(open(os.path.join(d, "sft", "family_strong", f"seed{k}", "DONE.json")))
    own = json.load(open(os.path.join(d, "sft", "strong", f"seed{k}", "DONE.json")))
    assert twin["same_as"] == "strong" and "same_as" not in own
    assert twin["export_dir"] == own["export_dir"]
    assert not os.path.exists(os.path.join(d, "sft", "family_strong", f"seed{k}", "student"))
    assert ev["family_strong"]["seeds"][f"seed{k}"]["correct"] == \
        ev["strong"]["seeds"][f"seed{k}"]["correct"]
    gens = [open(os.path.join(d, "eval", p, f"seed{k}", "generations.jsonl")).read()
            for p in ("strong", "family_strong")]
    responses = [[json.loads(x)["response"] for x in g.splitlines()] for g in gens]
    assert responses[0] == responses[1] and len(responses[0]) == report["prompts"]["eval"]
  # persyn's examples differ from strong's: its own students
  assert "same_as" not in json.load(open(os.path.join(d, "sft", "persyn", "seed0", "DONE.json")))


def test_the_report_intervals_are_those_of_the_per_problem_correctness_in_eval_json(seeded_run):
  cfg, report, _ = seeded_run
  ev = json.load(open(os.path.join(report["run_dir"], "eval", "eval.json")))
  correct = {p: np.array([ev[p]["seeds"][f"seed{k}"]["correct"] for k in cfg.seeds], float)
             for p in cfg.compare}
  correct["base_student"] = np.array([ev["base_student"]["correct"]], float)
  for p in cfg.compare:  # each seed's correctness is its score
    for k in cfg.seeds:
      assert np.mean(correct[p][list(cfg.seeds).index(k)]) == pytest.approx(
          ev[p]["seeds"][f"seed{k}"]["score"])
    assert report["eval"][p]["score"] == pytest.approx(correct[p].mean())
  ref = stats.compare(correct, baseline="strong", seed=cfg.seed)
  assert report["stats"]["policies"] == json.loads(json.dumps(ref["policies"]))
  assert report["stats"]["resamples"] >= 2000 and report["stats"]["problems"] == report["prompts"]["eval"]


def test_the_report_table_names_each_policys_significance(seeded_run):
  cfg, report, _ = seeded_run
  md = open(os.path.join(report["run_dir"], "report", "report.md")).read()
  assert ("| policy | accuracy | 95% CI | Δ vs strong | 95% CI of Δ | significant? | seed sd |"
          in md)
  for p in ("persyn", "base_student"):
    t = report["stats"]["policies"][p]
    word = "not significantly different from" if not t["significant"] else "significantly"
    assert f"- {p}: {word}" in md
  assert os.path.exists(report["plots"]["eval"]) and os.path.exists(report["plots"]["sweep"])


def test_a_swept_alpha_runs_no_teacher_study_of_its_own():
  """The study's students learn from single teachers' probe answers, whatever alpha: a sweep child
  that ran it again would repeat the parent's work (about half a minute per alpha on the toy)."""
  from persyn_jax.run_config import RunConfig, StudyConfig, SweepConfig
  from persyn_jax.stages.sweep import child_config
  parent = RunConfig(study=StudyConfig(enabled=True), sweep=SweepConfig(alpha=(0.0, 1.0)))
  child = child_config(parent, 1.0)
  assert parent.study.enabled and not child.study.enabled
  assert child.scoring.alpha == 1.0 and child.sweep.alpha == ()


def test_the_sweep_reuses_the_probe_and_scores_and_recombines_only_the_reward(seeded_run):
  cfg, report, logs = seeded_run
  child = os.path.join(report["run_dir"], "sweep", "alpha=0")
  assert not os.path.exists(os.path.join(report["run_dir"], "sweep", "alpha=0.4"))
  done = lambda d, s: json.load(open(os.path.join(d, s, "DONE.json")))  # noqa: E731
  assert done(child, "probe")["key"] == done(report["run_dir"], "probe")["key"]
  assert "[alpha=0] [probe] done earlier" in " ".join(logs)
  assert any(l.startswith("[alpha=0] [score] done earlier") for l in logs)
  from persyn_jax.data.shards import read_records
  main = {(r["id"], r["teacher"]): r["scores"] for r in read_records(
      os.path.join(report["run_dir"], "score"), "score")}
  swept = {(r["id"], r["teacher"]): r["scores"] for r in read_records(
      os.path.join(child, "score"), "score")}
  assert main.keys() == swept.keys()
  for key, s in swept.items():
    assert s["quality"] == main[key]["quality"]
    assert s["learnability"] == main[key]["learnability"]
  # alpha = 0: the reward is the min-max normalized quality of the prompt's responses
  by_prompt = {}
  for (i, t), s in swept.items():
    by_prompt.setdefault(i, []).append((s["quality"], s["reward"]))
  for pairs in by_prompt.values():
    q = np.array([a for a, _ in pairs], float)
    if np.ptp(q) > 0:
      assert [b for _, b in pairs] == pytest.approx(list((q - q.min()) / np.ptp(q)))
  rows = {r["alpha"]: r for r in report["sweep"]["rows"]}
  assert rows[0.4]["main_run"] and rows[0.4]["policies"]["persyn"]["accuracy"] == pytest.approx(
      report["eval"]["persyn"]["score"])
  child_eval = done(child, "eval")["counts"]
  assert rows[0.0]["done"] and rows[0.0]["policies"]["persyn"]["accuracy"] == pytest.approx(
      child_eval["persyn"]["score"])
  assert list(child_eval) == ["persyn"]  # only the swept policy; no base student
  md = open(os.path.join(report["run_dir"], "report", "report.md")).read()
  assert "## Alpha sweep" in md and "| 0 | persyn |" in md and "| 0.4 (main run) | persyn |" in md


def test_a_run_stopped_between_seeds_trains_only_the_missing_one(seeded_run):
  cfg, report, _ = seeded_run
  d = report["run_dir"]
  eval_before = json.load(open(os.path.join(d, "eval", "eval.json")))
  # what a kill after persyn's seed 0 leaves: seed 1 not started, sft and eval not finished
  shutil.rmtree(os.path.join(d, "sft", "persyn", "seed1"))
  os.remove(os.path.join(d, "sft", "DONE.json"))
  os.remove(os.path.join(d, "eval", "DONE.json"))
  os.remove(os.path.join(d, "eval", "persyn", "seed1", "result.json"))
  logs = []
  again = Run(cfg, log=logs.append).run()
  text = "\n".join(logs)
  assert "[sft] persyn seed 0: done earlier" in text and "[sft] strong seed 1: done earlier" in text
  assert "[sft] persyn seed 1: " in text and "persyn seed 1: done earlier" not in text
  assert [l.split(":")[0] for l in logs if "batches per epoch" in l] == ["[sft] persyn seed 1"]
  # the retrained student is the same student (deterministic per seed): the same answers
  after = json.load(open(os.path.join(d, "eval", "eval.json")))
  assert without_seconds(after) == without_seconds(eval_before)
  assert again["stats"] == report["stats"]


def test_the_readme_block_of_a_seeded_report_shows_its_intervals_and_significance(seeded_run):
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "make_readme_results.py")
  spec = importlib.util.spec_from_file_location("make_readme_results", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  _, report, _ = seeded_run
  block = mod.render(report)
  for p, t in report["stats"]["policies"].items():
    row = [l for l in block.splitlines() if l.startswith(f"| {mod.NAMES.get(p, p)} |")]
    assert len(row) == 1, (p, row)
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1].strip("*") == f"{report['eval'][p]['score']:.3f}"
    assert cells[2] == f"{t['ci'][0]:.3f} to {t['ci'][1]:.3f}"
    if p != "strong":
      assert cells[3] == f"{t['delta']:+.3f} ({t['delta_ci'][0]:+.3f} to {t['delta_ci'][1]:+.3f})"
      assert cells[4] == ("yes" if t["significant"] else "no")
  for r in report["sweep"]["rows"]:
    acc = r["policies"]["persyn"]
    assert f"alpha = {r['alpha']:g}" in block and (
        f"persyn {acc['accuracy']:.3f} ({acc['ci'][0]:.3f} to {acc['ci'][1]:.3f})" in block)
