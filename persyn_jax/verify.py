"""Answer verifiers: the quality reward of verifiable prompts (the paper's math setting: 1 if the final answer
matches the reference, else 0).

    verify_math("... so the answer is \\boxed{\\frac{3}{4}}.", "0.75")   # -> 1.0
    get_verifier("math")(response, reference)

The final answer of a response is, in order of precedence: the last `\\boxed{...}` (or `\\fbox`),
the text after the last GSM8K `####` (not a markdown heading `#### Step 1`), the text after the
last "the (final) answer is", and else the last number in the text. Answers are compared as
exact rationals where both sides read as numbers (commas, fractions, `\\frac`, decimals,
percentages, currency and unit words, negative numbers) - that fast path is final and never calls
sympy. Otherwise they match if their normalized strings (LaTeX spacing and wrappers removed) are
equal, else if math-verify (LaTeX to sympy) finds them equivalent: `2\\sqrt2` = `\\sqrt8`,
`x^2+2x` = `2x+x^2`, `3, 5` = `5, 3` (a set).

The symbolic check runs in a child process (`_SymbolicWorker`) with a deadline (`set_math_timeout`,
2 s by default): sympy can spend hours on `10^{10^{10}}` inside C code that no signal interrupts,
and math-verify's own timeout is `signal.alarm`, which only works in the main thread. A comparison
that runs past the deadline scores 0 and the child is replaced; `symbolic_stats()` counts them.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from fractions import Fraction
from typing import Callable

Verifier = Callable[[str, str], float]

_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
# a number, a/b, or a \frac{a}{b} as _strip_latex writes it: (a)/(b)
_NUM_RE = re.compile(rf"(?<![\w.])(?:-?\((?:{_NUM})\)\s*/\s*\(\d+(?:\.\d+)?\)|"
                     rf"(?:{_NUM})(?:\s*/\s*(?:\d+))?)(?![\w])")
_ANSWER_IS = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)
# "my answer is correct": a verdict on an answer, never one ("the answer is indeed 18" is one)
_VERDICT = re.compile(r"[\s*]*(?:correct|incorrect|right|wrong|reasonable|consistent|valid|"
                      r"plausible|accurate|as follows)\b", re.IGNORECASE)
_UNIT_WORDS = (
    "dollars?|cents?|euros?|pounds?|usd|units?|cm|mm|km|m|meters?|metres?|centimeters?|"
    "kilometers?|inches|inch|in|feet|foot|ft|yards?|miles?|kg|g|grams?|kilograms?|lbs?|"
    "ounces?|oz|liters?|litres?|l|ml|gallons?|hours?|hrs?|h|minutes?|mins?|seconds?|secs?|s|"
    "days?|weeks?|months?|years?|degrees?|people|persons?|students?|apples?|items?|points?|"
    "marbles?|pages?|books?|cookies?|eggs?|times|square|cubic|sq|per|each|total|mph|km/h")
# unit words, squared or cubed, per another: "5 dollars", "12 cm^2", "5 m/s", "$5/hour"
_UNIT_RE = re.compile(rf"^(?:(?:/\s*)?(?:{_UNIT_WORDS})\b(?:\s*\^\s*\{{?[23]\}}?)?[\s.]*)+$",
                      re.IGNORECASE)


# a markdown heading (`#### Step 1: ...`, `#### **Answer**`, `#### 2. Check`), not GSM8K's
# `#### 42`: its text starts with a word, emphasis, or a numbered title
_HEADING = re.compile(r"[A-Za-z*_#]|\d+[.)]\s+[A-Za-z]")


def _brace_pairs(text: str) -> dict[int, int]:
  """Each `{` of `text` that closes -> the index of its `}` (nested braces), in one pass."""
  pairs, opened = {}, []
  for i, ch in enumerate(text):
    if ch == "{":
      opened.append(i)
    elif ch == "}" and opened:
      pairs[opened.pop()] = i
  return pairs


_BARE_BOXED = re.compile(r"[^\s$]+")  # `\\boxed 5`: the box's argument up to a space or `$`


def last_boxed(text: str) -> str | None:
  """Contents of the last `\\boxed{...}` / `\\fbox{...}` (nested braces), or `\\boxed 5`. A box
  left open (a truncated response) has no answer."""
  found, pairs = None, None
  for m in re.finditer(r"\\(?:boxed|fbox)\s*", text):
    start = m.end()
    if start < len(text) and text[start] == "{":
      pairs = _brace_pairs(text) if pairs is None else pairs
      if start in pairs:
        found = text[start + 1:pairs[start]]
    else:
      tail = _BARE_BOXED.match(text, start)
      if tail:
        found = tail.group(0)
  return found


def extract_answer(text: str) -> str | None:
  """The final answer of a response (see the module docstring for the order), or None."""
  if not text:
    return None
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed.strip()
  marked = [m.group(1).strip() for m in re.finditer(r"####\s*(.*)", text)]
  marked = [a for a in marked if a and not _HEADING.match(a)]
  if marked:
    return marked[-1]
  # the last statement of the answer; "my answer is correct" after it is a verdict, not one
  stated = [m.end() for m in _ANSWER_IS.finditer(text) if not _VERDICT.match(text, m.end())]
  if stated:
    rest = _stated_answer(text[stated[-1]:].split("\n")[0])
    if rest:
      return rest
  flat = _strip_latex(text)
  nums = list(_NUM_RE.finditer(flat))
  if not nums:
    return None
  # a percent sign right after the number is part of it ("so 50%" answers a fraction 0.5 too)
  pct = re.match(r"\s*(?:\\?%|percent\b)", flat[nums[-1].end():], re.IGNORECASE)
  return nums[-1].group().strip() + ("%" if pct else "")


_HEDGE = re.compile(r"^(\$?)\s*(?:approximately|approx\.|about|around|roughly|~|\\approx|indeed|"
                    r"exactly|simply|just|clearly|(?:verified|confirmed) (?:to be|as)|equal to)"
                    r"(?![A-Za-z])\s*", re.IGNORECASE)
_REMARK = re.compile(r"(?:\(|,|;|:|\s-+\s)\s*[A-Za-z]")


def _stated_answer(line: str) -> str:
  """The answer in the line after "the answer is": its first sentence, without markdown emphasis,
  a hedge before it or a remark in words after a number."""
  # A sentence ends at ". " or a final "."; a decimal point is followed by a digit.
  rest = re.split(r"\.(?:\s|$)", line, maxsplit=1)[0].strip()
  # markdown emphasis around it: "**Answer:** 42", "the answer is **42**."
  rest = rest.strip("*").strip()
  # a hedge or emphasis before it: "approximately 3.14", "about $18", "indeed 18"
  rest = _HEDGE.sub(r"\1", rest)
  # a number with a remark in words after it: "18 (since 9 * 2 = 18)", "18, because ..."
  remark = _REMARK.search(rest)
  if remark and parse_number(rest[:remark.start()]) is not None and parse_number(rest) is None:
    rest = rest[:remark.start()].strip()
  return rest


_MATH_DELIMS = re.compile(r"\\[\[\]()]")  # \[ 12 \], \( x \): LaTeX's math delimiters, like $


def _strip_latex(s: str) -> str:
  s = s.replace("\u2212", "-").replace("\u2013", "-").replace("\u00a0", " ")
  s = _MATH_DELIMS.sub(" ", s)
  s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
  # \frac34 as \frac{3}{4}: its digits stay apart from a digit before it (a mixed number
  # 3\frac12 is 7/2, never 31/2)
  s = re.sub(r"\\[dt]?frac\s*(\d)\s*(\d)", r"(\1)/(\2)", s)
  s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|operatorname|mbox)\s*\{([^{}]*)\}", r" \1 ", s)
  s = re.sub(r"\\(?:left|right|displaystyle|,|;|!|:|quad|qquad)", " ", s)
  s = s.replace("\\%", "%").replace("\\$", "$").replace("\\ ", " ")
  s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", " degrees", s)
  return s


def normalize_answer(s: str) -> str:
  """A canonical string of an answer: LaTeX wrappers, `$`, a leading `x =` and a trailing period
  removed; braces around one character dropped (`x^{2}` -> `x^2`, never `2^{n+1}` -> `2^n+1`);
  spaces dropped except between two word characters (`1 2` stays apart from `12`); a word
  answer (letters only, e.g. `Monday`, `(B)`) in lower case, math keeps its case (`\Pi` is not
  `\pi`). Equal strings are the same answer; unequal ones go on to the symbolic check."""
  s = _strip_latex(s.strip())
  s = s.replace("$", " ")
  s = re.sub(r"^\s*[a-zA-Z]\s*=\s*(?=\S)", "", s)  # "x = 5" -> "5"
  s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
  s = re.sub(r"^\((\w)\)$", r"\1", s)  # "(B)" -> "B" (multiple choice)
  s = re.sub(r"(\\[a-zA-Z]+) (?![a-zA-Z])", r"\1", s)  # "\sqrt 3" -> "\sqrt3"
  s = re.sub(r"(?<!\w) | (?!\w)", "", s)
  while True:  # "{{x}}" -> "x"; a letter after a command keeps its braces ("\sqrt{x}")
    t = re.sub(r"(?<![a-zA-Z])\{([^{}\\])\}|(?<=[a-zA-Z])\{([^{}\\a-zA-Z])\}",
               lambda m: m.group(1) or m.group(2), s)
    if t == s:
      break
    s = t
  return s.lower() if re.fullmatch(r"[A-Za-z]+(?: [A-Za-z]+)*", s) else s


def parse_number(s: str) -> tuple[Fraction, bool] | None:
  """(value, is_percentage) of an answer that is one number, possibly with a currency sign, a
  percent sign or unit words; None otherwise."""
  t = _strip_latex(s.strip())
  t = re.sub(r"^\s*[a-zA-Z]\s*=\s*(?=\S)", "", t)
  t = t.replace("$", " ").replace("€", " ").replace("£", " ").strip().rstrip(".").strip()
  t = re.sub(r"^(?:usd|rs\.?|us)\s*", "", t, flags=re.IGNORECASE)
  pct = False
  # (no \s* before the sign: searched for, it would try every start in a run of spaces)
  if t.endswith("%") or re.search(r"percent$", t, re.IGNORECASE):
    pct = True
    t = re.sub(r"(?:%|percent)$", "", t, flags=re.IGNORECASE).strip()
  m = re.match(rf"^(-?)\s*\(?\s*({_NUM})\s*\)?(?:\s*/\s*\(?\s*(\d+(?:\.\d+)?)\s*\)?)?\s*(.*)$",
               t)
  if not m:
    return None
  unit = m.group(4).strip()
  if unit and not _UNIT_RE.match(unit):
    return None
  try:
    value = Fraction(m.group(2).replace(",", "")) * (-1 if m.group(1) else 1)
    if m.group(3) is not None:
      den = Fraction(m.group(3))
      if den == 0:
        return None
      value /= den
  except (ValueError, ZeroDivisionError):
    return None
  return value, pct


def answers_match(pred: str | None, ref: str | None, *, timeout_s: float | None = None) -> bool:
  """True if the extracted answer `pred` equals the reference answer `ref`: as numbers when both
  are numbers, else as normalized strings or sympy-equivalent expressions (`timeout_s` bounds the
  latter; None = `set_math_timeout`'s value)."""
  if pred is None or ref is None:
    return False
  a, b = parse_number(pred), parse_number(ref)
  if a is not None and b is not None:
    (va, pa), (vb, pb) = a, b
    if va == vb:  # exact: 1000001 is not 1000000, 0.666667 is not 2/3
      return True
    # "50%" answers "what percentage" (ref 50) and "what fraction" (ref 0.5) alike; two
    # percentages match only as equal values (5% is not 500%).
    if pa == pb:
      return False
    return va / 100 == vb if pa else va == vb / 100
  na, nb = normalize_answer(pred), normalize_answer(ref)
  if not na or not nb:
    return False
  if na == nb:
    return True
  return symbolic_equal(pred, ref, timeout_s=timeout_s)


# -- the symbolic check, in a child process with a deadline --------------------------------------

_TIMEOUT_S = 2.0
_STARTUP_S = 120.0  # importing sympy on a loaded host; not part of any comparison's budget


def set_math_timeout(seconds: float) -> None:
  """The wall-clock budget of one symbolic comparison (parsing both sides and comparing)."""
  global _TIMEOUT_S
  if not seconds > 0:
    raise ValueError(f"math timeout {seconds!r}: must be a positive number of seconds")
  _TIMEOUT_S = float(seconds)


def _latex(answer: str) -> str:
  return "$" + _MATH_DELIMS.sub(" ", answer).strip().strip("$").strip() + "$"


def _serve() -> None:
  """The child's loop: one JSON [pred, ref] per stdin line -> one JSON bool per stdout line."""
  import logging

  from math_verify import LatexExtractionConfig, parse, verify
  logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # the parent owns the timeout
  config = [LatexExtractionConfig()]
  out, sys.stdout = sys.stdout, sys.stderr  # a stray print in sympy must not become an answer
  out.write("ready\n")
  out.flush()
  for line in sys.stdin:
    pred, ref = json.loads(line)
    try:
      parsed = [parse(_latex(x), extraction_config=config, fallback_mode="no_fallback",
                      extraction_mode="first_match", parsing_timeout=None) for x in (pred, ref)]
      ok = bool(parsed[0] and parsed[1] and verify(parsed[1], parsed[0], timeout_seconds=None))
    except Exception:  # an expression sympy cannot handle is not a match
      ok = False
    out.write(json.dumps(ok) + "\n")
    out.flush()


class _SymbolicWorker:
  """One child process per parent process, shared by its threads (one comparison at a time)."""

  def __init__(self):
    self.lock = threading.Lock()
    self.proc: subprocess.Popen | None = None
    self.owner = -1
    self.stats = {"symbolic": 0, "timeouts": 0, "errors": 0}

  def _start(self) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    self.proc = subprocess.Popen(
        [sys.executable, "-c", "from persyn_jax.verify import _serve; _serve()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.owner = os.getpid()
    if self._read(_STARTUP_S) != "ready":
      self._stop()
      raise RuntimeError("persyn_jax.verify: the math-verify child did not start (is the "
                         "`math-verify` package installed?)")

  def _read(self, seconds: float) -> str | None:
    """The child's next line, or None if it has none within `seconds` (or exited)."""
    with selectors.DefaultSelector() as sel:
      sel.register(self.proc.stdout, selectors.EVENT_READ)
      if not sel.select(seconds):
        return None
    line = self.proc.stdout.readline()
    return line.strip() if line else None

  def _stop(self) -> None:
    if self.proc is not None and self.owner == os.getpid():
      self.proc.kill()
      self.proc.wait()
    self.proc = None

  def equal(self, pred: str, ref: str, timeout_s: float) -> bool:
    with self.lock:
      if self.proc is None or self.owner != os.getpid() or self.proc.poll() is not None:
        self.proc = None  # a forked copy's child belongs to the parent
        self._start()
      self.stats["symbolic"] += 1
      try:
        self.proc.stdin.write(json.dumps([pred, ref]) + "\n")
        self.proc.stdin.flush()
      except (BrokenPipeError, OSError):
        self.stats["errors"] += 1
        self._stop()
        return False
      start = time.monotonic()
      answer = self._read(timeout_s)
      if answer is None:
        # past the deadline (or the child died): a failure, and a fresh child for the next one
        self.stats["timeouts" if time.monotonic() - start >= timeout_s else "errors"] += 1
        self._stop()
        return False
      return answer == "true"


_WORKER = _SymbolicWorker()
atexit.register(lambda: _WORKER._stop())


def symbolic_equal(pred: str, ref: str, *, timeout_s: float | None = None) -> bool:
  """True if math-verify finds the LaTeX answers `pred` and `ref` equivalent within `timeout_s`
  seconds (None = `set_math_timeout`'s value); a timeout is False. Safe from any thread."""
  return _WORKER.equal(pred, ref, _TIMEOUT_S if timeout_s is None else timeout_s)


def symbolic_stats() -> dict[str, int]:
  """Counts of this process's symbolic comparisons, the timeouts among them, and child errors."""
  return dict(_WORKER.stats)


def reference_answer(reference: str) -> str | None:
  """The answer of a reference: a full solution (`\\boxed`, `####`) or the bare answer."""
  if reference is None:
    return None
  if last_boxed(reference) is not None or "####" in reference:
    return extract_answer(reference)
  return reference.strip()


def verify_math(response: str, reference: str, *, timeout_s: float | None = None) -> float:
  """1.0 if the final answer of `response` matches `reference`, else 0.0 (the paper's math quality);
  a symbolic comparison that runs past `timeout_s` is 0.0."""
  pred, ref = extract_answer(response), reference_answer(reference)
  return 1.0 if answers_match(pred, ref, timeout_s=timeout_s) else 0.0


def verify_exact(response: str, reference: str) -> float:
  """1.0 if the response equals the reference after whitespace and case normalization."""
  norm = lambda s: re.sub(r"\s+", " ", (s or "")).strip().lower()
  return 1.0 if norm(response) == norm(reference) and norm(reference) else 0.0


_VERIFIERS: dict[str, Verifier] = {"math": verify_math, "gsm8k": verify_math, "exact": verify_exact}


def register_verifier(name: str, fn: Verifier) -> None:
  """Adds a verifier that datasets can name in config (`scoring.verifier`)."""
  if name in _VERIFIERS and _VERIFIERS[name] is not fn:
    raise ValueError(f"verifier {name!r} is already registered")
  _VERIFIERS[name] = fn


def get_verifier(name: str) -> Verifier:
  try:
    return _VERIFIERS[name]
  except KeyError:
    raise ValueError(f"unknown verifier {name!r}; known: {sorted(_VERIFIERS)}") from None


def verifier_names() -> list[str]:
  return sorted(_VERIFIERS)
