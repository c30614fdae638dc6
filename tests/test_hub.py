"""Hub ids as model paths (models/hub.py), without a network: a real huggingface_hub cache laid out
in a temporary HF_HOME, read offline (HF_HUB_OFFLINE=1) by fresh processes, since huggingface_hub
reads its environment once at import."""
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from persyn_jax.models import hub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate(hf_home, repo_id, commit=COMMIT, ref="main", shards=1, drop=()):
  """The layout huggingface_hub writes: models--org--name/{refs/<ref>, snapshots/<commit>/...}."""
  repo = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
  snap = os.path.join(repo, "snapshots", commit)
  os.makedirs(snap, exist_ok=True)
  os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
  with open(os.path.join(repo, "refs", ref), "w") as f:
    f.write(commit)
  with open(os.path.join(snap, "config.json"), "w") as f:
    json.dump({"model_type": "llama"}, f)
  names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
  with open(os.path.join(snap, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {f"w{i}": n for i, n in enumerate(names)}}, f)
  for i, name in enumerate(names):
    if name not in drop:
      save_file({f"w{i}": np.zeros(2, np.float32)}, os.path.join(snap, name))
  return snap


def child(hf_home, ids, offline=True, prelude=""):
  """A fresh process that resolves each id in turn and prints {"id", "path" | "error"} per line."""
  code = (f"{prelude}\nimport json\nfrom persyn_jax.models import hub\n"
          f"for i in {list(ids)!r}:\n"
          f"  try:\n    print(json.dumps({{'id': i, 'path': hub.resolve(i)}}), flush=True)\n"
          f"  except hub.HubError as e:\n    print(json.dumps({{'id': i, 'error': str(e)}}))\n")
  env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0",
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  env.pop("HF_HUB_CACHE", None)
  return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def results(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  return {r["id"]: r for r in map(json.loads, out.splitlines())}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
  """One HF_HOME with a complete, a tagged and an incomplete model, resolved offline in one child
  (importing persyn_jax.models costs seconds, so the cases share it)."""
  home = tmp_path_factory.mktemp("hf_home")
  snaps = {"tiny": populate(home, "org/tiny", shards=2),
           "tiny@v2": populate(home, "org/tiny", commit="f" * 40, ref="v2"),
           "partial": populate(home, "org/partial", shards=3,
                               drop=("model-00002-of-00003.safetensors",))}
  ids = ["org/tiny", f"org/tiny@{COMMIT}", "org/tiny@v2", "org/absent@v1", "org/partial"]
  return home, snaps, results(child(home, ids))


def test_a_local_directory_is_returned_as_is(tmp_path):
  assert hub.resolve(str(tmp_path)) == str(tmp_path)
  with pytest.raises(hub.HubError, match=r"'\./nowhere': no such directory, and not a hub id"):
    hub.resolve("./nowhere")


def test_ids_and_revisions_parse():
  assert hub.parse_id("Qwen/Qwen2.5-7B-Instruct") == ("Qwen/Qwen2.5-7B-Instruct", None)
  assert hub.parse_id("org/name@v1.0") == ("org/name", "v1.0")
  assert hub.parse_id(f"org/name@{COMMIT}") == ("org/name", COMMIT)
  for not_an_id in ("name", "/abs/dir", "./org/name", "a/b/c", "org/name@"):
    assert hub.parse_id(not_an_id) is None


def test_an_id_resolves_offline_to_its_cached_snapshot(offline):
  _, snaps, got = offline
  assert got["org/tiny"]["path"] == snaps["tiny"]
  assert got[f"org/tiny@{COMMIT}"]["path"] == snaps["tiny"]
  assert got["org/tiny@v2"]["path"] == snaps["tiny@v2"]


def test_offline_and_not_cached_names_the_id_and_the_command(offline):
  home, _, got = offline
  command = hub.download_command("org/absent", "v1")
  assert got["org/absent@v1"]["error"] == (
      f"model 'org/absent@v1' is not a local directory nor in the hub cache "
      f"{os.path.join(home, 'hub')}, and HF_HUB_OFFLINE is set; pre-download it where the hub can "
      f"be reached with:\n  {command}")
  assert command.startswith("hf download org/absent --include '*.safetensors' ")
  assert command.endswith("--exclude 'original/*' --revision v1")


def test_the_printed_command_is_one_the_hf_cli_accepts(tmp_path):
  # run it offline on a filled cache: the installed `hf` parses every flag and finds the snapshot
  snap = populate(tmp_path, "org/absent", ref="v1")
  args = shlex.split(hub.download_command("org/absent", "v1"))
  args[0] = os.path.join(os.path.dirname(sys.executable), "hf")
  proc = subprocess.run(args, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1"))
  assert proc.returncode == 0 and snap in proc.stdout, proc.stderr


def test_an_incomplete_snapshot_is_not_a_model(offline):
  _, snaps, got = offline
  assert hub.missing_files(snaps["partial"]) == ["model-00002-of-00003.safetensors"]
  error = got["org/partial"]["error"]
  assert "'org/partial' is not a local directory nor in the hub cache" in error


@pytest.mark.parametrize("index", ['{"weight_map": ["model-00001-of-00001.safetensors"]}', "[1]"])
def test_an_index_that_is_not_an_object_is_named_as_missing(tmp_path, index):
  """An index whose weight_map (or itself) is a list failed with a raw AttributeError / TypeError
  while the snapshot was checked."""
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "model.safetensors.index.json").write_text(index)
  (missing,) = hub.missing_files(str(tmp_path))
  assert missing.startswith("model.safetensors.index.json (unreadable: ")


def test_a_snapshot_with_model_safetensors_needs_no_shard_of_an_index(tmp_path):
  """The loader reads model.safetensors before an index (as transformers does), so the shards an
  index beside it names are not needed: the snapshot is complete without them."""
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "model.safetensors.index.json").write_text(
      '{"weight_map": {"w": "model-00001-of-00002.safetensors"}}')
  assert hub.missing_files(str(tmp_path)) == ["model-00001-of-00002.safetensors"]
  (tmp_path / "model.safetensors").write_bytes(b"")
  assert hub.missing_files(str(tmp_path)) == []


