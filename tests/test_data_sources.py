"""Prompt sources: every file format, field mapping, skip reasons, errors with file:line, splits."""
import hashlib
import json
import os
import random

import datasets
import pytest

from persyn_jax import export
from persyn_jax.data import sources as S

ROWS = [
    {"id": "a", "question": "What is 2+2?", "answer": "4"},
    {"id": "b", "question": "Name a prime.", "answer": "7"},
    {"question": "  what IS 2+2? ", "answer": "4"},       # duplicate of "a" after normalization
    {"question": "", "answer": "x"},                      # empty
    {"question": "x" * 500, "answer": "x"},               # too long
    {"question": None, "answer": "x"},                    # empty
    {"question": "no id here", "answer": "y"},            # id from content
]


def write(tmp_path, fmt, rows=ROWS, name="prompts"):
  path = os.path.join(tmp_path, f"{name}.{fmt}")
  if fmt == "jsonl":
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  elif fmt == "json":
    json.dump(rows, open(path, "w"))
  else:
    ds = datasets.Dataset.from_list([{"id": r.get("id"), "question": r["question"],
                                      "answer": r["answer"]} for r in rows])
    if fmt == "parquet":
      ds.to_parquet(path)
    elif fmt == "csv":
      ds.to_csv(path, index=False)
    elif fmt == "arrow":
      path = os.path.join(tmp_path, name)
      ds.save_to_disk(path)
  return path


CFG = dict(prompt_field="question", reference_field="answer", max_prompt_chars=100)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "arrow"])
def test_formats_give_the_same_prompts(tmp_path, fmt):
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=write(tmp_path, fmt), **CFG))
  expect_id = "h" + hashlib.sha256(b"no id here").hexdigest()[:20]
  assert [p["id"] for p in prompts] == ["a", "b", expect_id]
  assert [p["prompt"] for p in prompts] == ["What is 2+2?", "Name a prime.", "no id here"]
  assert [p["reference"] for p in prompts] == ["4", "7", "y"]
  assert stats["rows"] == 7 and stats["kept"] == 3
  assert stats["skipped"] == {"empty": 2, "not_text": 0, "too_long": 1, "bad_messages": 0,
                              "duplicate": 1, "duplicate_id": 0}


def load(path, **kw):
  """(records, skip counts): what two sources holding the same rows must agree on."""
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=str(path), **kw))
  return prompts, stats["skipped"]


def test_csv_cells_are_the_text_they_hold_as_in_json_lines(tmp_path):
  """No type or NA guessing: ids 007 stay 007 (not 7), a reference 0.50 stays 0.50, prompts NA and
  null are text (not skipped as empty), NaN is a reference (not None); a blank id among int-looking
  ids gets the content hash (pandas made the column float and the load failed on row 0)."""
  rows = [{"id": "007", "prompt": "How many?", "answer": "0.50"},
          {"id": "008", "prompt": "NA", "answer": "None"},
          {"id": "", "prompt": "null", "answer": "007"},
          {"id": "010", "prompt": "Say 'nan'", "answer": "NaN"}]
  path = tmp_path / "zeros.csv"
  path.write_text("id,prompt,answer\n" + "".join(",".join(r.values()) + "\n" for r in rows))
  expect = load(write(tmp_path, "jsonl", rows), reference_field="answer")
  assert [p["id"] for p in expect[0]] == ["007", "008", S.content_id("null"), "010"]
  for streaming in (False, True):
    assert load(path, streaming=streaming, reference_field="answer") == expect
  path = tmp_path / "blank_id.csv"
  path.write_text("id,prompt\n1,one?\n,two?\n3,three?\n")
  jsonl = tmp_path / "blank_id.jsonl"
  jsonl.write_text('{"id": 1, "prompt": "one?"}\n{"id": null, "prompt": "two?"}\n'
                   '{"id": 3, "prompt": "three?"}\n')
  assert [p["id"] for p in load(path)[0]] == ["1", S.content_id("two?"), "3"]
  assert load(path) == load(jsonl)


