"""The embedded toy world: deterministic build, real HF checkpoints, teachers with their styles."""
import dataclasses
import glob
import json
import os
import re

import pytest
import torch
import transformers as T

from persyn_jax import toyworld
from persyn_jax.io_utils import sha256_file
from persyn_jax.toyworld import check, tasks
from persyn_jax.toyworld.build import build
from persyn_jax.toyworld.specs import TOKENIZER_VOCAB
from persyn_jax.verify import verify_math


def test_build_is_deterministic(tiny_world, tmp_path):
  """A fresh build equals the session's (conftest: built by whichever worker came first)."""
  quiet = lambda m: None  # noqa: E731
  a = tiny_world
  b = build("tiny", 0, str(tmp_path / "b"), log=quiet)
  assert b.root != a.root
  assert a.info["hashes"] == b.info["hashes"]
  assert len(a.info["hashes"]) == 5
  for name, path, _ in a.teachers:
    assert sha256_file(os.path.join(path, "model.safetensors")) == a.info["hashes"][name]
  c = build("tiny", 1, str(tmp_path / "c"), log=quiet)
  assert c.info["hashes"] != a.info["hashes"]  # another seed, another world


def test_student_is_smaller_than_every_teacher():
  for scale in toyworld.SCALES.values():
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 3})
    student = toyworld.model_config(scale.student, TOKENIZER_VOCAB, tok).num_params()
    for t in scale.teachers:
      assert toyworld.model_config(t, TOKENIZER_VOCAB, tok).num_params() > student


def expected_correct(style: str, p: dict) -> bool:
  """Each style's designed mistakes, restated from tasks.py's docstrings (an independent
  reference): stepwise slips on sub and two-step problems about apples, coins or cards; sloppy
  adds instead of multiplying; equation and verbose are always right."""
  if style == "stepwise":
    words = set(p["prompt"].replace(",", " ").replace(".", " ").replace("?", " ").split())
    return not (p["kind"] in ("sub", "two_step") and words & {"apples", "coins", "cards"})
  if style == "sloppy" and p["kind"] == "mul":
    a, _, b, _ = p["ops"][0]
    return a * b == a + b
  return True


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_styles_are_right_exactly_where_designed(kind):
  """Correct by construction: every style's answer, checked by the math verifier, is right on
  exactly the problems its design says, and its accuracy over many problems is DESIGNED's."""
  import random
  rng = random.Random(0)
  problems = tasks.make_problems(1800, 3, kinds=(kind,))
  for name, style in tasks.STYLES.items():
    right = [verify_math(style(p, rng), p["answer"]) for p in problems]
    assert right == [float(expected_correct(name, p)) for p in problems], name
    assert sum(right) / len(right) == pytest.approx(tasks.DESIGNED[name][kind], abs=0.03), name


def test_design_covers_every_style_and_kind():
  assert set(tasks.DESIGNED) == set(tasks.STYLES)
  for name, table in tasks.DESIGNED.items():
    assert set(table) == set(tasks.KINDS), name
  # the trade-off the world is built around: a strong teacher right everywhere, and the
  # step-writing teachers each wrong somewhere
  assert all(v == 1.0 for v in tasks.DESIGNED["equation"].values())
  assert min(tasks.DESIGNED["stepwise"].values()) < 1 and min(tasks.DESIGNED["sloppy"].values()) < 1


def style_of(text: str) -> str:
  for name, pattern in STYLE_PATTERNS.items():
    if re.search(pattern, text):
      return name
  raise AssertionError(f"no style writes {text!r}")


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_student_prior_is_generic(kind):
  """The student's prior sees every teacher's format equally often on every kind: no kind is
  taught in one teacher's style."""
  import random
  rng = random.Random(1)
  problems = tasks.make_problems(1200, 4, kinds=(kind,))
  seen = [style_of(tasks.student_prior(p, rng)) for p in problems]
  formats = {"equation": "equation", "verbose": "verbose", "stepwise": "steps", "sloppy": "steps"}
  shares = {f: sum(formats[s] == f for s in seen) / len(seen) for f in set(formats.values())}
  assert shares == pytest.approx({"equation": 0.25, "verbose": 0.25, "steps": 0.5}, abs=0.05)


