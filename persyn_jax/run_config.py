"""The run's configuration: one frozen dataclass per stage, collected in `RunConfig`.

Defaults are the embedded toy world (`python -m persyn_jax.train` with no arguments) and, where
the paper is silent, our own choices (docs/SCORING.md, docs/SFT.md). YAML files in configs/
override them; `--set key.sub=value` overrides those.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

from persyn_jax import config as C
from persyn_jax.data.sources import PromptSourceConfig
from persyn_jax.export import ExportConfig
from persyn_jax.metrics import WandbConfig
from persyn_jax.engines import OpenAIEngineConfig, engine_config
from persyn_jax.io_utils import safe_name
from persyn_jax.policies import POLICIES, PolicyConfig
from persyn_jax.router import RouterConfig
from persyn_jax.sampling.config import SamplingConfig
from persyn_jax.scoring import ScoringConfig
from persyn_jax.sft import SFTConfig
from persyn_jax.sharding import MeshConfig

STAGES = ("probe", "score", "router", "route", "generate", "sft", "eval", "study")


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """A model by name: a local HF directory or a hub id (downloaded on first use, see models.hub).

  A teacher's `engine` says where its probe/generate answers come from: `jax`, the in-process
  sampler over the run's mesh, or `openai`, a server of the OpenAI chat API described by the
  `openai` block (engines.OpenAIEngineConfig; the API key comes only from its api_key_env).
  """

  name: str
  path: str
  family: str = ""          # e.g. qwen, llama, gemma: family_strong picks within the student's
  dtype: str = "bfloat16"   # compute and storage dtype when the model is loaded
  quantize: str = ""        # teachers only: "int8": int8 decoder weights (models/quant.py)
  mesh: MeshConfig | None = None  # teachers only: its own sampling mesh (else sampling.mesh)
  engine: Literal["jax", "openai"] = "jax"  # openai: an OpenAI-compatible server answers (engines/)
  openai: OpenAIEngineConfig | None = None

  def __post_init__(self):
    if self.quantize not in ("", "int8"):
      raise ValueError(f"model {self.name!r}: quantize={self.quantize!r}: expected int8 or nothing")
    C.check_dtype(self.dtype, f"model {self.name!r}: dtype")
    engine_config(self.engine, self.openai, f"model {self.name!r}")

  @property
  def served(self) -> bool:
    """True when an OpenAI-compatible server answers for this model (engine: openai)."""
    return self.engine == "openai"


@dataclasses.dataclass(frozen=True)
class PromptsConfig:
  source: PromptSourceConfig = PromptSourceConfig()
  probe: float = 0.1        # probe subset: a count (>= 1) or a fraction of the training prompts
  eval: float = 0.0         # held-out evaluation prompts: a count or a fraction of all prompts
  seed: int = 0

  def __post_init__(self):
    for name in ("probe", "eval"):
      v = getattr(self, name)
      if not math.isfinite(v) or v < 0 or (v >= 1 and not float(v).is_integer()):
        raise ValueError(f"prompts.{name}={v}: a count (whole number >= 1) or a fraction in [0, 1)")
    if self.seed < 0:
      raise ValueError(f"prompts.seed={self.seed}: must be >= 0")


BENCHMARK_FORMATS = ("alpaca_eval", "arena_hard", "ifeval")


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """A benchmark's own prompt file, read locally; each student's answers are written in the
  format the benchmark's tool reads (evaluate.py: read_benchmark, export)."""

  name: str                   # names the output directory: eval/<student>/benchmarks/<name>/
  format: str                 # alpaca_eval (a JSON list of {instruction, ...}), arena_hard
                              # (question.jsonl: question_id, turns), ifeval (input_data.jsonl:
                              # key, prompt)
  path: str

  def __post_init__(self):
    safe_name(self.name, "eval.benchmarks name")
    if self.format not in BENCHMARK_FORMATS:
      raise ValueError(f"eval.benchmarks {self.name!r}: format={self.format!r}, not one of "
                       f"{list(BENCHMARK_FORMATS)}")
    if not self.path:
      raise ValueError(f"eval.benchmarks {self.name!r}: path is empty")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  sampling: SamplingConfig = SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=512)
  verifier: str | None = "math"   # None: no automatic metric (judge-based benchmarks only)
  reference_field: str = "reference"
  # judge-based benchmarks read these exports: jsonl (prompt/response), alpaca_eval, arena_hard
  exports: tuple[str, ...] = ("jsonl",)
  base_student: bool = True       # also evaluate the student before SFT
  # the benchmarks' own prompt files: each student answers them too (held-out prompts optional)
  benchmarks: tuple[BenchmarkConfig, ...] = ()

  def __post_init__(self):
    names = [b.name for b in self.benchmarks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f"eval.benchmarks: names {dup} are used twice")
    if self.sampling.num_samples != 1:  # scored and exported: one answer per prompt
      raise ValueError(f"eval.sampling.num_samples={self.sampling.num_samples}: eval scores one "
                       "answer per prompt; set it to 1")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """The teacher study (stages/study.py, docs/STUDY.md): the student fine-tuned (sft settings) on
  each teacher's probe answers alone and evaluated (eval settings) on held-out prompts; its gain
  per category, against the teacher each reward prefers per category."""

  enabled: bool = False
  teachers: tuple[str, ...] = ()  # (): every teacher
  eval: int = 0                   # held-out prompts each studied student answers; 0: all
  category_field: str = "kind"    # the prompt field the gains are grouped by (kept by the prompt
                                  # source: prompts.source.keep_fields); "": one group
  epochs: int = 0                 # SFT epochs over a teacher's probe answers; 0: sft.epochs (the
                                  # probe is a fraction of the data: more epochs give a studied
                                  # student about the steps of a policy's student)

  def __post_init__(self):
    if self.eval < 0:
      raise ValueError(f"study.eval={self.eval}: a count of held-out prompts (0: all of them)")
    if self.epochs < 0:
      raise ValueError(f"study.epochs={self.epochs}: a number of epochs (0: sft.epochs)")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  """What --dry-run plans for when it runs elsewhere than the target (a laptop for a pod)."""

  devices: int = 0                # 0: this machine's jax.device_count()
  device_memory_gb: float = 0.0   # per device; 0: this machine's, if it reports it
  host_memory_gb: float = 0.0     # per host (process); 0: this machine's physical memory
  prompt_tokens: int = 256        # mean prompt length, for token and memory estimates
  response_tokens: int = 0        # mean response length; 0: sampling.max_new_tokens


