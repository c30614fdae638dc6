"""Prompt sources: files or a hub dataset in, validated prompt records out; deterministic splits.

Formats: JSON Lines (`.jsonl`), JSON (`.json`, a list of objects, or JSON Lines as datasets' json
loader reads them), Parquet, CSV, Arrow (`.arrow` files or a `save_to_disk` folder), a directory of
these (read in sorted path order; hidden files and folders are skipped), or a Hugging Face dataset:
a hub name (`format: hub`) or a local dataset folder whose README.md declares `configs:`, with a
config `name` (gsm8k's "main") and a `split`. Parquet/CSV/Arrow/hub go through `datasets`; JSON and
JSON Lines are parsed here line by line so a malformed line is reported with its file and line
number, and so a row whose prompt is not text is skipped (and counted) instead of failing Arrow's
column typing. A CSV's cells are read as text, with no type or NA guessing, so a CSV gives the
records that the same rows give in JSON Lines.

`streaming: true` iterates Parquet/CSV/hub sources row by row instead of first converting them into
the `datasets` Arrow cache, so a large source costs no disk or memory up front and `max_prompts`
stops the reading early. JSON Lines and `save_to_disk` folders are read lazily either way.

Each kept prompt becomes a record (records.make): `id` (the id field, else a stable content hash;
a NaN, how pandas marks a missing value, counts as missing),
`prompt` (the text, or the last user turn of a chat), `messages` (chat prompts, cut after the last
user turn: later turns are a conversation's answer, not its prompt), `reference` (the
reference answer, when mapped). Skipped rows are counted by reason for the stage manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import unicodedata
from collections import Counter
from typing import Any, Iterator, Mapping, Sequence

from persyn_jax import fs
from persyn_jax.data import records as rec

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
              ".arrow": "arrow"}
FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "arrow", "hub")
SKIP_REASONS = ("empty", "not_text", "too_long", "bad_messages", "duplicate", "duplicate_id")


class PromptFileError(ValueError):
  """A prompt file that cannot be read (the message names the file and line or row)."""


@dataclasses.dataclass(frozen=True)
class PromptSourceConfig:
  """Where prompts come from and which fields hold what."""

  path: str = ""                        # file, directory, or hub dataset name (format="hub")
  format: str = "auto"                  # one of FORMATS; auto = by extension / folder contents
  prompt_field: str = "prompt"          # prompt text (ignored when messages_field is set)
  messages_field: str | None = None     # chat prompts: a list of {"role", "content"}
  reference_field: str | None = None    # reference answer (for verifiers and evaluation)
  id_field: str | None = "id"           # missing or empty -> a stable content hash
  name: str | None = None               # hub dataset config / subset (gsm8k: "main")
  split: str = "train"                  # hub / save_to_disk split, or a slice ("train[:100]")
  streaming: bool = False               # iterate the source instead of converting it first
  max_prompt_chars: int = 8192          # longer prompts are skipped ("too_long")
  dedup: bool = True                    # drop prompts whose normalized text was seen before
  max_prompts: int | None = None        # keep at most this many (after filtering), in file order
  keep_fields: tuple[str, ...] = ()     # other columns carried into the records (e.g. a category)

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"format={self.format!r}: expected one of {FORMATS}")
    if self.max_prompt_chars < 1:
      raise ValueError(f"max_prompt_chars={self.max_prompt_chars}: must be positive")
    if self.max_prompts is not None and self.max_prompts < 1:
      raise ValueError(f"max_prompts={self.max_prompts}: must be at least 1 (null keeps every "
                       f"prompt)")
    taken = [f for f in self.keep_fields if f in rec.FIELDS]
    if taken:
      raise ValueError(f"keep_fields={list(self.keep_fields)}: {taken} are fields of the record "
                       f"itself ({', '.join(rec.FIELDS)}), which the source or the stages set; "
                       "map a prompt's id, text, chat or reference with id_field, prompt_field, "
                       "messages_field or reference_field")
    if self.streaming and "[" in self.split:
      raise ValueError(f"split={self.split!r}: a streamed source cannot be sliced; use max_prompts")


_SURROGATE = re.compile("[\ud800-\udfff]")


def normalize(text: str) -> str:
  """Dedup key: Unicode NFKC, case-folded, whitespace runs collapsed."""
  return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def content_id(content: str | Sequence[Mapping[str, str]]) -> str:
  """A stable id from the prompt's content (the same on every host, run and Python version)."""
  blob = content if isinstance(content, str) else json.dumps(
      [[m["role"], m["content"]] for m in content], ensure_ascii=False)
  return "h" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