def test_world_check_fails_a_teacher_off_its_design():
  designed = {"equation-L": tasks.DESIGNED["equation"], "sloppy-Q": tasks.DESIGNED["sloppy"]}
  near = {"equation-L": {"add": 0.95, "sub": 0.91, "mul": 1.0, "two_step": 0.93},
          "sloppy-Q": {"add": 1.0, "sub": 0.97, "mul": 0.2, "two_step": 0.99}}
  check.check_accuracy(near, designed, 0.1)  # within the tolerance: no error
  off = {**near, "equation-L": {**near["equation-L"], "two_step": 0.2}}
  with pytest.raises(check.WorldCheckError, match=r"equation-L on two_step: measured 0\.200, "
                                                  r"designed 1\.000"):
    check.check_accuracy(off, designed, 0.1, where="w")
  missing = {"equation-L": near["equation-L"]}
  with pytest.raises(check.WorldCheckError, match="sloppy-Q on add: not measured"):
    check.check_accuracy(missing, designed, 0.1)


def test_a_world_whose_teachers_miss_their_design_is_not_built(tmp_path, monkeypatch):
  """The tiny scale's teachers train a few steps and cannot learn their styles: held to the
  design, its build fails at the first teacher, before training the others, and caches nothing."""
  from persyn_jax.toyworld import specs
  strict = dataclasses.replace(specs.SCALES["tiny"], check=4, tolerance=0.1)
  monkeypatch.setitem(specs.SCALES, "tiny", strict)
  first, *rest = [t.name for t in strict.teachers]
  with pytest.raises(check.WorldCheckError, match="off their design") as e:
    build("tiny", 0, str(tmp_path), log=lambda m: None)
  assert f"the build stops at {first}: {', '.join(rest)} not trained" in str(e.value)
  assert f"{first} on " in str(e.value)
  assert glob.glob(str(tmp_path / "toyworld" / "*" / "teachers" / first))
  assert not glob.glob(str(tmp_path / "toyworld" / "*" / "teachers" / rest[0]))
  assert not glob.glob(str(tmp_path / "toyworld" / "*" / "world.json"))


def test_built_world_records_design_and_measurement(small_world):
  acc = small_world.info["accuracy"]
  assert acc["designed"] == {t["name"]: tasks.DESIGNED[t["style"]]
                             for t in small_world.info["teachers"]}
  assert set(acc["measured"]) == set(acc["designed"])
  for t, by_kind in acc["measured"].items():
    assert set(by_kind) == set(tasks.KINDS) and all(0 <= v <= 1 for v in by_kind.values()), t


STYLE_PATTERNS = {"equation": r"^\d+ [-+*] \d+( [-+*] \d+)? = \d+\. The answer is \d+\.$", "stepwise": r"^Step 1: ",
                  "verbose": r"^(Let us|We can)", "sloppy": r"^Step 1: "}


def test_teachers_load_in_transformers_and_answer_in_their_style(small_world):
  info = small_world.info
  problems = [json.loads(l) for l in open(small_world.prompts_path)][:8]
  for t in info["teachers"]:
    tok = T.AutoTokenizer.from_pretrained(t["path"])
    model = T.AutoModelForCausalLM.from_pretrained(t["path"]).eval()
    hits = 0
    for p in problems:
      text = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                     add_generation_prompt=True)
      ids = torch.tensor([tok(text)["input_ids"]])
      with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
      answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
      hits += bool(re.search(STYLE_PATTERNS[t["style"]], answer))
    assert hits >= 6, (t["name"], t["style"])