def test_the_allow_list_fetches_weights_configs_and_tokenizers_never_pickles():
  wanted = ["model.safetensors", "model-00001-of-00004.safetensors", "model.safetensors.index.json",
            "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt",
            "chat_template.jinja"]
  pickles = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "training_args.bin",
             "model.pt", "optimizer.pt", "consolidated.00.pth", "model.ckpt", "tokenizer.pkl",
             "data.pickle", "flax_model.msgpack", "tf_model.h5", "original/consolidated.00.pth"]
  allowed = lambda n: (any(fnmatch.fnmatch(n, p) for p in hub.ALLOW_PATTERNS)
                       and not any(fnmatch.fnmatch(n, p) for p in hub.IGNORE_PATTERNS))
  assert all(allowed(n) for n in wanted)
  assert not any(allowed(n) for n in pickles)


# Stands in for the network: writes the snapshot slowly (so the two processes overlap), logs each
# download, then answers as snapshot_download does, from the real cache.
SLOW_DOWNLOAD = f"""
import os, sys, time
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from test_hub import populate
from huggingface_hub import snapshot_download
from persyn_jax.models import hub

def download(repo_id, revision, cache_dir):
  with open(os.environ["DOWNLOAD_LOG"], "a") as f:
    f.write(f"{{os.getpid()}} {{repo_id}}\\n")
  time.sleep(2)
  populate(os.environ["HF_HOME"], repo_id, shards=2)
  return snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)

hub._download = download
ready = os.environ["READY_DIR"]  # both processes start resolving together, once both are up
open(os.path.join(ready, str(os.getpid())), "w").close()
deadline = time.time() + 240
while len(os.listdir(ready)) < 2 and time.time() < deadline:
  time.sleep(0.01)
"""


def test_two_processes_resolving_at_once_download_once(tmp_path, monkeypatch):
  log = tmp_path / "downloads.log"
  monkeypatch.setenv("DOWNLOAD_LOG", str(log))
  (tmp_path / "ready").mkdir()
  monkeypatch.setenv("READY_DIR", str(tmp_path / "ready"))
  procs = [child(tmp_path, ["org/shared"], offline=False, prelude=SLOW_DOWNLOAD) for _ in range(2)]
  got = [results(p)["org/shared"] for p in procs]
  expect = os.path.join(tmp_path, "hub", "models--org--shared", "snapshots", COMMIT)
  assert [g.get("path") for g in got] == [expect, expect], got
  assert len(log.read_text().splitlines()) == 1


def test_load_model_takes_a_hub_id_and_loads_its_cached_snapshot(tmp_path, model_dir):
  """models.load_model("org/name") resolves the id (offline, from the cache) and loads the same
  weights as the directory itself; an id that is not cached fails with the id and the command."""
  import shutil
  src, _ = model_dir("llama")
  snap = populate(tmp_path, "org/real")
  shutil.rmtree(snap)
  shutil.copytree(src, snap)
  code = (
      "import json, numpy as np, jax\n"
      "from flax import nnx\n"
      "from persyn_jax import models\n"
      "from persyn_jax.models import hub\n"
      f"a, tok = models.load_model('org/real', dtype='float32')\n"
      f"b, _ = models.load_model({src!r}, dtype='float32', tokenizer=False)\n"
      "la, lb = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))\n"
      "same = len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))\n"
      "try:\n  models.load_model('org/absent@v1')\n  err = ''\n"
      "except hub.HubError as e:\n  err = str(e)\n"
      "print(json.dumps({'same': bool(same), 'tok': tok is not None, 'error': err}))\n")
  env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1",
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  env.pop("HF_HUB_CACHE", None)
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["same"] and got["tok"]
  assert "'org/absent@v1'" in got["error"]
  assert hub.download_command("org/absent", "v1") in got["error"]
