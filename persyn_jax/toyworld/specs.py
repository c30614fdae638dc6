"""The toy world's specification: its models (Spec), its scales (Scale, SCALES) and their
architectures (model_config, spec_config), without building anything.

Light on purpose: `--dry-run` plans the world from these specs, and this module imports nothing
heavier than `models.config`. The builder (training, checkpoints, the cache) is `build.py`.
"""
from __future__ import annotations

import dataclasses

from persyn_jax.models.config import ModelConfig, RopeConfig

# The world's trained tokenizer (build.py) asks for this many tokens; the corpus has fewer words
# (~520 tokens), so every word is one token: prompts of a kind have one length, and a small
# model finds the numbers at fixed offsets (with 384, words split unevenly and teachers did not
# learn to read the operands).
TOKENIZER_VOCAB = 768

WORLD_VERSION = 5  # bump whenever the task, the styles or the training change


@dataclasses.dataclass(frozen=True)
class Spec:
  """One model of the world: its name, answer style, family (HF model_type) and size."""

  name: str
  style: str
  model_type: str
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  steps: int


@dataclasses.dataclass(frozen=True)
class Scale:
  prompts: int           # run prompts (train + eval)
  probe: int
  eval: int
  train_problems: int    # problems each teacher (and the student's prior) is trained on
  batch: int
  seq_len: int
  lr: float
  teachers: tuple[Spec, ...]
  student: Spec
  check: int = 0         # held-out problems per kind on which each teacher's accuracy is measured
  tolerance: float = 0.0  # the build fails if a teacher is further than this from its design
                          # (0: measured and recorded, never failed: too few steps to learn it)


def _teachers(f: float, steps: int) -> tuple[Spec, ...]:
  # equation-L, the strong teacher, is the largest: it computes two-step answers in one shot.
  s = lambda n: max(16, int(n * f) // 16 * 16)  # noqa: E731
  return (Spec("equation-L", "equation", "llama", s(128), 2, 4, 2, steps),
          Spec("stepwise-Q", "stepwise", "qwen3", s(80), 2, 4, 2, steps),
          Spec("verbose-L", "verbose", "llama", s(96), 2, 4, 2, steps),
          Spec("sloppy-Q", "sloppy", "qwen3", s(64), 2, 4, 2, steps))


SCALES = {
    # eval: 1000 held-out problems (250 per kind); prompts - eval = the 1200 a student trains on
    "default": Scale(prompts=2200, probe=300, eval=1000, train_problems=3000, batch=16, seq_len=192,
                     lr=5e-3, teachers=_teachers(1.0, 360),
                     student=Spec("student-Q", "prior", "qwen3", 48, 2, 4, 2, 200),
                     check=200, tolerance=0.15),
    "small": Scale(prompts=240, probe=64, eval=48, train_problems=1500, batch=16, seq_len=192,
                   lr=5e-3, teachers=_teachers(0.67, 120),
                   student=Spec("student-Q", "prior", "qwen3", 16, 2, 2, 1, 60), check=16),
    "tiny": Scale(prompts=64, probe=16, eval=16, train_problems=120, batch=4, seq_len=128,
                  lr=3e-3, teachers=_teachers(0.25, 6),
                  student=Spec("student-Q", "prior", "qwen3", 16, 1, 2, 1, 4)),
}


def model_config(spec: Spec, vocab: int, tok) -> ModelConfig:
  return ModelConfig(
      model_type=spec.model_type, vocab_size=vocab, hidden_size=spec.hidden,
      intermediate_size=spec.hidden * 2, num_layers=spec.layers, num_heads=spec.heads,
      num_kv_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads, rms_norm_eps=1e-6,
      rope=RopeConfig(theta=10000.0), tie_embeddings=True, qk_norm=spec.model_type == "qwen3",
      max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def spec_config(pseudo_path: str) -> ModelConfig:
  """ModelConfig of a `toyworld:<scale>/<name>` pseudo-path."""
  scale, name = pseudo_path.split(":", 1)[1].split("/", 1)
  sc = SCALES[scale]
  spec = next(s for s in sc.teachers + (sc.student,) if s.name == name)

  class _Tok:  # the world's tokenizer ids (pad first, then the other specials)
    pad_token_id, eos_token_id = 0, 3
  return model_config(spec, TOKENIZER_VOCAB, _Tok)


def architectures(scale: str) -> dict[str, ModelConfig]:
  """{`toyworld:<scale>/<name>`: ModelConfig} of every model of the world at `scale`, for the
  planner (which knows nothing of the world)."""
  sc = SCALES[scale]
  return {pseudo_path(scale, s.name): spec_config(pseudo_path(scale, s.name))
          for s in sc.teachers + (sc.student,)}


def pseudo_path(scale: str, name: str) -> str:
  """The path a world model has in a --dry-run plan, before the world is built."""
  return f"toyworld:{scale}/{name}"
