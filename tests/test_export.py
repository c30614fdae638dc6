"""Data out: a policy's dataset (ArrayRecord shards) as jsonl / parquet / a `datasets` directory,
read back with the readers TRL and LLaMA-Factory users use (json, pandas, pyarrow, datasets)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import datasets
import pandas as pd
import pyarrow.parquet as pq
import pytest

from persyn_jax import export as ex
from persyn_jax.data import records as rec
from persyn_jax.data import shards
from persyn_jax.io_utils import remove_dead_temps

SYSTEM = "You are a careful tutor."


def records(policy="persyn"):
  return [
      {"schema": rec.SCHEMA_VERSION, "id": "p0", "prompt": "What is 2+2?", "teacher": "big",
       "response": "4", "policy": policy, "reference": "4", "tokens": {"prompt": 5, "response": 1}},
      {"schema": rec.SCHEMA_VERSION, "id": "7", "prompt": "ignored when messages are set",
       "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Name a prime. ünïcode ✓"}],
       "teacher": "small", "response": "7", "policy": policy},
      {"schema": rec.SCHEMA_VERSION, "id": "p2", "prompt": "Say 'quoted' \"text\"\nnewline",
       "teacher": "big", "response": "'quoted' \"text\"", "policy": policy, "kind": "x"},
  ]


def expected_messages(system=None):
  """The conversations of records(), written out by hand."""
  sys_turn = [{"role": "system", "content": system}] if system else []
  return [
      sys_turn + [{"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}],
      sys_turn + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Name a prime. ünïcode ✓"},
                  {"role": "assistant", "content": "7"}],
      sys_turn + [{"role": "user", "content": "Say 'quoted' \"text\"\nnewline"},
                  {"role": "assistant", "content": "'quoted' \"text\""}],
  ]


def make_run(tmp_path, policies=("persyn", "random"), name="toy", export_section=None):
  run = tmp_path / "run"
  for p in policies:
    shards.write_records(str(run / "data" / p), "data", records(p), num_shards=2, host=0)
  cfg = {"name": name}
  if export_section is not None:
    cfg["export"] = export_section
  (run / "config.json").write_text(json.dumps(cfg))
  return str(run)


def assert_no_temps(d):
  left = [os.path.join(r, n) for r, ds, fs in os.walk(d) for n in ds + fs
          if ".tmp-" in n or ".old-" in n]
  assert left == []


def test_jsonl_reads_back_as_chat_messages_in_dataset_order(tmp_path):
  run = make_run(tmp_path)
  paths = ex.export_run(run, ["persyn"], ex.ExportConfig(formats=("jsonl",)), name="toy")
  path = paths["persyn"]["jsonl"]
  assert path == os.path.join(run, "export", "toy_persyn", "messages.jsonl")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [r["messages"] for r in rows] == expected_messages()
  assert [r["id"] for r in rows] == ["p0", "7", "p2"]
  assert [r["teacher"] for r in rows] == ["big", "small", "big"]
  assert {r["policy"] for r in rows} == {"persyn"}


def test_a_configured_system_prompt_opens_every_conversation(tmp_path):
  run = make_run(tmp_path)
  paths = ex.export_run(run, ["persyn"], ex.ExportConfig(formats=("jsonl",), system=SYSTEM))
  with open(paths["persyn"]["jsonl"], encoding="utf-8") as f:
    assert [json.loads(line)["messages"] for line in f] == expected_messages(SYSTEM)


def test_export_system_is_not_added_to_a_prompt_with_its_own_system_turn(tmp_path):
  """As docs/DATA_OUT.md says: a prompt whose messages open with a system turn keeps it, alone;
  the other conversations open with export.system."""
  run = tmp_path / "run"
  own = {"schema": rec.SCHEMA_VERSION, "id": "s", "prompt": "x", "teacher": "big",
         "response": "Arr.", "policy": "persyn",
         "messages": [{"role": "system", "content": "Talk like a pirate."},
                      {"role": "user", "content": "Hi"}]}
  shards.write_records(str(run / "data" / "persyn"), "data", records() + [own], num_shards=1,
                       host=0)
  path = ex.export_run(str(run), ["persyn"], ex.ExportConfig(system=SYSTEM))["persyn"]["jsonl"]
  with open(path, encoding="utf-8") as f:
    got = [json.loads(line)["messages"] for line in f]
  assert got == expected_messages(SYSTEM) + [own["messages"] + [
      {"role": "assistant", "content": "Arr."}]]


def test_parquet_reads_back_with_pandas_and_pyarrow(tmp_path):
  run = make_run(tmp_path)
  path = ex.export_run(run, ["persyn"], ex.ExportConfig(formats=("parquet",)))["persyn"]["parquet"]
  table = pq.read_table(path)
  assert table.column_names == ["id", "policy", "teacher", "messages", "record"]
  assert table.column("messages").to_pylist() == expected_messages()
  df = pd.read_parquet(path)
  assert list(df["id"]) == ["p0", "7", "p2"]
  assert [[dict(m) for m in ms] for ms in df["messages"]] == expected_messages()
  # the whole record, metadata included, survives as JSON text
  assert [json.loads(r) for r in df["record"]] == records()
  assert_no_temps(run)


def test_hf_dataset_reads_back_with_load_from_disk(tmp_path):
  run = make_run(tmp_path)
  path = ex.export_run(run, ["persyn"], ex.ExportConfig(formats=("hf_dataset",)))["persyn"][
      "hf_dataset"]
  ds = datasets.load_from_disk(path)
  assert len(ds) == 3
  assert ds["messages"] == expected_messages()
  assert [json.loads(r)["reference"] if "reference" in json.loads(r) else None
          for r in ds["record"]] == ["4", None, None]


def test_rewriting_an_export_replaces_it_and_leaves_no_temporaries(tmp_path):
  run = make_run(tmp_path)
  config = ex.ExportConfig(formats=ex.FORMATS)
  ex.export_run(run, ["persyn"], config)
  paths = ex.export_run(run, ["persyn"], ex.ExportConfig(formats=ex.FORMATS, system=SYSTEM))
  assert datasets.load_from_disk(paths["persyn"]["hf_dataset"])["messages"] == expected_messages(
      SYSTEM)
  assert pq.read_table(paths["persyn"]["parquet"]).column("messages").to_pylist() == \
      expected_messages(SYSTEM)
  assert_no_temps(run)


def dead_pid() -> int:
  """The pid of a process that has exited (a killed writer's)."""
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_an_export_removes_what_killed_writers_left(tmp_path):
  """A writer killed midway leaves a half parquet (`data.parquet.tmp-<pid>`), a built or half-built
  hf_dataset directory (`hf_dataset.tmp-<pid>/`) and a swapped-out one (`hf_dataset.old-<pid>/`).
  The next export removes them: `datasets.load_dataset(<policy folder>)` read their arrow files
  along with the export's (9 rows for 3 records) before."""
  run = make_run(tmp_path)
  config = ex.ExportConfig(formats=ex.FORMATS)
  d = os.path.dirname(ex.export_run(run, ["persyn"], config, name="toy")["persyn"]["jsonl"])
  pid = dead_pid()
  shutil.copytree(os.path.join(d, "hf_dataset"), os.path.join(d, f"hf_dataset.tmp-{pid}"))
  os.remove(os.path.join(d, f"hf_dataset.tmp-{pid}", "state.json"))  # killed before it
  shutil.copytree(os.path.join(d, "hf_dataset"), os.path.join(d, f"hf_dataset.old-{pid}"))
  with open(os.path.join(d, "data.parquet"), "rb") as f:
    half = f.read()[:200]
  with open(os.path.join(d, f"data.parquet.tmp-{pid}"), "wb") as f:
    f.write(half)
  with open(os.path.join(d, f"messages.jsonl.tmp-{pid}"), "w", encoding="utf-8") as f:
    f.write('{"id": "p0", "mess')
  ex.export_run(run, ["persyn"], config, name="toy")
  assert_no_temps(run)
  assert sorted(os.listdir(d)) == ["data.parquet", "hf_dataset", "messages.jsonl"]
  ds = datasets.load_dataset(d, split="train", cache_dir=str(tmp_path / "cache"))
  assert ds["id"] == ["p0", "7", "p2"]
  assert ds["messages"] == expected_messages()


def test_only_the_temps_of_writers_no_longer_running_are_removed(tmp_path):
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    dead, path = dead_pid(), str(tmp_path / "data.parquet")
    for pid in (dead, live.pid, os.getpid()):
      for tag in ("tmp", "old"):
        os.makedirs(f"{path}.{tag}-{pid}/sub")
    with open(f"{path}.tmp-x", "w") as f:  # not a writer's temp
      f.write("x")
    with open(str(tmp_path / "other.tmp-1"), "w") as f:  # another file's
      f.write("x")
    assert sorted(remove_dead_temps(path)) == [f"{path}.old-{dead}", f"{path}.tmp-{dead}"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"data.parquet.{t}-{p}" for p in (live.pid, os.getpid()) for t in ("tmp", "old")] +
        ["data.parquet.tmp-x", "other.tmp-1"])
  finally:
    live.kill()
    live.wait()


