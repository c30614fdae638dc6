"""report.md's students table and alpha-sweep table, from a report dict made of known numbers."""
import numpy as np
import pytest

from persyn_jax.report import stats
from persyn_jax.report.markdown import markdown


def a_report():
  rng = np.random.default_rng(0)
  strong = (rng.random((3, 400)) < 0.6).astype(float)
  correct = {"strong": strong,
             "persyn": np.where(rng.random((3, 400)) < 0.02, 1 - strong, strong),  # ~ strong
             "oracle": np.maximum(strong, rng.random((3, 400)) < 0.5),  # clearly better
             "random": strong * (rng.random((3, 400)) < 0.7)}  # clearly worse
  st = stats.compare(correct, seed=0)
  pol = {p: {"prompts": 1000, "generations": 1300, "teacher_seconds": 12.5} for p in correct}
  pol["oracle"]["generations"] = 4000
  ev = {p: {"score": float(c.mean()), "n": 400, "by_kind": {}} for p, c in correct.items()}
  row = {"alpha": 0.2, "done": True, "main_run": False, "router": {"hit@1": 0.5},
         "policies": {"persyn": st["policies"]["persyn"]}}
  return {"run": "t", "eval_metric": "accuracy", "eval": ev, "stats": st,
          "costs": {"policies": pol, "teachers": {}, "probe_generations": 400,
                    "routed_generations": 900, "route_then_generate": {"generations": 1300},
                    "generate_then_select": {"generations": 4000}},
          "teachers": ["a"], "shares": {}, "probe": {"teachers": {}, "by_kind": {}},
          "sweep": {"rows": [row, {"alpha": 1.0, "done": False, "policies": {}, "router": {}}],
                    "policies": ["persyn"]}}


def test_the_students_table_gives_each_interval_and_its_significance():
  r = a_report()
  md = markdown(r)
  st = r["stats"]["policies"]
  assert st["oracle"]["significant"] and st["oracle"]["delta"] > 0
  assert st["random"]["significant"] and st["random"]["delta"] < 0
  assert not st["persyn"]["significant"]
  o = st["oracle"]
  assert (f"| oracle (the reward's best) | {r['eval']['oracle']['score']:.3f} | {o['ci'][0]:.3f} to "
          f"{o['ci'][1]:.3f} | {o['delta']:+.3f} | {o['delta_ci'][0]:+.3f} to "
          f"{o['delta_ci'][1]:+.3f} | yes | {o['seed_sd']:.3f} | 400 | 1000 | 4000 | 12.500 |") in md
  assert "- oracle: significantly better than strong" in md
  assert ("the oracle keeps the reward's best response per prompt (Generate then Select: 4000 "
          "teacher generations)") in md
  assert "- random: significantly worse than strong" in md
  assert "- persyn: not significantly different from strong" in md
  assert "- strong:" not in md  # the baseline has no sentence of its own
  assert "mean over 3 SFT seed(s)" in md and "over the 400 held-out problems" in md


def test_the_sweep_table_has_a_row_per_alpha_and_says_which_did_not_run():
  md = markdown(a_report())
  assert "## Alpha sweep" in md
  assert "| 0.2 | persyn |" in md and "| 0.500 |" in md.split("| 0.2 | persyn |")[1].split("\n")[0]
  assert "| 1 | not run |" in md


def test_the_per_kind_table_marks_the_significant_differences():
  r = a_report()
  kinds = ["a"] * 200 + ["b"] * 200
  rng = np.random.default_rng(1)
  strong = (rng.random((2, 400)) < 0.5).astype(float)
  better_on_b = strong.copy()
  better_on_b[:, 200:] = 1.0
  r["stats"] = stats.compare({"strong": strong, "x": better_on_b}, kinds=kinds, seed=0)
  r["eval"] = {p: {"score": 0.5, "n": 400, "by_kind": {}} for p in ("strong", "x")}
  md = markdown(r)
  b = r["stats"]["by_kind"]["b"]["x"]["delta"]
  assert b > 0.3 and f"| x | +0.000 | {b:+.3f}* |" in md


def test_plots_are_written_whole_and_a_failed_one_keeps_the_old_file(tmp_path):
  """report.plots.save renders the PNG in memory and writes it with atomic_write_bytes (a kill
  leaves the old plot or the new one): the file is a whole PNG, nothing else is left in its
  directory, and a figure that fails to render leaves the earlier plot as it was."""
  import os

  import matplotlib.pyplot as plt

  from persyn_jax.report.plots import plot_eval, save
  path = str(tmp_path / "eval.png")
  plot_eval({"persyn": 0.7, "strong": 0.75}, "accuracy", path,
            intervals={"persyn": [0.65, 0.75], "strong": [0.7, 0.8]})
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND" and os.listdir(tmp_path) == ["eval.png"]
  fig, ax = plt.subplots()
  ax.set_title(r"$\frac{1$")  # mathtext that cannot be parsed: savefig raises
  with pytest.raises(ValueError):
    save(fig, path)
  assert open(path, "rb").read() == data and os.listdir(tmp_path) == ["eval.png"]