# -- reading rows --------------------------------------------------------------------------------

def _read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        # a byte-order mark starting the file (Windows editors write one) is not data, as for
        # datasets' json loader and the CSV reader
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}:{lineno}: not UTF-8 ({e})") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") \
            from None
      if not isinstance(row, dict):
        raise PromptFileError(f"{path}:{lineno}: expected a JSON object per line, got "
                              f"{type(row).__name__}")
      yield f"{path}:{lineno}", row


def _json_lines(text: str) -> bool:
  """Whether `text` (a .json file) is JSON Lines, as the hub's .json files often are and as
  datasets' json loader reads them: its first non-blank line is a whole JSON object."""
  # lines end at "\n" alone, as for the JSON Lines reader (a JSON string may hold a raw U+2028)
  first = next((line for line in text.split("\n") if line.strip()), "")
  try:
    return isinstance(json.loads(first), dict)
  except json.JSONDecodeError:
    return False


def _read_json(path: str) -> Iterator[tuple[str, dict]]:
  try:
    with open(path, encoding="utf-8-sig") as f:  # a leading byte-order mark is not data
      text = f.read()
  except UnicodeDecodeError as e:
    raise PromptFileError(f"{path}: not UTF-8 ({e})") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == "Extra data" and _json_lines(text):  # one object per line
      yield from _read_jsonl(path)
      return
    raise PromptFileError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") \
        from None
  if isinstance(data, dict) and "\n" not in text.strip():
    yield from _read_jsonl(path)  # JSON Lines of one row
    return
  if not isinstance(data, list):
    raise PromptFileError(f"{path}: expected a JSON list of objects, or one object per line (JSON "
                          f"Lines), got {type(data).__name__}")
  for i, row in enumerate(data):
    if not isinstance(row, dict):
      raise PromptFileError(f"{path}: item {i} is {type(row).__name__}, expected an object")
    yield f"{path}[{i}]", row


def _read_hf(path: str, fmt: str, cfg: PromptSourceConfig) -> Iterator[tuple[str, dict]]:
  import datasets  # heavy import, only when needed

  saved = fmt == "arrow" and os.path.isdir(path)
  what = path + (f" (name={cfg.name!r}, split={cfg.split!r})" if fmt == "hub" else
                 f" (split={cfg.split!r})" if saved else "")
  try:
    if fmt == "hub":
      ds = datasets.load_dataset(path, cfg.name, split=cfg.split, streaming=cfg.streaming)
    elif saved:
      ds = _saved_split(datasets.load_from_disk(path), cfg.split)  # memory-mapped: no streaming
    else:
      text = _csv_as_text(path) if fmt == "csv" else {}
      ds = datasets.load_dataset(fmt, data_files=[path], split="train", streaming=cfg.streaming,
                                 **text)
    rows = iter(ds)
  except Exception as e:  # datasets/pyarrow raise many types; name the file
    raise PromptFileError(f"{what}: cannot read as {fmt}: {type(e).__name__}: {e}") from None
  i = 0
  while True:
    try:  # a streamed source reads (and fails) row by row
      row = next(rows)
    except StopIteration:
      return
    except Exception as e:
      raise PromptFileError(f"{what} row {i}: cannot read as {fmt}: {type(e).__name__}: {e}") \
          from None
    yield f"{path} row {i}", row
    i += 1


def _saved_split(ds, split: str):
  """The rows of a save_to_disk dataset that `split` names, in the split syntax load_dataset takes
  for a hub dataset ("test", "train[:100]", "train[10%:]", "train+test"); a saved Dataset (not a
  DatasetDict) is one split, "train" or the split it was made from. An unknown split or a
  malformed slice is a ValueError that names the splits there are."""
  import datasets
  if isinstance(ds, datasets.DatasetDict):
    parts = dict(ds)
  else:
    parts = {name: ds for name in ("train", str(ds.split)) if name != "None"}
  if split in parts:
    return parts[split]
  try:
    spans = datasets.ReadInstruction.from_spec(split).to_absolute(
        {name: len(d) for name, d in parts.items()})
  except (ValueError, AssertionError) as e:  # "Unknown split" lists them; a bad slice does not
    raise ValueError(e if "one of" in str(e) else f"{e} (splits: {sorted(parts)})") from None
  return datasets.concatenate_datasets(
      [parts[s.splitname].select(range(s.from_, s.to)) for s in spans])


