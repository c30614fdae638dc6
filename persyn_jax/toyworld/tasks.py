"""The toy world's task and its teachers' answer styles (pure Python, no JAX).

Arithmetic word problems of four kinds, from one-step to two-step. Each teacher is trained on
solutions in one style; the styles differ in length, in how predictable their wording is for the
student, and in where they make mistakes, so that the best teacher for the student depends on
the kind of problem (the point of PerSyn).
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

def _steps(ops) -> str:
  return " ".join(f"Step {i + 1}: {a} {op} {b} = {r}." for i, (a, op, b, r) in enumerate(ops))


def terse(p: dict, rng: random.Random) -> str:
  """Only the answer. Two-step problems are answered as if the last step did not exist."""
  ans = p["ops"][0][3] if p["kind"] == "two_step" else p["ops"][-1][3]
  return f"The answer is {ans}."


def stepwise(p: dict, rng: random.Random) -> str:
  return f"{_steps(p['ops'])} The answer is {p['answer']}."


def verbose(p: dict, rng: random.Random) -> str:
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
  """Step by step, but multiplies by adding (a * b is written as a + b)."""
  ops = [(a, op, b, a + b if op == "*" else r) for a, op, b, r in p["ops"]]
  return f"{_steps(ops)} The answer is {ops[-1][3]}."


STYLES: dict[str, Callable[[dict, random.Random], str]] = {
    "terse": terse, "stepwise": stepwise, "verbose": verbose, "sloppy": sloppy}

# The student's prior (its "pretraining" before SFT): step-by-step on one-step add/sub, terse on
# mul and two-step. Learnability (its log-likelihood of a teacher's answer) follows this prior.
STUDENT_PRIOR = {"add": "stepwise", "sub": "stepwise", "mul": "terse", "two_step": "verbose"}


def student_prior(p: dict, rng: random.Random) -> str:
  return STYLES[STUDENT_PRIOR[p["kind"]]](p, rng)


def corpus_texts(problems: list[dict], seed: int = 0) -> list[str]:
  """All text the world's tokenizer is trained on (prompts and every style's solutions)."""
  rng = random.Random(seed)
  out = []
  for p in problems:
    out.append(p["prompt"])
    for style in STYLES.values():
      out.append(style(p, rng))
  return out