def test_a_boolean_reference_is_its_json_text_as_in_a_csv_file(tmp_path):
  """A JSON true is the reference "true" (as the CSV cell true reads), not Python's "True"."""
  jsonl = tmp_path / "b.jsonl"
  jsonl.write_text('{"id": "a", "prompt": "2 > 1?", "answer": true}\n'
                   '{"id": "b", "prompt": "1 > 2?", "answer": false}\n')
  csv = tmp_path / "b.csv"
  csv.write_text("id,prompt,answer\na,2 > 1?,true\nb,1 > 2?,false\n")
  prompts, _ = load(jsonl, reference_field="answer")
  assert [p["reference"] for p in prompts] == ["true", "false"]
  assert load(csv, reference_field="answer")[0] == prompts


def test_a_float_column_from_pandas_reads_like_json_lines(tmp_path):
  """pandas stores an int column with a missing value as floats with NaN: an integral float id is
  the integer's string (as an int id in JSON Lines), and NaN is no value (id: the content hash;
  reference and kept fields: None). A fractional id is still refused."""
  pd = pytest.importorskip("pandas")
  frame = pd.DataFrame({"id": [1, None, 3], "prompt": ["a?", "b?", "c?"],
                        "answer": [2, None, 4.5], "kind": [1.0, float("nan"), 2.0]})
  frame.to_parquet(tmp_path / "pd.parquet")
  jsonl = tmp_path / "pd.jsonl"
  jsonl.write_text('{"id": 1, "prompt": "a?", "answer": 2.0, "kind": 1.0}\n'
                   '{"id": null, "prompt": "b?", "answer": null, "kind": null}\n'
                   '{"id": 3, "prompt": "c?", "answer": 4.5, "kind": 2.0}\n')
  kw = dict(reference_field="answer", keep_fields=("kind",))
  prompts, _ = got = load(tmp_path / "pd.parquet", **kw)
  assert [p["id"] for p in prompts] == ["1", S.content_id("b?"), "3"]
  assert [p.get("reference") for p in prompts] == ["2.0", None, "4.5"]
  assert prompts[1].get("kind") is None
  assert got == load(jsonl, **kw)
  pd.DataFrame({"id": [1.5], "prompt": ["a?"]}).to_parquet(tmp_path / "frac.parquet")
  with pytest.raises(S.PromptFileError, match=r"frac\.parquet row 0: id field 'id' = 1\.5"):
    load(tmp_path / "frac.parquet")


def test_single_arrow_file(tmp_path):
  folder = write(tmp_path, "arrow")
  (name,) = [n for n in os.listdir(folder) if n.endswith(".arrow")]
  prompts, _ = S.load_prompts(S.PromptSourceConfig(path=os.path.join(folder, name), **CFG))
  assert [p["id"] for p in prompts][:2] == ["a", "b"]


def test_directory_of_mixed_files_in_sorted_order(tmp_path):
  write(tmp_path, "jsonl", [{"id": "1", "question": "one", "answer": ""}], name="b")
  write(tmp_path, "parquet", [{"id": "2", "question": "two", "answer": ""}], name="a")
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=str(tmp_path), **CFG))
  assert [p["id"] for p in prompts] == ["2", "1"]
  assert [os.path.basename(f) for f in stats["files"]] == ["a.parquet", "b.jsonl"]


