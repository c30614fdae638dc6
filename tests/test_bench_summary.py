"""bench/accelerator_summary.py: each target read from its step's JSON and judged against its goal
(at least, or at most for the decode cost's growth); a missing step is "not measured"; a --dry
run judges only the targets whose figures do not hang on its tiny presets."""
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture
def summary(monkeypatch):
  monkeypatch.syspath_prepend(BENCH)
  sys.modules.pop("accelerator_summary", None)
  import accelerator_summary
  return accelerator_summary


def write(d, name, obj):
  with open(os.path.join(d, name), "w") as f:
    json.dump(obj, f)


@pytest.mark.parametrize("dry", [False, True])
def test_targets_are_judged_each_in_its_direction(summary, tmp_path, dry):
  write(tmp_path, "continuous.json", {"useful_fraction": {"continuous": 0.95, "static": 0.3},
                                      "per_token_growth_max_over_min": 1.4})
  write(tmp_path, "sft.json", {"jax": {"mfu": 0.45}, "jax_over_torch_tokens_per_s": 1.1})
  rows = {r["target"]: r for r in summary.summarize(str(tmp_path), dry)["targets"]}
  assert rows["continuous_useful_fraction"]["met"] is True        # 0.95 >= 0.9
  assert rows["decode_cost_growth_16x_cache"]["met"] is False     # 1.4 > 1.25: not flat
  assert rows["decode_cost_growth_16x_cache"]["at_most"]
  sft_mfu, sft_ratio = rows["sft_mfu"], rows["sft_vs_torch"]
  assert sft_mfu["value"] == 0.45 and sft_ratio["value"] == 1.1
  assert (sft_mfu["met"], sft_ratio["met"]) == ((None, None) if dry else (True, False))
  for name in ("decode_roofline_frac", "scoring_mfu"):  # their steps wrote nothing
    assert not rows[name]["measured"] and rows[name]["met"] is None and "error" in rows[name]
  assert os.path.exists(tmp_path / "summary.json") is False  # summarize only; main writes it


def test_main_writes_the_summary(summary, tmp_path, capsys):
  write(tmp_path, "continuous.json", {"useful_fraction": {"continuous": 0.5},
                                      "per_token_growth_max_over_min": 1.1})
  summary.main([str(tmp_path), "--dry"])
  out = capsys.readouterr().out
  assert "continuous_useful_fraction" in out and "NOT met" in out and "goal <= 1.25" in out
  saved = json.load(open(tmp_path / "summary.json"))
  assert saved["dry"] and len(saved["targets"]) == len(summary.TARGETS)


def test_a_step_json_left_by_an_earlier_run_is_not_measured(summary, tmp_path):
  """OUT_DIR reused (or two runs in one minute): a step that fails this time writes nothing, and
  its JSON from before must not pass for this run's figure."""
  since = "2026-12-06T22:00:00+00:00"
  write(tmp_path, "sft.json", {"date": "2026-12-06T21:59:59+00:00", "jax": {"mfu": 0.45},
                               "jax_over_torch_tokens_per_s": 1.3})
  write(tmp_path, "continuous.json", {"date": "2026-12-06T22:03:00+00:00",
                                      "useful_fraction": {"continuous": 0.95},
                                      "per_token_growth_max_over_min": 1.1})
  rows = {r["target"]: r for r in summary.summarize(str(tmp_path), False, since)["targets"]}
  for name in ("sft_mfu", "sft_vs_torch"):
    assert not rows[name]["measured"] and rows[name]["met"] is None
    assert "stale" in rows[name]["error"] and "21:59:59" in rows[name]["error"]
  assert rows["continuous_useful_fraction"]["met"] is True
  assert rows["decode_cost_growth_16x_cache"]["met"] is True


@pytest.fixture
def common(monkeypatch):
  monkeypatch.syspath_prepend(BENCH)
  import common
  return common


def test_the_torch_anchor_runs_where_jax_runs_or_not_at_all(common):
  """A GPU host whose torch is the CPU wheel must not time torch on the host CPU against JAX on
  the GPU (a 100x "speedup"): it stops, naming the fix; on CPU both sides use the CPU."""
  assert common.torch_device_for("cpu", False) == "cpu"
  assert common.torch_device_for("cpu", True) == "cpu"
  assert common.torch_device_for("gpu", True) == "cuda"
  with pytest.raises(SystemExit, match="no CUDA.*--no-torch"):
    common.torch_device_for("gpu", False)
  with pytest.raises(SystemExit, match="--no-torch"):
    common.torch_device_for("tpu", False)
  assert common.torch_device() == "cpu"  # this test machine: JAX on CPU
