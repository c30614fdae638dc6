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


def tensorboard_scalars(logdir: str) -> dict:
  """{tag: [(step, value)]} as TensorBoard shows the event files of `logdir`: read in name order,
  a SessionLog START at step s (a writer's purge_step) hides the earlier events of steps >= s."""
  import struct

  from tensorboardX.proto import event_pb2
  out: dict = {}
  for name in sorted(os.listdir(logdir)):
    data, i = open(os.path.join(logdir, name), "rb").read(), 0
    while i < len(data):  # TFRecord: length (8), its crc (4), the record, its crc (4)
      n = struct.unpack("<Q", data[i:i + 8])[0]
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 16 + n
      if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
        out = {t: [(s, v) for s, v in rows if s < ev.step] for t, rows in out.items()}
      for v in ev.summary.value:
        out.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return out


def test_tensorboard_shows_the_jsonl_after_a_resume_in_the_same_second(tmp_path, monkeypatch):
  """A writer resumed from step 6 drops the later lines and events; a resume within the same
  second (tensorboardX names its file by the second) keeps the first writer's events."""
  import types

  import numpy as np
  from tensorboardX import event_file_writer
  monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.8e9))
  out = str(tmp_path / "m")
  for resume, steps, scale in ((None, range(1, 9), 1.0), (6, range(7, 11), 2.0)):
    with MetricsWriter(out, enabled=True, resume_step=resume) as mw:
      for s in steps:
        mw.write(s, {"loss": scale / s, "lr": 1e-3 * s}, prefix="train")
        if s % 2 == 0:
          mw.write(s, {"loss": scale / (s + 1)}, prefix="eval")
  want: dict = {}
  for r in read_metrics(os.path.join(out, "metrics.jsonl")):
    for k, v in r.items():
      if k not in ("step", "split"):
        want.setdefault(f"{r['split']}/{k}", []).append((r["step"], float(np.float32(v))))
  assert [s for s, _ in want["train/loss"]] == list(range(1, 11))
  assert [s for s, _ in want["eval/loss"]] == [2, 4, 6, 8, 10]
  assert want["train/loss"][5:7] == [(6, np.float32(1 / 6)), (7, np.float32(2 / 7))]
  assert tensorboard_scalars(os.path.join(out, "tb")) == want


def test_a_resume_after_a_line_cut_before_its_newline_appends_on_a_new_line(tmp_path):
  out = str(tmp_path / "m")
  with MetricsWriter(out, tensorboard=False, enabled=True) as mw:
    for s in (1, 2, 3):
      mw.write(s, {"loss": 1.0 / s}, prefix="train")
  path = os.path.join(out, "metrics.jsonl")
  with open(path) as f:
    lines = f.read().splitlines(keepends=True)
  with open(path, "w") as f:  # killed after step 2's line, before its newline
    f.writelines(lines[:1] + [lines[1].rstrip("\n")])
  with MetricsWriter(out, tensorboard=False, enabled=True, resume_step=2) as mw:
    mw.write(3, {"loss": 0.5}, prefix="train")
  assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 0.5)]


def test_a_loss_that_is_not_finite_is_logged_as_null(tmp_path):
  """metrics.jsonl is strict JSON like the run's other files: a NaN loss is null (it was the
  string "nan", a string in a column of numbers), TensorBoard gets no point for it, and the
  report's loss curve reads it as NaN."""
  import math

  import numpy as np

  from persyn_jax.report.assemble import loss_curve

  out = tmp_path / "m"
  with MetricsWriter(str(out), tensorboard=True, enabled=True) as mw:
    mw.write(1, {"loss": 2.0, "grad_norm": np.float32(1.5)}, prefix="train")
    mw.write(2, {"loss": np.float32("nan"), "grad_norm": float("inf")}, prefix="train")

  def refuse(token):
    raise ValueError(f"non-JSON token {token}")
  rows = [json.loads(line, parse_constant=refuse) for line in open(out / "metrics.jsonl")]
  assert [(r["loss"], r["grad_norm"]) for r in rows] == [(2.0, 1.5), (None, None)]
  curve = loss_curve(str(out / "metrics.jsonl"))
  assert curve[0] == (1, 2.0) and curve[1][0] == 2 and math.isnan(curve[1][1])