def test_a_directory_skips_hidden_files_and_hidden_folders(tmp_path):
  """A notebook's .ipynb_checkpoints/prompts-checkpoint.jsonl is a stale copy, not more prompts
  (it was read, while a hidden file beside it was skipped)."""
  write(tmp_path, "jsonl", [{"id": "a", "question": "new x?", "answer": ""}], name="prompts")
  write(tmp_path, "jsonl", [{"id": "h", "question": "hidden?", "answer": ""}], name=".hidden")
  (tmp_path / ".ipynb_checkpoints" / "deeper").mkdir(parents=True)
  for folder in (".ipynb_checkpoints", ".ipynb_checkpoints/deeper"):
    write(tmp_path / folder, "jsonl", [{"id": "old", "question": "stale?", "answer": ""}])
  (tmp_path / "sub").mkdir()
  write(tmp_path / "sub", "jsonl", [{"id": "b", "question": "more?", "answer": ""}])
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=str(tmp_path), **CFG))
  assert [p["id"] for p in prompts] == ["a", "b"]
  assert [os.path.relpath(f, tmp_path) for f in stats["files"]] == [
      "prompts.jsonl", os.path.join("sub", "prompts.jsonl")]
  hidden = tmp_path / ".data"  # a hidden folder named as the path itself is read
  hidden.mkdir()
  write(hidden, "jsonl", [{"id": "c", "question": "named?", "answer": ""}])
  prompts, _ = S.load_prompts(S.PromptSourceConfig(path=str(hidden), **CFG))
  assert [p["id"] for p in prompts] == ["c"]


def test_chat_messages_field(tmp_path):
  rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
          {"messages": [{"role": "user"}]},
          {"messages": "not a list"},
          {"messages": []},
          {"text": 5, "messages": [{"role": "user", "content": "hi"}]}]
  path = write(tmp_path, "jsonl", rows)
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=path, messages_field="messages"))
  assert len(prompts) == 2 and prompts[0]["prompt"] == "hi"
  assert prompts[0]["messages"][0] == {"role": "system", "content": "be brief"}
  assert prompts[0]["id"] != prompts[1]["id"]  # the system turn is part of the content hash
  assert stats["skipped"]["bad_messages"] == 2 and stats["skipped"]["empty"] == 1


def test_a_chat_is_cut_after_its_last_user_turn(tmp_path):
  """A full conversation (a messages column that ends with the reference answer) is the prompt up
  to its last user turn: the turns after it are neither part of the prompt, its id nor its dedup
  key (before, [user, assistant] was kept whole and exported as user, assistant, assistant). A
  chat without a user turn (a system turn alone) has nothing to answer: bad_messages."""
  sys_, hi, hello = ({"role": r, "content": c} for r, c in [("system", "be brief"), ("user", "hi"),
                                                          ("assistant", "hello")])
  ask, four = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
  rows = [{"messages": [sys_, hi, hello, ask, four]},
          {"messages": [sys_, hi, hello, ask]},                 # the same prompt: a duplicate
          {"messages": [hi, hello, hello]},
          {"messages": [sys_]}, {"messages": [hello]}, {"messages": [sys_, hello]}]
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=write(tmp_path, "jsonl", rows),
                                                       messages_field="messages"))
  assert [p["messages"] for p in prompts] == [[sys_, hi, hello, ask], [hi]]
  assert [p["prompt"] for p in prompts] == ["2+2?", "hi"]
  assert [p["id"] for p in prompts] == [S.content_id([sys_, hi, hello, ask]), S.content_id([hi])]
  assert stats["skipped"]["duplicate"] == 1 and stats["skipped"]["bad_messages"] == 3
  roles = [m["role"] for m in export.conversation({**prompts[1], "response": "hey"})]
  assert roles == ["user", "assistant"]


def test_non_text_prompt_is_skipped_not_fatal(tmp_path):
  path = write(tmp_path, "jsonl", [{"question": 3}, {"question": ["a"]}, {"question": "ok"}])
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=path, prompt_field="question"))
  assert [p["prompt"] for p in prompts] == ["ok"] and stats["skipped"]["not_text"] == 2


