"""Untrusted files: weights from safetensors only (pickle refused unless asked for, then loaded with
weights_only=True), no remote code ever, records never pickled, file names never built from
unsanitized names or ids, YAML only through safe_load, model files read only from inside the model
directory (links out of it refused unless allowed). A hostile file must not run code: each
test plants a payload that would leave a marker file, and checks the marker never appears."""
import glob
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from persyn_jax import config as C
from persyn_jax.data import records as R
from persyn_jax.io_utils import safe_name
from persyn_jax.models import CheckpointError, from_pretrained


class Payload:
  """Unpickling this runs `open(marker, "w")`: the code a hostile pickle would run."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def copy_model(model_dir, tmp_path, arch="llama"):
  dst = str(tmp_path / "m")
  shutil.copytree(model_dir(arch)[0], dst)
  return dst


def logits(model, n=8):
  import jax.numpy as jnp
  ids = jnp.arange(1, n + 1, dtype=jnp.int32)[None] % model.config.vocab_size
  return np.asarray(model(ids))


def test_a_pickle_checkpoint_loads_only_when_asked_and_only_tensors(model_dir, tmp_path):
  path = copy_model(model_dir, tmp_path)
  ref, _ = from_pretrained(path, dtype="float32", tokenizer=False)
  _, tm = model_dir("llama")
  os.remove(os.path.join(path, "model.safetensors"))
  torch.save(tm.state_dict(), os.path.join(path, "pytorch_model.bin"))
  with pytest.raises(CheckpointError, match=r"pytorch_model.bin: pickle checkpoints are refused"):
    from_pretrained(path)
  model, _ = from_pretrained(path, dtype="float32", tokenizer=False, allow_pickle=True)
  np.testing.assert_array_equal(logits(model), logits(ref))


def test_a_hostile_pickle_never_runs(model_dir, tmp_path):
  path = copy_model(model_dir, tmp_path)
  marker = str(tmp_path / "pwned")
  os.remove(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
    pickle.dump({"model.embed_tokens.weight": Payload(marker)}, f)
  with pytest.raises(CheckpointError, match="pickle checkpoints are refused"):
    from_pretrained(path)
  # even with the flag: torch.load(weights_only=True) refuses anything but tensors
  with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
    from_pretrained(path, allow_pickle=True)
  assert not os.path.exists(marker)


def test_remote_code_is_never_run(model_dir, tmp_path):
  """A config or tokenizer that asks for its own Python code: refused or ignored, never run."""
  path = copy_model(model_dir, tmp_path)
  marker = str(tmp_path / "pwned")
  code = f"open({marker!r}, 'w').close()\nclass Evil: pass\n"
  for name in ("modeling_evil.py", "tokenization_evil.py", "configuration_evil.py"):
    open(os.path.join(path, name), "w").write(code)
  tc = os.path.join(path, "tokenizer_config.json")
  cfg = json.load(open(tc))
  cfg.update(auto_map={"AutoTokenizer": ["tokenization_evil.Evil", None]}, tokenizer_class="Evil")
  json.dump(cfg, open(tc, "w"))
  try:
    from_pretrained(path, dtype="float32")  # the tokenizer's remote code: not run
  except CheckpointError as e:
    assert str(path) in str(e)  # or refused, naming the directory
  assert not os.path.exists(marker)
  c = json.load(open(os.path.join(path, "config.json")))
  c["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil", "AutoConfig": "configuration_evil.Evil"}
  json.dump(c, open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(CheckpointError, match=r"config.json: auto_map asks for remote code"):
    from_pretrained(path)
  assert not os.path.exists(marker)


def test_a_weight_index_cannot_point_outside_the_model_directory(model_dir, tmp_path):
  path = copy_model(model_dir, tmp_path)
  outside = tmp_path / "outside.safetensors"
  shutil.move(os.path.join(path, "model.safetensors"), outside)
  from safetensors import safe_open
  with safe_open(str(outside), "np") as f:
    names = list(f.keys())
  json.dump({"metadata": {}, "weight_map": {n: "../outside.safetensors" for n in names}},
            open(os.path.join(path, "model.safetensors.index.json"), "w"))
  with pytest.raises(CheckpointError, match=r"weight file '../outside.safetensors' is not a plain file name"):
    from_pretrained(path)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickled_records_are_refused(protocol):
  record = R.make("a", "b")
  with pytest.raises(R.RecordError, match="pickle|neither a JSON object nor a msgpack map"):
    R.decode(pickle.dumps(record, protocol=protocol))
  with pytest.raises(R.RecordError):
    R.decode(pickle.dumps(Payload("/nonexistent/x"), protocol=protocol))


def test_yaml_with_python_tags_is_refused_by_the_command_line(tmp_path, capsys):
  from persyn_jax import train
  marker = tmp_path / "pwned"
  y = tmp_path / "evil.yaml"
  y.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
  assert train.main(["--config", str(y), "--dry-run"]) == 2
  assert "evil.yaml: invalid YAML" in capsys.readouterr().err
  assert not marker.exists()


def test_a_hostile_teacher_name_or_record_id_cannot_write_outside_the_run(model_dir, tmp_path):
  """Teachers named '../../evil' and '/abs/evil', prompt ids with '../': every file stays inside
  the run directory, under sanitized names; the records keep the names as data."""
  from persyn_jax.stages import Run
  from persyn_jax.run_config import RunConfig
  from persyn_jax.data import shards
  root = tmp_path / "a" / "b"
  root.mkdir(parents=True)
  prompts = root / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"id": i, "prompt": f"say {n}"}) + "\n" for n, i in
                             enumerate(["../../../escape", "/etc/passwd", "ok"])))
  path = model_dir("llama")[0]
  cfg = C.from_dict(RunConfig, {
      "world": None, "run_dir": str(root / "run"), "records_per_shard": 2,
      "teachers": [{"name": "../../evil", "path": path}, {"name": "/abs/evil2", "path": path}],
      "student": {"name": "s", "path": path},
      "prompts": {"source": {"path": str(prompts)}, "probe": 3},
      "sampling": {"max_new_tokens": 3, "max_prompt_len": 32}})
  before = set(glob.glob(str(tmp_path / "**"), recursive=True))
  run = Run(cfg, log=lambda m: None)
  run.run(["probe"])
  after = set(glob.glob(str(tmp_path / "**"), recursive=True)) - before
  run_dir = str(root / "run")
  assert after and all(p == run_dir or p.startswith(run_dir + os.sep) for p in after), sorted(after)
  names = sorted(os.path.basename(p) for p in after if p.endswith(".array_record"))
  assert names and all(n.startswith(("probe-evil-", "probe-abs_evil2-")) for n in names), names
  recs = list(shards.read_records(os.path.join(run_dir, "probe"), "probe-evil"))
  assert {r["teacher"] for r in recs} == {"../../evil"}
  assert {r["id"] for r in recs} == {"../../../escape", "/etc/passwd", "ok"}


def test_an_export_name_cannot_leave_the_export_directory(tmp_path):
  from persyn_jax import evaluate as ev
  out = tmp_path / "eval" / "x"
  rows = [{"id": "1", "prompt": "p", "response": "r", "token_len": 1}]
  ev.export(rows, "../../../escaped", str(out), ["arena_hard"])
  made = [p for p in glob.glob(str(tmp_path / "**" / "*.jsonl"), recursive=True)]
  assert made and all(p.startswith(str(out) + os.sep) for p in made), made


@pytest.mark.parametrize("name,want", [("../../evil", "evil"), ("/abs/evil", "abs_evil"),
                                       ("a b/c", "a_b_c"), ("..", None), ("", None), ("ok-1.2", "ok-1.2")])
def test_safe_name_examples(name, want):
  if want is None:
    with pytest.raises(ValueError, match="teacher name"):
      safe_name(name, "teacher name")
  else:
    assert safe_name(name) == want


# -- links out of a model directory ----------------------------------------------------------------

LINKED = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
          "chat_template.jinja"]


@pytest.mark.parametrize("name", LINKED)
def test_a_link_out_of_the_model_directory_is_refused_unless_allowed(model_dir, tmp_path, name,
                                                                     monkeypatch):
  """A model file that is a link to elsewhere (a private file, another model's weights) is refused,
  naming the link and its target, unless PERSYN_JAX_ALLOW_EXTERNAL_LINKS=1 says to follow links."""
  from persyn_jax.models import checks
  monkeypatch.delenv(checks.ALLOW_LINKS_ENV, raising=False)
  path = copy_model(model_dir, tmp_path)
  outside = tmp_path / "elsewhere" / name
  outside.parent.mkdir()
  shutil.move(os.path.join(path, name), outside)
  os.symlink(outside, os.path.join(path, name))
  with pytest.raises(CheckpointError, match=rf"m/{name}: a link to {os.path.realpath(outside)}, "
                                            r"outside the model directory .*"
                                            r"PERSYN_JAX_ALLOW_EXTERNAL_LINKS=1"):
    from_pretrained(path, dtype="float32")
  monkeypatch.setenv(checks.ALLOW_LINKS_ENV, "1")
  model, tok = from_pretrained(path, dtype="float32")
  ref, ref_tok = from_pretrained(model_dir("llama")[0], dtype="float32")
  np.testing.assert_array_equal(logits(model), logits(ref))
  assert tok.chat_template == ref_tok.chat_template
  assert tok("hi")["input_ids"] == ref_tok("hi")["input_ids"]


def test_the_argument_allows_links_where_the_environment_does_not(model_dir, tmp_path, monkeypatch):
  from persyn_jax.models import checks, load_tokenizer
  monkeypatch.delenv(checks.ALLOW_LINKS_ENV, raising=False)
  path = copy_model(model_dir, tmp_path)
  shutil.move(os.path.join(path, "tokenizer.json"), tmp_path / "tokenizer.json")
  os.symlink(tmp_path / "tokenizer.json", os.path.join(path, "tokenizer.json"))
  with pytest.raises(CheckpointError, match=r"m/tokenizer.json: a link to "):
    load_tokenizer(path)
  assert load_tokenizer(path, allow_external_links=True)("hi")["input_ids"]
  monkeypatch.setenv(checks.ALLOW_LINKS_ENV, "1")
  with pytest.raises(CheckpointError, match=r"m/tokenizer.json: a link to "):
    load_tokenizer(path, allow_external_links=False)  # the argument wins over the environment


def test_links_that_stay_inside_the_model_directory_are_followed(model_dir, tmp_path, monkeypatch):
  from persyn_jax.models import checks
  monkeypatch.delenv(checks.ALLOW_LINKS_ENV, raising=False)
  path = copy_model(model_dir, tmp_path)
  os.mkdir(os.path.join(path, "weights"))
  shutil.move(os.path.join(path, "model.safetensors"),
              os.path.join(path, "weights", "w.safetensors"))
  os.symlink(os.path.join("weights", "w.safetensors"), os.path.join(path, "model.safetensors"))
  os.symlink(path, tmp_path / "alias")  # the directory itself may be reached through a link
  model, _ = from_pretrained(str(tmp_path / "alias"), dtype="float32")
  ref, _ = from_pretrained(model_dir("llama")[0], dtype="float32", tokenizer=False)
  np.testing.assert_array_equal(logits(model), logits(ref))


def hub_snapshot(src: str, cache: str, repo: str = "models--org--tiny", rev: str = "0" * 40) -> str:
  """`src` laid out as huggingface_hub's cache lays out a download: the files under
  <repo>/blobs/<sha256>, and <repo>/snapshots/<rev>/<file> a relative link to its blob."""
  import hashlib
  blobs, snap = os.path.join(cache, repo, "blobs"), os.path.join(cache, repo, "snapshots", rev)
  os.makedirs(blobs, exist_ok=True)
  os.makedirs(snap)
  for name in os.listdir(src):
    data = open(os.path.join(src, name), "rb").read()
    blob = hashlib.sha256(data).hexdigest()
    open(os.path.join(blobs, blob), "wb").write(data)
    os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))
  return snap


def test_a_hub_cache_snapshot_loads_through_its_links_to_blobs(model_dir, tmp_path, monkeypatch):
  """Links from a snapshot into its own repository's blobs/ are the hub cache's layout, followed;
  a link out of the repository folder (another repository's blobs included) is not."""
  from persyn_jax.models import checks
  monkeypatch.delenv(checks.ALLOW_LINKS_ENV, raising=False)
  src = model_dir("llama")[0]
  snap = hub_snapshot(src, str(tmp_path / "hub"))
  model, tok = from_pretrained(snap, dtype="float32")
  ref, _ = from_pretrained(src, dtype="float32", tokenizer=False)
  np.testing.assert_array_equal(logits(model), logits(ref))
  other = hub_snapshot(src, str(tmp_path / "hub"), repo="models--someone--else")
  target = os.path.join(other, "config.json")
  os.remove(os.path.join(snap, "config.json"))
  os.symlink(os.path.relpath(target, snap), os.path.join(snap, "config.json"))
  with pytest.raises(CheckpointError, match=r"snapshots/0+/config.json: a link to .*"
                                            r"models--someone--else/blobs/"):
    from_pretrained(snap, dtype="float32")