@dataclasses.dataclass(frozen=True)
class ToyWorldConfig:
  """The embedded default world (persyn_jax/toyworld/), resolved by the CLI before the run."""

  scale: Literal["default", "small", "tiny"] = "default"
  seed: int = 0
  cache_dir: str = ""             # "": $PERSYN_JAX_CACHE or ~/.cache/persyn_jax

  def __post_init__(self):
    if self.seed < 0:  # numpy's RNG would refuse it once the world is built
      raise ValueError(f"world.seed={self.seed}: must be >= 0")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """An ablation over the reward's alpha (Eq. 2): for each value the probe and its alpha-free
  scores (quality, learnability) are reused, the reward is recombined, and the router, route,
  generate, sft and eval stages run again for `policies`, under run_dir/sweep/alpha=<value>/."""

  alpha: tuple[float, ...] = ()            # empty: no sweep
  policies: tuple[str, ...] = ("persyn",)  # those of them that depend on alpha: persyn, oracle

  def __post_init__(self):
    bad = [a for a in self.alpha if not 0.0 <= a <= 1.0]
    if bad:
      raise ValueError(f"sweep.alpha: {bad} outside [0, 1]")
    if len(set(self.alpha)) != len(self.alpha):
      raise ValueError(f"sweep.alpha lists a value twice: {list(self.alpha)}")
    odd = [p for p in self.policies if p not in ("persyn", "oracle")]
    if odd or not self.policies:
      raise ValueError(f"sweep.policies={list(self.policies)}: persyn and/or oracle (the others "
                       "do not read the reward)")
    if len(set(self.policies)) != len(self.policies):  # else found only after the main run
      raise ValueError(f"sweep.policies lists a policy twice: {list(self.policies)}")