def is_conversational(example) -> bool:
  """What TRL's SFTTrainer checks before applying the chat template (written from its docs): a
  `messages` list of {role, content} dicts."""
  msgs = example.get("messages")
  return (isinstance(msgs, list) and len(msgs) > 0 and all(
      isinstance(m, dict) and set(m) >= {"role", "content"} for m in msgs))


def test_trl_sees_a_conversational_messages_column_ending_with_the_answer(tmp_path):
  run = make_run(tmp_path)
  path = ex.export_run(run, ["persyn"], ex.ExportConfig(formats=("jsonl",), system=SYSTEM))[
      "persyn"]["jsonl"]
  # how a TRL user loads it: the `json` builder of datasets on the file
  ds = datasets.load_dataset("json", data_files=path, split="train")
  assert "messages" in ds.column_names
  for example in ds:
    assert is_conversational(example)
    roles = [m["role"] for m in example["messages"]]
    assert roles[0] == "system" and roles[-1] == "assistant"
    assert set(roles) <= {"system", "user", "assistant"}


def test_llama_factory_entry_names_the_file_and_its_message_tags(tmp_path):
  run = make_run(tmp_path)
  out = tmp_path / "lf"
  out.mkdir()
  # an entry of another dataset in the same dataset_dir is kept
  (out / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
  ex.export_run(run, ["persyn", "random"], ex.ExportConfig(formats=("jsonl",), dir=str(out)),
                name="toy")
  info = json.loads((out / "dataset_info.json").read_text())
  assert set(info) == {"mine", "toy_persyn", "toy_random"}
  entry = info["toy_persyn"]
  assert entry["formatting"] == "sharegpt"
  # read as LLaMA-Factory does: file_name relative to the dataset_dir, then columns and tags
  with open(out / entry["file_name"], encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  tags = entry["tags"]
  for row, want in zip(rows, expected_messages()):
    msgs = row[entry["columns"]["messages"]]
    assert [(m[tags["role_tag"]], m[tags["content_tag"]]) for m in msgs] == \
        [(m["role"], m["content"]) for m in want]
    assert msgs[-1][tags["role_tag"]] == tags["assistant_tag"]
    assert {m[tags["role_tag"]] for m in msgs} <= {tags["user_tag"], tags["assistant_tag"],
                                                   tags["system_tag"]}


def test_runs_sharing_an_export_dir_keep_their_own_files_and_entries(tmp_path):
  """Two runs (toy, math) export the same policy into one LLaMA-Factory dataset_dir: each entry
  reads its own run's answers (both used to point at persyn/messages.jsonl, the last run's)."""
  out = tmp_path / "lf"
  out.mkdir()
  (out / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
  config = ex.ExportConfig(formats=ex.FORMATS, dir=str(out))
  for name in ("toy", "math"):
    run = tmp_path / name
    shards.write_records(str(run / "data" / "persyn"), "data", [
        {**r, "response": f"{name}: {r['response']}"} for r in records()], num_shards=1, host=0)
    paths = ex.export_run(str(run), ["persyn"], config, name=name)["persyn"]
    assert {f: os.path.relpath(p, out) for f, p in paths.items()} == {
        f: os.path.join(f"{name}_persyn", ex.FILES[f]) for f in ex.FORMATS}
  info = json.loads((out / "dataset_info.json").read_text())
  assert set(info) == {"mine", "toy_persyn", "math_persyn"}
  for name in ("toy", "math"):
    want = [f"{name}: {r['response']}" for r in records()]
    with open(out / info[f"{name}_persyn"]["file_name"], encoding="utf-8") as f:
      assert [json.loads(line)["messages"][-1]["content"] for line in f] == want
    d = out / f"{name}_persyn"
    assert [m[-1]["content"] for m in pq.read_table(d / "data.parquet").column(
        "messages").to_pylist()] == want
    assert [m[-1]["content"] for m in datasets.load_from_disk(str(d / "hf_dataset"))[
        "messages"]] == want


def test_the_cli_exports_an_existing_run_with_its_saved_config(tmp_path, capsys):
  run = make_run(tmp_path, export_section={"formats": ["parquet"], "dir": "", "system": SYSTEM})
  assert ex.main([run]) == 0
  exported = os.path.join(run, "export")
  assert sorted(os.listdir(exported)) == ["toy_persyn", "toy_random"]
  for p in ("persyn", "random"):
    assert pq.read_table(os.path.join(exported, f"toy_{p}", "data.parquet")).column(
        "messages").to_pylist() == expected_messages(SYSTEM)
  assert "data.parquet" in capsys.readouterr().out
  # --formats overrides the saved section
  assert ex.main([run, "--formats", "jsonl,hf_dataset", "--policies", "random"]) == 0
  assert os.path.exists(os.path.join(exported, "toy_random", "messages.jsonl"))
  assert datasets.load_from_disk(os.path.join(exported, "toy_random", "hf_dataset"))[
      "messages"] == expected_messages(SYSTEM)
  assert not os.path.exists(os.path.join(exported, "toy_persyn", "messages.jsonl"))


def test_the_cli_names_an_unknown_policy_or_format_in_one_line(tmp_path, capsys):
  """Bad input gives one line and exit 2, as persyn_jax.train's (a ShardError traceback for an
  unknown policy before); nothing is exported."""
  run = make_run(tmp_path)
  assert ex.main([run, "--policies", "persyn,nosuch"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ")
  assert "['nosuch']" in err and "known: ['persyn', 'random']" in err
  assert ex.main([run, "--formats", "csv"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "unknown formats ['csv']" in err
  assert not os.path.exists(os.path.join(run, "export"))
  # as a command: no traceback
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [os.path.dirname(os.path.dirname(ex.__file__)), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, "-m", "persyn_jax.export", run, "--policies", "nosuch"],
                        capture_output=True, text=True, env=env)
  assert proc.returncode == 2 and proc.stderr.startswith("error: --policies: ")
  assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_the_cli_names_a_run_without_datasets(tmp_path):
  with pytest.raises(FileNotFoundError, match="generate stage"):
    ex.main([str(tmp_path)])


def test_an_unknown_format_is_refused_naming_the_known_ones():
  with pytest.raises(ValueError, match=r"export.formats: unknown formats \['csv'\].*jsonl"):
    ex.ExportConfig(formats=("csv",))


def test_the_default_run_config_exports_jsonl():
  from persyn_jax.run_config import RunConfig
  assert RunConfig().export.formats == ("jsonl",)


@pytest.mark.parametrize("content,match", [
    ('{"mine": {"file_name": "mine.json"},}', r"not valid JSON \(Expecting property name"),
    ("", r"not valid JSON \(Expecting value"),
    ("[1, 2]", r"holds a list, not an object of dataset entries"),
])
def test_an_unreadable_dataset_info_is_refused_naming_it_before_anything_is_written(
    tmp_path, content, match):
  """A dataset_info.json already in the export dir (a LLaMA-Factory dataset_dir, maintained by
  hand) that is not a JSON object: the error names the file (it was a bare JSONDecodeError or
  TypeError), and no policy's files are written first."""
  run = make_run(tmp_path)
  out = tmp_path / "lf"
  out.mkdir()
  info = out / "dataset_info.json"
  info.write_text(content)
  with pytest.raises(ValueError, match=re.escape(str(info)) + ": " + match):
    ex.export_run(run, ["persyn"], ex.ExportConfig(formats=("jsonl",), dir=str(out)), name="toy")
  assert info.read_text() == content and sorted(os.listdir(out)) == ["dataset_info.json"]