def _csv_as_text(path: str) -> dict:
  """load_dataset("csv") arguments that read every cell as the text it holds.

  pandas otherwise guesses each column's type (ids 007 -> 7, a reference 0.50 -> 0.5, an int
  column with a blank cell -> floats) and reads blank, NA, null and NaN cells as missing, so a CSV
  would give other prompts than the same rows in JSON Lines. CSV has no null: a blank cell is "".
  """
  import datasets
  import pandas as pd
  columns = pd.read_csv(path, nrows=0).columns  # pandas' own names ("Unnamed: 0", "a.1")
  return {"features": datasets.Features({str(c): datasets.Value("string") for c in columns}),
          "keep_default_na": False}


def _is_dataset_repo(path: str) -> bool:
  """A local dataset folder laid out as a hub repository: README.md front matter with `configs:`."""
  readme = os.path.join(path, "README.md")
  if not os.path.isfile(readme):
    return False
  # utf-8-sig: a README saved with a byte-order mark still opens with its front matter, as
  # datasets reads it (else its splits would be read together as plain files)
  with open(readme, encoding="utf-8-sig", errors="replace") as f:
    text = f.read(1 << 20)
  # huggingface_hub's front-matter rule (repocard.REGEX_YAML_BLOCK): blank lines may come first
  m = re.match(r"\s*---[ \t]*(?:\r\n|\r|\n)(.*?)(?:\r\n|\r|\n)---[ \t]*(?:\r\n|\r|\n|$)", text,
               re.DOTALL)
  return bool(m and re.search(r"^configs:", m.group(1), re.MULTILINE))