def test_malformed_jsonl_names_file_and_line(tmp_path):
  path = os.path.join(tmp_path, "bad.jsonl")
  with open(path, "w") as f:
    f.write('{"prompt": "fine"}\n\n{"prompt": "broken\n{"prompt": "x"}\n')
  with pytest.raises(S.PromptFileError, match=r"bad\.jsonl:3: malformed JSON"):
    S.load_prompts(S.PromptSourceConfig(path=path))
  with open(path, "w") as f:
    f.write('{"prompt": "fine"}\n[1, 2]\n')
  with pytest.raises(S.PromptFileError, match=r"bad\.jsonl:2: expected a JSON object"):
    S.load_prompts(S.PromptSourceConfig(path=path))


def test_malformed_json_and_parquet(tmp_path):
  path = os.path.join(tmp_path, "bad.json")
  open(path, "w").write('[\n {"prompt": "a"},\n {"prompt": }\n]')
  with pytest.raises(S.PromptFileError, match=r"bad\.json:3: malformed JSON"):
    S.load_prompts(S.PromptSourceConfig(path=path))
  path = os.path.join(tmp_path, "bad.parquet")
  open(path, "wb").write(b"PAR1 this is not parquet")
  with pytest.raises(S.PromptFileError, match=r"bad\.parquet: cannot read as parquet"):
    S.load_prompts(S.PromptSourceConfig(path=path))


def test_a_json_file_holding_json_lines_is_read_as_json_lines(tmp_path):
  """Hub datasets often name JSON Lines .json, and datasets' json loader reads them (they were
  refused: lines.json:2: malformed JSON (Extra data)). A malformed line is still named, and a
  .json that is neither a list nor JSON Lines is still refused."""
  rows = [{"id": "a", "question": "x?", "answer": "1"}, {"id": "b", "question": "y?",
                                                         "answer": "2\u2028"}]
  lines = tmp_path / "lines.json"
  lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n")
  expect = load(write(tmp_path, "jsonl", rows), **CFG)
  assert load(lines, **CFG) == expect
  assert len(datasets.load_dataset("json", data_files=str(lines), split="train")) == 2
  one = tmp_path / "one.json"
  one.write_text(json.dumps(rows[0]) + "\n")  # JSON Lines of one row
  assert load(one, **CFG) == load(write(tmp_path, "jsonl", rows[:1]), **CFG)
  lines.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n{broken\n")
  with pytest.raises(S.PromptFileError, match=r"lines\.json:3: malformed JSON"):
    S.load_prompts(S.PromptSourceConfig(path=str(lines), **CFG))
  lines.write_text(json.dumps(rows, indent=1) + "\nxyz\n")  # a list, then garbage
  with pytest.raises(S.PromptFileError, match=r"lines\.json:\d+: malformed JSON \(Extra data"):
    S.load_prompts(S.PromptSourceConfig(path=str(lines), **CFG))
  lines.write_text(json.dumps(rows[0], indent=1))
  with pytest.raises(S.PromptFileError, match=r"lines\.json: expected a JSON list of objects, or "
                                              r"one object per line \(JSON Lines\), got dict"):
    S.load_prompts(S.PromptSourceConfig(path=str(lines), **CFG))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_a_byte_order_mark_at_the_start_is_not_data(tmp_path, fmt):
  """Windows editors save UTF-8 with a byte-order mark. datasets' loaders (and our CSV reader)
  read such a file as without it; the JSON readers refused it (bad.jsonl:1: malformed JSON
  (Unexpected UTF-8 BOM)). A mark inside a later line is still malformed JSON."""
  path = write(tmp_path, fmt)
  plain = load(path, **CFG)
  data = open(path, "rb").read()
  open(path, "wb").write(b"\xef\xbb\xbf" + data)
  assert load(path, **CFG) == plain
  loader = "csv" if fmt == "csv" else "json"
  assert len(datasets.load_dataset(loader, data_files=path, split="train")) == len(ROWS)
  if fmt == "jsonl":
    lines = data.split(b"\n")
    open(path, "wb").write(b"\n".join([lines[0], b"\xef\xbb\xbf" + lines[1], *lines[2:]]))
    with pytest.raises(S.PromptFileError, match=r"prompts\.jsonl:2: malformed JSON"):
      load(path, **CFG)


@pytest.mark.parametrize("field", ["id", "prompt", "reference", "messages", "teacher", "scores"])
def test_keep_fields_cannot_name_a_field_of_the_record(field):
  """A kept column named like a record field would replace what the source or a stage sets: a
  raw TypeError before (make() got multiple values for argument 'id'), or a RecordError naming no
  file (teacher = 3: must be a string)."""
  with pytest.raises(ValueError, match=rf"keep_fields=\['kind', '{field}'\]: \['{field}'\] are "
                                       r"fields of the record itself .*id_field"):
    S.PromptSourceConfig(path="p.jsonl", keep_fields=("kind", field))


def test_a_kept_value_with_no_json_form_names_the_file_and_line(tmp_path):
  """A float column's infinity (Parquet, or the Infinity token Python's json reads) has no JSON
  form; the record's error now says where it came from."""
  path = tmp_path / "p.jsonl"
  path.write_text('{"id": "1", "prompt": "hi", "kind": "a"}\n'
                  '{"id": "2", "prompt": "yo", "kind": Infinity}\n')
  with pytest.raises(S.PromptFileError, match=r"p\.jsonl:2: record field 'kind' = inf: has no "
                                              r"JSON form"):
    S.load_prompts(S.PromptSourceConfig(path=str(path), keep_fields=("kind",)))


def test_wrong_field_mapping_is_an_error(tmp_path):
  path = write(tmp_path, "jsonl")
  with pytest.raises(S.PromptFileError, match=r"prompts\.jsonl:1: no field 'prompt' in any row"):
    S.load_prompts(S.PromptSourceConfig(path=path))


def test_dedup_off_keeps_near_duplicates_but_never_duplicate_ids(tmp_path):
  rows = [{"id": "a", "prompt": "Hi"}, {"id": "b", "prompt": "hi"}, {"id": "a", "prompt": "other"}]
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=write(tmp_path, "jsonl", rows),
                                                       dedup=False))
  assert [p["id"] for p in prompts] == ["a", "b"] and stats["skipped"]["duplicate_id"] == 1