# The default comparison: PerSyn, every baseline, and the oracle (Generate then Select, k*N
# generations: the reward's own best, what the router approximates).
DEFAULT_COMPARE = ("persyn", "strong", "family_strong", "mix", "car", "random", "oracle")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  name: str = "toy"
  run_dir: str = ""               # "": runs/<name>
  seed: int = 0
  world: ToyWorldConfig | None = ToyWorldConfig()  # null when teachers/student/prompts are given
  mesh: MeshConfig = MeshConfig()
  prompts: PromptsConfig = PromptsConfig()
  teachers: tuple[ModelRef, ...] = ()
  student: ModelRef | None = None
  sampling: SamplingConfig = SamplingConfig()
  scoring: ScoringConfig = ScoringConfig()
  router: RouterConfig = RouterConfig()
  policies: PolicyConfig = PolicyConfig()
  compare: tuple[str, ...] = DEFAULT_COMPARE
  sft: SFTConfig = SFTConfig()
  # each compared policy's student is trained (its data order) and evaluated once per seed
  seeds: tuple[int, ...] = ()  # SFT seeds k (sft.seed = k): sft/<policy>/seed<k>/; empty: one
  eval: EvalConfig = EvalConfig()
  study: StudyConfig = StudyConfig()
  # data out: each policy's dataset as jsonl / parquet / hf_dataset (end of the generate stage)
  export: ExportConfig = ExportConfig()
  # W&B next to TensorBoard for the SFT metrics (null: off); no stage's key: it changes no output
  wandb: WandbConfig | None = None
  plan: PlanConfig = PlanConfig()
  sweep: SweepConfig = SweepConfig()
  records_per_shard: int = 4096

  def __post_init__(self):
    # the run directory is runs/<name>: an empty name would be runs/ itself, the parent of all runs
    if (not self.name.strip() or self.name in (".", "..") or "/" in self.name
        or "\\" in self.name):
      raise ValueError(f"name={self.name!r}: a non-empty run name without '/' (the run directory "
                       "is runs/<name>)")
    if self.seed < 0:  # numpy's RNG refuses it, at the very end of a run
      raise ValueError(f"seed={self.seed}: must be >= 0")
    bad = [p for p in self.compare if p not in POLICIES]
    if bad:
      raise ValueError(f"compare: unknown policies {bad}; policies: {list(POLICIES)}")
    if len(set(self.compare)) != len(self.compare):
      raise ValueError(f"compare lists a policy twice: {list(self.compare)}")
    if len(set(self.seeds)) != len(self.seeds) or any(k < 0 for k in self.seeds):
      raise ValueError(f"seeds={list(self.seeds)}: distinct integers >= 0")
    names = [t.name for t in self.teachers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f"teachers: duplicated teacher names {dup}")
    files: dict[str, str] = {}
    for n in names:  # shard files are named by safe_name(teacher): two must not share one
      f = safe_name(n, "teacher name")
      if f in files:
        raise ValueError(f"teachers: names {files[f]!r} and {n!r} both map to the file name {f!r}; "
                         "rename one")
      files[f] = n
    if self.student is not None and self.student.served:
      raise ValueError(f"student {self.student.name!r}: engine must be 'jax' (the student is "
                       "trained in-process)")
    if self.student is not None and self.student.quantize:
      raise ValueError(f"student {self.student.name!r}: quantize={self.student.quantize!r} is for "
                       "teachers (the student is scored and trained in its dtype)")
    if self.student is not None and self.student.mesh is not None:
      raise ValueError(f"student {self.student.name!r}: mesh is a teacher's sampling mesh; the "
                       "student's stages take scoring.mesh, sft.mesh and eval.sampling.mesh")
    if self.world is None and (not self.teachers or self.student is None):
      raise ValueError("teachers and student are required when world is null")
    if self.records_per_shard < 1:
      raise ValueError(f"records_per_shard={self.records_per_shard}: must be >= 1")
    if self.wandb is not None and self.wandb.mode != "disabled":
      import importlib.util
      if importlib.util.find_spec("wandb") is None:  # refused now, not when SFT starts
        from persyn_jax.metrics import import_wandb
        import_wandb()

  @property
  def out_dir(self) -> str:
    return self.run_dir or f"runs/{self.name}"


def load_run_config(path: str | None = None, overrides=()) -> RunConfig:
  cfg = C.load(RunConfig, path, overrides)
  ignored = world_ignores(cfg)
  if ignored:
    keys = [o.split("=", 1)[0] for o in overrides]
    blamed = [f"--set {o}" for o, k in zip(overrides, keys)
              if any(i == k or i.startswith(k + ".") for i in ignored)]
    raise C.ConfigError(
        f"{', '.join(blamed) or path or 'config'}: world is set (the embedded toy world: its own "
        f"teachers, student and prompts), so {', '.join(ignored)} would be ignored; set "
        "`world: null` to use them")
  return cfg


def world_ignores(cfg: RunConfig) -> list[str]:
  """The keys a config sets that `world:` replaces (its models, prompt file and split counts);
  only `prompts.seed` of the prompts section is the run's own under a world."""
  if cfg.world is None:
    return []
  out = [k for k, v in (("teachers", cfg.teachers), ("student", cfg.student)) if v]
  default = PromptsConfig()
  for f in dataclasses.fields(PromptSourceConfig):
    if getattr(cfg.prompts.source, f.name) != getattr(default.source, f.name):
      out.append(f"prompts.source.{f.name}")
  out += [f"prompts.{k}" for k in ("probe", "eval")
          if getattr(cfg.prompts, k) != getattr(default, k)]
  return out
