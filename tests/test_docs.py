"""The documentation states only what the repository has: README.md's results block is the one
docs/make_readme_results.py makes from the committed report, docs/CONFIG.md is the one
docs/make_config_docs.py makes from the dataclasses, and every relative link and every file path
written in README.md and docs/*.md names a file or folder of the repository."""
from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
# Run outputs and caches: a mention that only matches these is not a repository file.
SKIP_DIRS = {".git", "runs", ".ci", "__pycache__", ".venv", "venv", ".pytest_cache"}
# Top-level folders a written path may start with; a path that starts elsewhere (a run output such
# as `report/report.json`, a placeholder such as `/ckpt/x`) is not a claim about the repository.
REPO_DIRS = ("persyn_jax/", "tests/", "docs/", "bench/", "tpu/", "configs/", ".ci/")


def _script(name: str):
  """A docs/ script as a module (docs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "docs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _repo_files() -> list[str]:
  out = []
  for d, dirs, files in os.walk(ROOT):
    dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")]
    rel = os.path.relpath(d, ROOT)
    for name in files + dirs:
      out.append(name if rel == "." else f"{rel}/{name}")
  return out


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return re.sub(r"<!--.*?-->", "", f.read(), flags=re.S)  # comments are notes, not claims


def _code_spans(text: str) -> list[str]:
  """Inline `code` spans and the words of fenced code blocks."""
  fences = re.findall(r"```.*?\n(.*?)```", text, flags=re.S)
  inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
  return inline + [w for block in fences for w in block.split()]


def test_the_readme_results_block_is_generated_from_the_committed_report():
  mod = _script("make_readme_results")
  with open(os.path.join(ROOT, "docs", "toy_run", "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert mod.current_block(readme).startswith(mod.render(report))
  assert mod.current_block(readme) == mod.make_block(), (
      "README.md's results block differs from docs/toy_run/report.json and "
      "docs/toy_study/report.json: run python docs/make_readme_results.py")


def test_the_readme_speed_table_is_generated_from_the_committed_bench_results():
  mod = _script("make_readme_results")
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    table = mod.current_block(f.read(), markers=mod.SPEED)
  assert table == mod.make_speed_block(), (
      "README.md's speed table differs from bench/results/: run python docs/make_readme_results.py")
  # an independent reading of two of the files
  sft_row = [l for l in table.splitlines() if l.startswith("| SFT step")]
  for folder in ("", "cpu_avx512"):  # one column per machine
    with open(os.path.join(ROOT, "bench", "results", folder, "sft_cpu.json"), encoding="utf-8") as f:
      sft = json.load(f)
    assert len(sft_row) == 1 and f"**{sft['jax_over_torch_tokens_per_s']:.2f}×**" in sft_row[0]
  with open(os.path.join(ROOT, "bench", "results", "sampler_cpu.json"), encoding="utf-8") as f:
    rows = json.load(f)["rows"]
  decode = [l for l in table.splitlines() if l.startswith("| greedy decode")]
  assert len(decode) == 1 and all(f"{r['ratio_decode_tok_s']:.2f}×" in decode[0] for r in rows)


def test_the_results_block_shows_the_study_reports_findings():
  """An independent reading of the committed study: each kind's best teacher by measured gain and
  each signal's agreement appear in the README as the study report has them."""
  mod = _script("make_readme_results")
  path = os.path.join(ROOT, "docs", "toy_study", "report.json")
  with open(path, encoding="utf-8") as f:
    study = json.load(f)["study"]
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    block = mod.current_block(f.read())
  for kind in study["categories"]:
    row = [l for l in block.splitlines() if l.startswith(f"| {kind} |")]
    assert len(row) == 1 and ", ".join(study["best_by_gain"][kind]) in row[0], (kind, row)
  for name in ("quality", "learnability", "combined"):
    assert f"{study['signals'][name]['agreement']:.2f}" in block, name