def prompts_n(n):
  return [{"schema": 1, "id": f"p{i}", "prompt": f"q{i}"} for i in range(n)]


def test_splits_are_deterministic_and_disjoint():
  ps = prompts_n(1000)
  a = S.split_prompts(ps, probe=100, eval=0.1, seed=7)
  shuffled = ps[:]
  random.Random(0).shuffle(shuffled)
  b = S.split_prompts(shuffled, probe=100, eval=0.1, seed=7)  # another host, another order
  for k in ("probe", "rest", "train", "eval"):
    assert {p["id"] for p in a[k]} == {p["id"] for p in b[k]}
  assert len(a["eval"]) == 100 and len(a["probe"]) == 100 and len(a["rest"]) == 800
  ids = lambda k: {p["id"] for p in a[k]}
  assert not ids("eval") & ids("train") and ids("probe") | ids("rest") == ids("train")
  assert not ids("probe") & ids("rest")
  assert [p["id"] for p in a["train"]] == [p["id"] for p in ps if p["id"] not in ids("eval")]
  c = S.split_prompts(ps, probe=100, eval=0.1, seed=8)
  assert {p["id"] for p in c["probe"]} != ids("probe")


def test_split_fraction_and_errors():
  s = S.split_prompts(prompts_n(200), probe=0.25, seed=0)
  assert len(s["probe"]) == 50 and s["eval"] == []
  with pytest.raises(ValueError, match="only 10 prompts"):
    S.split_prompts(prompts_n(10), probe=11)
  with pytest.raises(ValueError, match="duplicate prompt id 'p0'"):
    S.split_prompts(prompts_n(3) + prompts_n(1), probe=1)


# -- hub-style datasets: a config name and a split; streaming ------------------------------------

