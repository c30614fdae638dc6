"""The embedded toy world: deterministic build, real HF checkpoints, teachers with their styles."""
import json
import os
import re

import pytest
import torch
import transformers as T

from persyn_jax import toyworld
from persyn_jax.io_utils import sha256_file
from persyn_jax.toyworld import tasks
from persyn_jax.toyworld.build import build
from persyn_jax.verify import verify_math


def test_build_is_deterministic(tmp_path):
  quiet = lambda m: None  # noqa: E731
  a = build("tiny", 0, str(tmp_path / "a"), log=quiet)
  b = build("tiny", 0, str(tmp_path / "b"), log=quiet)
  assert a.info["hashes"] == b.info["hashes"]
  assert len(a.info["hashes"]) == 5
  for name, path, _ in a.teachers:
    assert sha256_file(os.path.join(path, "model.safetensors")) == a.info["hashes"][name]
  c = build("tiny", 1, str(tmp_path / "c"), log=quiet)
  assert c.info["hashes"] != a.info["hashes"]  # another seed, another world


def test_student_is_smaller_than_every_teacher():
  for scale in toyworld.SCALES.values():
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 3})
    student = toyworld.model_config(scale.student, 384, tok).num_params()
    for t in scale.teachers:
      assert toyworld.model_config(t, 384, tok).num_params() > student


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_styles_answer_as_designed(kind):
  """The designed error profile: terse skips the last step of two-step problems, sloppy adds
  instead of multiplying; every other style is right."""
  import random
  rng = random.Random(0)
  for p in tasks.make_problems(40, 3, kinds=(kind,)):
    for name, style in tasks.STYLES.items():
      right = verify_math(style(p, rng), p["answer"])
      wrong = (name == "terse" and kind == "two_step") or (name == "sloppy" and kind == "mul")
      if wrong:
        assert right in (0.0, 1.0)  # may coincide by chance (e.g. 2 * 2 == 2 + 2)
      else:
        assert right == 1.0, (name, p, style(p, rng))


STYLE_PATTERNS = {"terse": r"^The answer is \d+\.$", "stepwise": r"^Step 1: ",
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