def test_the_results_block_shows_the_reports_numbers():
  """An independent reading of the report: each policy's accuracy and the generation counts
  appear in the block as the report has them."""
  mod = _script("make_readme_results")
  with open(os.path.join(ROOT, "docs", "toy_run", "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  block = mod.render(report)
  for policy, e in report["eval"].items():
    row = [l for l in block.splitlines() if l.startswith(f"| {mod.NAMES.get(policy, policy)} |")]
    assert len(row) == 1 and f"{e['score']:.3f}" in row[0], (policy, row)
  costs = report["costs"]
  assert f"needed {costs['route_then_generate']['generations']} generations" in block
  assert f"would need {costs['generate_then_select']['generations']}" in block
  replaced = mod.replace_block(f"a\n{mod.BEGIN}\nold\n{mod.END}\nb\n", "new")
  assert replaced == f"a\n{mod.BEGIN}\nnew\n{mod.END}\nb\n"
  with pytest.raises(ValueError, match="no <!-- results:begin -->"):
    mod.replace_block("no markers here", "new")


def test_the_config_tables_are_generated_from_the_dataclasses():
  mod = _script("make_config_docs")
  with open(os.path.join(ROOT, "docs", "CONFIG.md"), encoding="utf-8") as f:
    assert f.read() == mod.render(), "docs/CONFIG.md is out of date: run python docs/make_config_docs.py"


def test_the_config_tables_list_every_field_with_its_default():
  """Every RunConfig section and field, read here with dataclasses, has its row."""
  import dataclasses
  from persyn_jax.run_config import RunConfig
  text = _script("make_config_docs").render()
  for f in dataclasses.fields(RunConfig):
    assert f"| `{f.name}` |" in text
  from persyn_jax.sampling.config import SamplingConfig
  section = text.split("## `sampling` (SamplingConfig)")[1].split("\n## ")[0]
  for f in dataclasses.fields(SamplingConfig):
    default = f.default if not isinstance(f.default, tuple) else list(f.default)
    assert f"| `{f.name}` |" in section and f"`{default!r}`" in section, f.name


def test_a_field_comment_continued_on_the_next_lines_is_shown_whole():
  """A comment that runs on under the field's own `#` (study.epochs, eval.benchmarks[].format)
  is one meaning, not cut at the end of its first line."""
  text = _script("make_config_docs").render()
  assert ("| `category_field` | `str` | `'kind'` | the prompt field the gains are grouped by (kept "
          "by the prompt source: prompts.source.keep_fields); \"\": one group |") in text
  assert "more epochs give a studied student about the steps of a policy's student) |" in text
  assert "ifeval (input_data.jsonl: key, prompt) |" in text


def test_every_relative_link_in_the_docs_exists():
  bad = []
  for doc in DOCS:
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(doc)):
      if re.match(r"^[a-z]+:", target) or target.startswith("#"):
        continue  # a URL, or an anchor in the same file
      path = os.path.normpath(os.path.join(os.path.dirname(doc), target.split("#")[0]))
      if not os.path.exists(path):
        bad.append(f"{os.path.relpath(doc, ROOT)}: ({target})")
  assert not bad, "links to files the repository does not have:\n" + "\n".join(bad)


def test_every_file_path_written_in_the_docs_exists():
  """A `path/like/this.py` mention names a file of the repository: a path from the root
  (`persyn_jax/stages/probe.py`, `tpu/run.sh`), or a module named relative to its package
  (`stages/probe.py`, `io_utils.py`, `test_faults.py::test_x`), found as the end of a real path."""
  files = _repo_files()
  bad = []
  for doc in DOCS:
    for span in _code_spans(_read(doc)):
      for token in re.split(r"[\s,()]+", span):
        token = token.split("::")[0].strip("'\".;:")
        if not token or any(c in token for c in "<>*{}$[]=") or re.match(r"^[a-z]+:", token):
          continue  # placeholders, globs, variables, URLs
        is_module = token.endswith((".py", ".sh", ".sbatch"))
        is_repo_path = token.startswith(REPO_DIRS)
        if not (is_module or is_repo_path):
          continue
        t = token.rstrip("/")
        if not any(f == t or f.endswith("/" + t) for f in files):
          bad.append(f"{os.path.relpath(doc, ROOT)}: {token}")
  assert not bad, "paths the repository does not have:\n" + "\n".join(sorted(set(bad)))


def test_the_docs_name_no_file_outside_the_repository():
  """Design notes kept outside the repository are never referred to, in the docs nor in the code,
  configs and scripts (docstrings cite the paper itself)."""
  code = [os.path.join(d, f) for top in ("persyn_jax", "bench", "tpu", "configs", "tests")
          for d, _, fs in os.walk(os.path.join(ROOT, top)) for f in fs
          if f.endswith((".py", ".sh", ".sbatch", ".yaml")) and f != "test_docs.py"]
  assert len(code) > 100
  for doc in DOCS + code + [os.path.join(ROOT, "docs", f)
                            for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".py")]:
    with open(doc, encoding="utf-8") as f:
      text = f.read()
    for name in ("PAPER.md", "DESIGN.md", "STYLE.md", "../shared", "/work/"):
      assert name not in text, f"{os.path.relpath(doc, ROOT)} mentions {name}"


def test_the_readme_keeps_the_two_quick_start_commands_and_its_length():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert "pip install -e . && python -m persyn_jax.train" in readme
  test_command = 'pip install -e ".[test]" && python -m pytest -q -n 2 tests'
  assert test_command in readme
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    assert test_command in f.read(), ".ci/run no longer runs the README's test command"
  assert len(readme.splitlines()) <= 300


def test_every_test_named_in_the_docs_exists():
  """`test_file.py::test_name` (and a following `::test_other` of the same file) name real tests,
  so the failure table never cites a test that was renamed or removed."""
  bad = []
  for doc in DOCS:
    current = None
    for span in re.findall(r"`([^`\n]+)`", _read(doc)):
      for part in re.split(r"[;,]\s*", span):
        m = re.match(r"^(?:tests/)?(test_\w+\.py)?::(test_\w+)$", part.strip())
        if not m:
          continue
        current = m.group(1) or current
        path = os.path.join(ROOT, "tests", current or "")
        with open(path, encoding="utf-8") as f:
          if not re.search(rf"def {m.group(2)}\b", f.read()):
            bad.append(f"{os.path.relpath(doc, ROOT)}: {current}::{m.group(2)}")
  assert not bad, "tests the docs name that do not exist:\n" + "\n".join(bad)
