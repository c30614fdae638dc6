"""The built world checked against its design: each teacher's greedy accuracy per kind, measured
with the project's own sampler and verifier on held-out problems, against tasks.DESIGNED.

A world whose teachers did not learn their styles says nothing about routing (a teacher designed
to be always right that is right a fifth of the time makes every reward a measure of training
noise), so the build fails rather than cache such a world.
"""
from __future__ import annotations

from typing import Mapping

from persyn_jax.toyworld import tasks


class WorldCheckError(RuntimeError):
  """A teacher of the built world is further from its designed accuracy than the tolerance."""


def measure(path: str, problems: list[dict], mesh, *,
            max_new_tokens: int = 64) -> tuple[dict, dict]:
  """({kind: greedy accuracy}, {kind: n}) of the model at `path` on `problems` (`prompt`,
  `answer`, `kind`), sampled by persyn_jax.sampling and scored by the math verifier."""
  from persyn_jax import models
  from persyn_jax import sharding as shd
  from persyn_jax.sampling import SamplingConfig, generate
  from persyn_jax.verify import verify_math
  model, tok = models.load_model(path, dtype="float32", mesh=mesh, rules=shd.SERVING)
  cfg = SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                       batch_size=128, max_prompt_len=64)
  results = generate(model, tok, [p["prompt"] for p in problems], cfg, mesh=mesh)
  texts = [r.text for r in sorted((r for r in results if r.sample == 0), key=lambda r: r.index)]
  right: dict[str, float] = {}
  n: dict[str, int] = {}
  for p, text in zip(problems, texts):
    right[p["kind"]] = right.get(p["kind"], 0.0) + verify_math(text, p["answer"])
    n[p["kind"]] = n.get(p["kind"], 0) + 1
  return {k: round(right[k] / n[k], 4) for k in sorted(n)}, n


def deviations(measured: Mapping[str, Mapping[str, float]], designed: Mapping[str, Mapping[str, float]],
               tolerance: float) -> list[str]:
  """One line per (teacher, kind) whose measured accuracy is more than `tolerance` from its
  design, or that was not measured; empty when the world matches its design."""
  out = []
  for teacher, design in designed.items():
    got = measured.get(teacher, {})
    for kind, want in design.items():
      if kind not in got:
        out.append(f"{teacher} on {kind}: not measured (designed {want:.2f})")
      elif abs(got[kind] - want) > tolerance:
        out.append(f"{teacher} on {kind}: measured {got[kind]:.3f}, designed {want:.3f}")
  return out


def check_accuracy(measured: Mapping[str, Mapping[str, float]],
                   designed: Mapping[str, Mapping[str, float]], tolerance: float,
                   where: str = "the toy world") -> None:
  """Raises WorldCheckError naming every teacher and kind off its design by more than
  `tolerance`. `measured` and `designed`: {teacher: {kind: accuracy}}."""
  bad = deviations(measured, designed, tolerance)
  if bad:
    raise WorldCheckError(
        f"{where}: {len(bad)} teacher accuracies are off their design by more than "
        f"{tolerance} (tasks.DESIGNED): " + "; ".join(bad) + ". The teachers did not learn their "
        "styles: give them more steps or width (toyworld/specs.py), not a wider tolerance.")


def designed_for(teachers) -> dict[str, dict[str, float]]:
  """{teacher name: its style's designed accuracy per kind} for the world's teacher specs."""
  return {t.name: dict(tasks.DESIGNED[t.style]) for t in teachers}