README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train.jsonl
  - split: test
    path: main/test.jsonl
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train.jsonl
---
# Two configs of one dataset, as gsm8k has ("main", "socratic")
"""


def dataset_folder(tmp_path):
  """A local dataset laid out as a hub repository; `datasets` reads its README's `configs:`."""
  root = tmp_path / "gsm_like"
  for config, split, n in [("main", "train", 3), ("main", "test", 2), ("socratic", "train", 4)]:
    (root / config).mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{config}-{split}-{i}", "question": f"{config} {split} {i}", "answer": str(i)}
            for i in range(n)]
    write(root / config, "jsonl", rows, name=split)
  (root / "README.md").write_text(README)
  return str(root)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_config_name_and_split_select_one_part_of_a_dataset(tmp_path, streaming):
  root = dataset_folder(tmp_path)
  for name, split, expect in [("main", "test", ["main-test-0", "main-test-1"]),
                              ("main", "train", [f"main-train-{i}" for i in range(3)]),
                              ("socratic", "train", [f"socratic-train-{i}" for i in range(4)])]:
    for fmt in ("hub", "auto"):  # auto: the README's configs make the folder a dataset, not files
      prompts, stats = S.load_prompts(S.PromptSourceConfig(
          path=root, format=fmt, name=name, split=split, streaming=streaming, **CFG))
      assert [p["id"] for p in prompts] == expect
      assert [p["reference"] for p in prompts] == [str(i) for i in range(len(expect))]
      assert stats["files"] == [root]


@pytest.mark.parametrize("prefix", [b"\xef\xbb\xbf", b"\n", b"  \r\n"])
def test_a_readme_with_a_mark_or_blank_lines_before_its_front_matter_declares_the_configs(tmp_path, prefix):
  """A README.md saved with a byte-order mark, or with blank lines before its front matter:
  datasets reads its `configs:`; the folder was taken for plain files, so every split's rows were
  read together (the test split's among the train prompts) and a name was refused."""
  root = dataset_folder(tmp_path)
  readme = os.path.join(root, "README.md")
  text = open(readme, "rb").read()
  open(readme, "wb").write(prefix + text)
  want = [r["id"] for r in datasets.load_dataset(root, "main", split="test")]
  assert want == ["main-test-0", "main-test-1"]
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=root, name="main", split="test", **CFG))
  assert [p["id"] for p in prompts] == want and stats["files"] == [root]


def test_a_dataset_with_configs_needs_a_name_and_a_known_split(tmp_path):
  root = dataset_folder(tmp_path)
  with pytest.raises(S.PromptFileError,
                     match=r"(?s)gsm_like \(name=None, split='train'\): cannot read as hub"
                           r".*'main', 'socratic'"):
    S.load_prompts(S.PromptSourceConfig(path=root, **CFG))
  with pytest.raises(S.PromptFileError, match=r"name='main', split='dev'"):
    S.load_prompts(S.PromptSourceConfig(path=root, name="main", split="dev", **CFG))


def test_a_name_on_plain_files_is_an_error(tmp_path):
  path = write(tmp_path, "jsonl")
  with pytest.raises(S.PromptFileError, match=r"prompts\.jsonl: name='main' selects a config"):
    S.load_prompts(S.PromptSourceConfig(path=path, name="main", **CFG))
  with pytest.raises(ValueError, match=r"split='train\[:10\]': a streamed source cannot be sliced"):
    S.PromptSourceConfig(path=path, split="train[:10]", streaming=True)


def test_a_split_on_plain_files_is_an_error(tmp_path):
  """Prompt files are one split ("train"): another split was silently ignored (all rows read)."""
  (tmp_path / "folder").mkdir()
  path = write(tmp_path / "folder", "jsonl")
  for where in (path, str(tmp_path / "folder")):
    with pytest.raises(S.PromptFileError, match=r"(folder|prompts\.jsonl): split='test' selects "
                                                r"a split of a hub dataset .*\(leave split out\)$"):
      S.load_prompts(S.PromptSourceConfig(path=where, split="test", **CFG))
  with pytest.raises(S.PromptFileError, match=r"split='train\[:1\]' .* set max_prompts"):
    S.load_prompts(S.PromptSourceConfig(path=path, split="train[:1]", **CFG))
  assert len(S.load_prompts(S.PromptSourceConfig(path=path, split="train", **CFG))[0]) == 3