def _is_saved_dataset(path: str) -> bool:
  return os.path.isdir(path) and any(
      os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def source_files(cfg: PromptSourceConfig) -> list[tuple[str, str]]:
  """(path, format) of every input, in a deterministic order."""
  path = cfg.path
  if cfg.format == "hub":
    return [(path, "hub")]
  if not path:
    raise PromptFileError("prompt source: no path given")
  if fs.is_remote(path):  # a gs:// file or folder: listed from a local copy, named by its URL
    if fs.isfile(path):
      local = fs.local_copy(path)
    elif fs.isdir(path):
      local = fs.local_dir(path)
    else:
      raise PromptFileError(f"{path}: no such object or directory")
    found = source_files(dataclasses.replace(cfg, path=local))
    return [(path + p[len(local):].replace(os.sep, "/") if p.startswith(local) else p, fmt)
            for p, fmt in found]
  if _is_saved_dataset(path):
    return [(path, "arrow")]
  if os.path.isdir(path) and _is_dataset_repo(path):
    return [(path, "hub")]
  if cfg.name is not None:
    raise PromptFileError(f"{path}: name={cfg.name!r} selects a config of a hub dataset (format: "
                          f"hub) or of a dataset folder whose README.md declares `configs:`")
  if cfg.split != "train":  # what datasets calls the one split of plain files
    hint = "; to read only the first rows, set max_prompts" if "[" in cfg.split else ""
    raise PromptFileError(f"{path}: split={cfg.split!r} selects a split of a hub dataset (format: "
                          f"hub), of a dataset folder whose README.md declares `configs:`, or of a "
                          f"save_to_disk DatasetDict; prompt files are one split (leave split "
                          f"out){hint}")
  if os.path.isdir(path):
    found = []
    for root, dirs, files in os.walk(path):
      # hidden folders hold copies, not prompts (.ipynb_checkpoints, .git, .cache): skip them as
      # hidden files are skipped
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for name in sorted(files):
        ext = os.path.splitext(name)[1].lower()
        if ext in EXTENSIONS and not name.startswith("."):
          fmt = EXTENSIONS[ext] if cfg.format == "auto" else cfg.format
          found.append((os.path.join(root, name), fmt))
    if not found:
      raise PromptFileError(f"{path}: no prompt files ({', '.join(EXTENSIONS)}) in this directory")
    return found
  if os.path.isfile(path):
    ext = os.path.splitext(path)[1].lower()
    if cfg.format != "auto":
      return [(path, cfg.format)]
    if ext not in EXTENSIONS:
      raise PromptFileError(f"{path}: unknown prompt file type {ext!r}; set format to one of "
                            f"{FORMATS[1:]}")
    return [(path, EXTENSIONS[ext])]
  raise PromptFileError(f"{path}: no such file or directory (for a hub dataset set format: hub)")


def iter_rows(cfg: PromptSourceConfig) -> Iterator[tuple[str, dict]]:
  """(where, row) for every row of every input."""
  for path, fmt in source_files(cfg):
    if fs.is_remote(path):
      path = fs.local_copy(path) if fs.isfile(path) else fs.local_dir(path)
    if fmt == "jsonl":
      yield from _read_jsonl(path)
    elif fmt == "json":
      yield from _read_json(path)
    else:
      yield from _read_hf(path, fmt, cfg)


# -- rows to prompt records ----------------------------------------------------------------------

def _messages(value: Any) -> list[dict] | None:
  if not isinstance(value, (list, tuple)) or not value:
    return None
  out = []
  for m in value:
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
        or not isinstance(m.get("content"), str):
      return None
    out.append({"role": m["role"], "content": m["content"]})
  return out


def _missing(value: Any) -> bool:
  """None, or a float NaN: how pandas (a Parquet file it wrote, a float column) marks no value."""
  return value is None or (isinstance(value, float) and math.isnan(value))


def _to_record(where: str, row: Mapping[str, Any], cfg: PromptSourceConfig
               ) -> tuple[dict | None, str | None, str | None]:
  """(record, dedup key, skip reason) for one row."""
  value = row.get(cfg.messages_field or cfg.prompt_field)
  messages = None
  if cfg.messages_field:
    if value is None or (isinstance(value, (list, tuple)) and not value):
      return None, None, "empty"
    messages = _messages(value)
    if messages is None:
      return None, None, "bad_messages"
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:  # a system or assistant turn alone: nothing for a teacher to answer
      return None, None, "bad_messages"
    # a full conversation (a chat dataset's messages column ends with the reference answer): the
    # prompt is the chat up to its last user turn, which the teachers answer; the turns after it
    # would be exported as a second answer
    messages = messages[:last + 1]
    if any(_SURROGATE.search(m["content"]) for m in messages):
      return None, None, "not_text"
    text = messages[-1]["content"]
    full = "\n".join(m["role"] + ": " + m["content"] for m in messages)
    if not "".join(m["content"] for m in messages).strip():
      return None, None, "empty"
  else:
    if value is None:
      return None, None, "empty"
    if not isinstance(value, str) or _SURROGATE.search(value):  # lone surrogate: no UTF-8 form
      return None, None, "not_text"
    text = full = value
    if not text.strip():
      return None, None, "empty"
  if len(full) > cfg.max_prompt_chars:
    return None, None, "too_long"
  rid = row.get(cfg.id_field) if cfg.id_field else None
  if isinstance(rid, float) and rid.is_integer():  # an int column that pandas made float (a NaN)
    rid = int(rid)
  if _missing(rid) or (isinstance(rid, str) and not rid.strip()):
    rid = content_id(messages if messages else text)
  elif isinstance(rid, (int, str)) and not isinstance(rid, bool):
    rid = str(rid)
  else:
    raise PromptFileError(f"{where}: id field {cfg.id_field!r} = {rid!r}: expected a string or int")
  reference = None
  if cfg.reference_field:
    reference = row.get(cfg.reference_field)
    if _missing(reference):
      reference = None
    elif not isinstance(reference, str):
      # a number as its text (2 -> "2"); anything else, a bool included, as its JSON text
      # (true -> "true", as a CSV cell reads, not Python's "True")
      number = isinstance(reference, (int, float)) and not isinstance(reference, bool)
      reference = str(reference) if number else json.dumps(reference)
  kept = {}
  for name in cfg.keep_fields:
    v = row.get(name)
    v = None if _missing(v) else v
    if v is not None and not isinstance(v, (str, int, float, bool)):
      raise PromptFileError(f"{where}: field {name!r} = {v!r:.80}: keep_fields takes plain values")
    kept[name] = v
  try:
    record = rec.make(rid, text, messages=messages, reference=reference, **kept)
  except rec.RecordError as e:  # a kept value with no JSON form (a float column's inf)
    raise PromptFileError(f"{where}: {e}") from None
  return record, normalize(full), None


def load_prompts(cfg: PromptSourceConfig) -> tuple[list[dict], dict]:
  """(prompt records, stats) from the configured source.

  stats = {"source", "files", "rows", "kept", "skipped": {reason: count}} for the stage manifest.
  """
  kept, seen_keys, seen_ids = [], set(), set()
  skipped: Counter = Counter()
  rows = 0
  field = cfg.messages_field or cfg.prompt_field
  field_seen, first = False, None
  for where, row in iter_rows(cfg):
    rows += 1
    field_seen = field_seen or field in row
    first = first or (where, sorted(row))
    record, key, reason = _to_record(where, row, cfg)
    if reason is None and cfg.dedup and key in seen_keys:
      reason = "duplicate"
    if reason is None and record["id"] in seen_ids:
      reason = "duplicate_id"
    if reason is not None:
      skipped[reason] += 1
      continue
    seen_keys.add(key)
    seen_ids.add(record["id"])
    kept.append(record)
    if cfg.max_prompts is not None and len(kept) >= cfg.max_prompts:
      break
  if rows and not field_seen:  # a wrong field mapping, not a row to skip
    raise PromptFileError(f"{first[0]}: no field {field!r} in any row (fields: {first[1]}); set "
                          f"{'messages_field' if cfg.messages_field else 'prompt_field'}")
  stats = {"source": cfg.path, "files": [p for p, _ in source_files(cfg)], "rows": rows,
           "kept": len(kept), "skipped": {r: skipped.get(r, 0) for r in SKIP_REASONS}}
  return kept, stats


# -- deterministic splits ------------------------------------------------------------------------

def _rank(seed: int, salt: str, id: str) -> int:
  return int.from_bytes(hashlib.sha256(f"{seed}\0{salt}\0{id}".encode()).digest()[:8], "big")


def _take(ids: Sequence[str], amount: int | float, seed: int, salt: str, what: str) -> set[str]:
  """The ids with the smallest seeded hashes: `amount` of them (int) or that fraction (float)."""
  if isinstance(amount, bool) or amount < 0:
    raise ValueError(f"{what}={amount!r}: a count >= 0 or a fraction in [0, 1]")
  if isinstance(amount, float):
    if amount > 1:
      raise ValueError(f"{what}={amount}: a fraction must be <= 1 (use an int for a count)")
    amount = round(amount * len(ids))
  if amount > len(ids):
    raise ValueError(f"{what}={amount}: only {len(ids)} prompts available")
  return set(sorted(ids, key=lambda i: (_rank(seed, salt, i), i))[:amount])


def split_prompts(prompts: Sequence[Mapping[str, Any]], *, probe: int | float, eval: int | float = 0,
                  seed: int = 0) -> dict[str, list[dict]]:
  """{"probe", "rest", "train", "eval"} by seeded hash of each prompt's id.

  `eval` prompts are held out first; `probe` (a count or a fraction of the remaining prompts) are
  chosen among the rest; "train" = probe + rest. Each list keeps the input order. The result
  depends only on the set of ids and the seed, so every host and every rerun agree.
  """
  ids = [p["id"] for p in prompts]
  if len(set(ids)) != len(ids):
    dup = next(i for i, c in Counter(ids).items() if c > 1)
    raise ValueError(f"split_prompts: duplicate prompt id {dup!r}")
  held = _take(ids, eval, seed, "eval", "eval")
  train_ids = [i for i in ids if i not in held]
  probe_ids = _take(train_ids, probe, seed, "probe", "probe")
  out = {"probe": [], "rest": [], "train": [], "eval": []}
  for p in prompts:
    i = p["id"]
    if i in held:
      out["eval"].append(dict(p))
      continue
    out["train"].append(dict(p))
    out["probe" if i in probe_ids else "rest"].append(dict(p))
  return out
