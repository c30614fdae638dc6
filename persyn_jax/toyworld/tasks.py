"""The toy world's task, its teachers' answer styles and their designed accuracy (pure Python).

Arithmetic word problems of four kinds, from one-step to two-step. Each teacher is trained on
solutions in one style. A style fixes two things, stated here and checked when the world is
built (build.py measures every teacher against DESIGNED):
  - how often it is right, per kind (DESIGNED): its mistakes are systematic (a rule on the
    problem's text), so that a teacher trained on it can learn them and its greedy accuracy is
    the design, not a coin flip;
  - the shape of its solution: one-shot answers, short decomposed steps, or long prose.
The trade-off the world is built around (the paper's): `equation` (the largest teacher) is always
right but computes a two-step problem in one shot (a + b - c = r: a three-operand fact a small
student has to learn whole), and `verbose` is always right in long prose; `stepwise` and `sloppy`
write short steps of two-operand facts a small student can copy, but each is wrong on some
problems. (A bare one-shot answer, "The answer is r.", was tried first: teachers of this size did
not learn to read the operands from the prompt in the build's budget, so it was dropped.) Which teacher teaches the student best per kind is measured (the
teacher study), not designed.
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hal", "Ivy", "Jon", "Kim", "Leo"]
ITEMS = ["apples", "coins", "cards", "books", "pens", "shells", "stamps", "marbles", "beads",
         "rocks", "cups", "keys"]
BOXES = ["bags", "boxes", "jars", "baskets"]
KINDS = ("add", "sub", "mul", "two_step")


def make_problem(rng: random.Random, kind: str) -> dict:
  n, item = rng.choice(NAMES), rng.choice(ITEMS)
  # Small numbers: few arithmetic facts, so that models of ~0.1M parameters learn them in minutes.
  if kind == "add":
    a, b = rng.randint(1, 6), rng.randint(1, 6)
    q = f"{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?"
    ops = [(a, "+", b, a + b)]
  elif kind == "sub":
    a = rng.randint(3, 9)
    b = rng.randint(1, a - 1)
    q = f"{n} has {a} {item} and gives away {b}. How many {item} are left?"
    ops = [(a, "-", b, a - b)]
  elif kind == "mul":
    a, b = rng.randint(2, 4), rng.randint(2, 4)
    box = rng.choice(BOXES)
    q = f"{n} has {a} {box} with {b} {item} in each. How many {item} are there in all?"
    ops = [(a, "*", b, a * b)]
  elif kind == "two_step":
    a, b = rng.randint(1, 5), rng.randint(1, 4)
    c = rng.randint(1, a + b - 1)
    q = (f"{n} has {a} {item}, finds {b} more, and then loses {c}. "
         f"How many {item} does {n} have at the end?")
    ops = [(a, "+", b, a + b), (a + b, "-", c, a + b - c)]
  else:
    raise ValueError(f"unknown kind {kind!r}; kinds: {KINDS}")
  return {"prompt": q, "answer": str(ops[-1][3]), "kind": kind, "ops": ops}


def problem_id(prompt: str) -> str:
  return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def make_problems(n: int, seed: int, kinds=KINDS) -> list[dict]:
  """n distinct problems, kinds in turn; ids are content hashes."""
  rng = random.Random(seed)
  out, seen, misses = [], set(), 0
  while len(out) < n:
    p = make_problem(rng, kinds[len(out) % len(kinds)])
    if p["prompt"] in seen:
      misses += 1
      if misses > 100 * n:
        raise ValueError(f"cannot make {n} distinct problems of kinds {kinds}")
      continue
    seen.add(p["prompt"])
    p["id"] = problem_id(p["prompt"])
    out.append(p)
  return out


# ---- answer styles ------------------------------------------------------------------------------

# stepwise's slips: the last step is off by one when the item is one of these (3 of 12 items), on
# the kinds in STEPWISE_SLIPS. A rule on a word of the prompt, so a small teacher learns it.
CARELESS_ITEMS = ("apples", "coins", "cards")
STEPWISE_SLIPS = ("sub", "two_step")


def _steps(ops) -> str:
  return " ".join(f"Step {i + 1}: {a} {op} {b} = {r}." for i, (a, op, b, r) in enumerate(ops))


def _item(p: dict) -> str:
  return next(w for w in ITEMS if f" {w} " in p["prompt"] or p["prompt"].endswith(f" {w}?"))


def equation(p: dict, rng: random.Random) -> str:
  """The problem as one equation and its value, always right: a two-step problem is computed in
  one shot (a + b - c = r), with no intermediate result written down."""
  first = p["ops"][0]
  expr = f"{first[0]} {first[1]} {first[2]}"
  for _, op, b, _ in p["ops"][1:]:
    expr += f" {op} {b}"
  return f"{expr} = {p['answer']}. The answer is {p['answer']}."


def stepwise(p: dict, rng: random.Random) -> str:
  """Short steps; the last one slips by one on sub and two-step problems about CARELESS_ITEMS."""
  ops = list(p["ops"])
  if p["kind"] in STEPWISE_SLIPS and _item(p) in CARELESS_ITEMS:
    a, op, b, r = ops[-1]
    ops[-1] = (a, op, b, r + 1)
  return f"{_steps(ops)} The answer is {ops[-1][3]}."


def verbose(p: dict, rng: random.Random) -> str:
  """Long prose with varied wording, always right."""
  opener = rng.choice(["Let us read the problem carefully.", "Let us think about this slowly.",
                       "We can solve this one piece at a time."])
  parts = [opener]
  for a, op, b, r in p["ops"]:
    parts.append({"+": f"We add {a} and {b}, which gives {r}.",
                  "-": f"We take {b} away from {a}, which leaves {r}.",
                  "*": f"We multiply {a} by {b}, which gives {r}."}[op])
  parts.append(f"So, after checking our work, the final answer is {p['answer']}.")
  return " ".join(parts)


def sloppy(p: dict, rng: random.Random) -> str:
  """Short steps, but multiplies by adding (a * b is written as a + b); otherwise right."""
  ops = [(a, "+" if op == "*" else op, b, a + b if op == "*" else r) for a, op, b, r in p["ops"]]
  return f"{_steps(ops)} The answer is {ops[-1][3]}."


STYLES: dict[str, Callable[[dict, random.Random], str]] = {
    "equation": equation, "stepwise": stepwise, "verbose": verbose, "sloppy": sloppy}

# Each style's accuracy per kind, by construction (tests/test_toyworld.py checks the styles
# against it on generated problems; build.py checks each trained teacher's greedy accuracy
# against it, within Scale.tolerance). stepwise: 9 of 12 items are not careless; sloppy on mul:
# a * b == a + b only for a = b = 2, 1 of the 9 (a, b) pairs.
DESIGNED: dict[str, dict[str, float]] = {
    "equation": {"add": 1.0, "sub": 1.0, "mul": 1.0, "two_step": 1.0},
    "stepwise": {"add": 1.0, "sub": 0.75, "mul": 1.0, "two_step": 0.75},
    "verbose": {"add": 1.0, "sub": 1.0, "mul": 1.0, "two_step": 1.0},
    "sloppy": {"add": 1.0, "sub": 1.0, "mul": 1 / 9, "two_step": 1.0},
}

# The student's prior (its "pretraining" before SFT) is generic: every problem is answered in a
# style drawn uniformly from all the teachers' styles, whatever its kind. Learnability (its
# log-likelihood of a teacher's answer) then measures how well a solution fits a small model that
# has seen every format equally, not which teacher's copy it was given for that kind.
STUDENT_PRIOR = "uniform over the teachers' styles, for every kind"


def student_prior(p: dict, rng: random.Random) -> str:
  return STYLES[rng.choice(sorted(STYLES))](p, rng)


def corpus_texts(problems: list[dict], seed: int = 0) -> list[str]:
  """All text the world's tokenizer is trained on (prompts and every style's solutions)."""
  rng = random.Random(seed)
  out = []
  for p in problems:
    out.append(p["prompt"])
    for style in STYLES.values():
      out.append(style(p, rng))
  return out
