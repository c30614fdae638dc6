"""Logging: the metrics writer's optional Weights & Biases sink; the long stages' progress bars."""
import importlib.util
import json
import os

import pytest

from persyn_jax import config as C
from persyn_jax.metrics import MetricsWriter, WandbConfig, progress, read_metrics
from persyn_jax.run_config import RunConfig

HAS_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.mark.skipif(HAS_WANDB, reason="checks the error when the wandb extra is missing")
def test_wandb_without_the_package_names_the_extra_before_writing_anything(tmp_path):
  with pytest.raises(ImportError, match=r'pip install "persyn-jax\[wandb\]"'):
    MetricsWriter(str(tmp_path / "m"), wandb=WandbConfig(project="p"), enabled=True)
  assert not os.path.exists(tmp_path / "m" / "metrics.jsonl")
  # and a run config that asks for it is refused when loaded, not when SFT starts
  with pytest.raises(ImportError, match=r"persyn-jax\[wandb\]"):
    C.from_dict(RunConfig, {"wandb": {"project": "p", "mode": "offline"}})


@pytest.mark.skipif(not HAS_WANDB, reason="needs the wandb extra")
def test_wandb_offline_logs_next_to_the_jsonl(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  out = tmp_path / "m"
  with MetricsWriter(str(out), tensorboard=False, enabled=True,
                     wandb=WandbConfig(project="persyn-test", mode="offline"),
                     wandb_name="toy-persyn") as mw:
    mw.write(1, {"loss": 2.0}, prefix="train")
    mw.write(2, {"loss": 1.5}, prefix="train")
  assert [r["loss"] for r in read_metrics(str(out / "metrics.jsonl"))] == [2.0, 1.5]
  run_id = json.load(open(out / "wandb.json"))["id"]
  assert any(run_id in d for d in os.listdir(out / "wandb"))


def test_wandb_config_names_a_bad_mode_and_an_empty_project():
  with pytest.raises(ValueError, match="wandb.mode='cloud'"):
    WandbConfig(mode="cloud")
  with pytest.raises(ValueError, match="wandb.project is empty"):
    WandbConfig(project="")


def test_wandb_is_off_by_default():
  assert RunConfig().wandb is None


def test_a_progress_bar_shows_on_process_0_and_stays_silent_when_off(capsys):
  with progress(4, "score/learnability", unit="pair") as bar:
    bar.update(4)
  assert "score/learnability" in capsys.readouterr().err
  with progress(4, "quiet", enabled=False) as bar:
    bar.update(4)
    bar.set_postfix(loss="1.0")
  assert capsys.readouterr().err == ""


def test_scoring_shows_its_progress_per_batch_of_pairs(model_dir, tok, capsys):
  from persyn_jax import models
  from persyn_jax.scoring import LogProbScorer, ScoringConfig
  path, _ = model_dir("qwen2")
  model, tk = models.load_model(path, dtype="float32")
  scorer = LogProbScorer(model, tk, ScoringConfig(quality="verifier", max_len=64,
                                                  min_prompt_tokens=8))
  capsys.readouterr()
  scores, stats = scorer.learnability(["hello", "Tom has 12 apples"], ["world", "7 are left"])
  err = capsys.readouterr().err
  assert "score/learnability" in err and "2/2" in err
  assert stats["scored"] == 2