def test_a_split_of_a_saved_dataset_takes_datasets_split_syntax(tmp_path):
  """A save_to_disk DatasetDict: a split name, or a slice as load_dataset takes it ("train[:1]"
  failed with KeyError: 'train[:1]'); an unknown split or a bad slice names the splits there are."""
  rows = [{"id": f"p{i}", "question": f"question {i}", "answer": str(i)} for i in range(4)]
  full = datasets.Dataset.from_list(rows)
  path = str(tmp_path / "dd")
  datasets.DatasetDict({"train": full, "test": full.select([3])}).save_to_disk(path)
  for split, expect in [("train", ["p0", "p1", "p2", "p3"]), ("test", ["p3"]),
                        ("train[:1]", ["p0"]), ("train[-2:]", ["p2", "p3"]),
                        ("train[:50%]+test", ["p0", "p1", "p3"])]:
    prompts, _ = S.load_prompts(S.PromptSourceConfig(path=path, split=split, **CFG))
    assert [p["id"] for p in prompts] == expect, split
  with pytest.raises(S.PromptFileError, match=r"dd \(split='dev'\): .*Unknown split.*'test'"):
    S.load_prompts(S.PromptSourceConfig(path=path, split="dev", **CFG))
  with pytest.raises(S.PromptFileError, match=r"split='train\[:'\).*splits: \['test', 'train'\]"):
    S.load_prompts(S.PromptSourceConfig(path=path, split="train[:", **CFG))
  one = str(tmp_path / "one")
  full.save_to_disk(one)  # a Dataset, not a DatasetDict: one split, "train"
  prompts, _ = S.load_prompts(S.PromptSourceConfig(path=one, split="train[1:2]", **CFG))
  assert [p["id"] for p in prompts] == ["p1"]
  with pytest.raises(S.PromptFileError, match=r"Unknown split.*\['train'\]"):
    S.load_prompts(S.PromptSourceConfig(path=one, split="test", **CFG))


def arrow_files(folder):
  return [f for _, _, files in os.walk(folder) for f in files if f.endswith(".arrow")]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_streaming_gives_the_same_records_without_converting(tmp_path, fmt, monkeypatch):
  path = write(tmp_path, fmt)
  cache = tmp_path / "datasets_cache"
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
  streamed = S.load_prompts(S.PromptSourceConfig(path=path, streaming=True, **CFG))
  assert arrow_files(cache) == []  # nothing converted into the Arrow cache
  assert streamed == S.load_prompts(S.PromptSourceConfig(path=path, **CFG))
  if fmt != "jsonl":  # the reference path does convert: the check above can fail
    assert arrow_files(cache)


def test_streaming_stops_reading_at_max_prompts(tmp_path):
  # a bad line past the first chunk of a large CSV: streaming never reads that far, while the
  # converting path reads the whole file first
  path = tmp_path / "big.csv"
  with open(path, "w") as f:
    f.write("id,prompt\n")
    f.writelines(f"{i},question {i}\n" for i in range(20_000))
    f.write("x,y,z,w\n")
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=str(path), streaming=True,
                                                       max_prompts=5))
  assert [p["prompt"] for p in prompts] == [f"question {i}" for i in range(5)]
  assert stats["rows"] == 5
  with pytest.raises(S.PromptFileError, match=r"big\.csv: cannot read as csv"):
    S.load_prompts(S.PromptSourceConfig(path=str(path), max_prompts=5))
  with pytest.raises(S.PromptFileError, match=r"big\.csv row 20000: cannot read as csv"):
    S.load_prompts(S.PromptSourceConfig(path=str(path), streaming=True))  # all of it: the row
