"""What every stage shares: the run's config, its directory, the prompt split, the meshes, model
loading on a stage's mesh, reading a stage's records, and the names of teachers' shard files."""
from __future__ import annotations

import contextlib
import json
from typing import Callable, Iterator

import jax

from persyn_jax import fs, models
from persyn_jax import policies as pol
from persyn_jax import sharding as shd
from persyn_jax.data import shards
from persyn_jax.data.sources import load_prompts, split_prompts
from persyn_jax.io_utils import atomic_write_json, safe_name
from persyn_jax.run_config import ModelRef, RunConfig

Log = Callable[[str], None]

# The file-name prefix of a teacher's shards in the stages that sample teachers.
_TEACHER_SHARDS = {"probe": "probe", "generate": "gen"}


def teacher_shards(stage: str, teacher: str) -> str:
  """The shard prefix of `teacher`'s responses in `stage` (probe or generate), e.g.
  `probe-<safe name>`: the one place this name is spelled."""
  return f"{_TEACHER_SHARDS[stage]}-{safe_name(teacher)}"


# What the run is doing now (stage, teacher, file): the CLI names it when an unexpected error
# escapes, so that a traceback from deep inside a library still says where in the run it came from.
ACTIVITY: dict[str, str] = {}


@contextlib.contextmanager
def doing(**what: str) -> Iterator[None]:
  """Within this block the run is doing `what` (e.g. stage="probe", teacher="A"); on leaving, the
  outer activity is back, unless an exception leaves: then it stays, for the error handler."""
  before = dict(ACTIVITY)
  ACTIVITY.update({k: str(v) for k, v in what.items()})
  yield
  ACTIVITY.clear()
  ACTIVITY.update(before)


def activity() -> str:
  """`stage generate, teacher A, file /run/x` (empty when nothing was set)."""
  return ", ".join(f"{k} {v}" for k, v in ACTIVITY.items())


def log_to_stdout(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


class Context:
  """One run directory and its config, as the stages see them."""

  def __init__(self, cfg: RunConfig, *, log: Log = log_to_stdout):
    if cfg.student is None or not cfg.teachers:
      raise ValueError("the run config has no teachers or no student: with `world:` set, resolve "
                       "it first (persyn_jax.toyworld.resolve, which `python -m persyn_jax.train` "
                       "calls)")
    self.cfg = cfg
    self.log = log
    self.dir = fs.abspath(cfg.out_dir)
    self.teachers = [t.name for t in cfg.teachers]
    for t in cfg.teachers:
      safe_name(t.name, "teacher name")
    self._meshes: dict[shd.MeshConfig, jax.sharding.Mesh] = {}
    self._prompts: dict[str, list[dict]] | None = None
    # Built now: a run mesh that does not fit the devices is an error before any stage runs.
    self.mesh = self.mesh_for(None)

  # -- files ----------------------------------------------------------------------------------
  def path(self, *parts: str) -> str:
    """A path in the run directory (a gs:// URL when the run directory is one)."""
    return fs.join(self.dir, *parts)

  @staticmethod
  def is_writer() -> bool:
    """True on the one process that writes the run's shared files (process 0)."""
    return jax.process_index() == 0

  def write_json(self, obj, *parts: str) -> None:
    """A shared file of the run: written by process 0 only."""
    if self.is_writer():
      atomic_write_json(self.path(*parts), obj)

  def read_marker(self, path: str) -> dict | None:
    """A JSON object a stage wrote to mark a finished part of its work (a student's DONE.json,
    an evaluation's result.json): None when it is missing, or damaged (a disk that failed after
    the atomic write, a hand edit), which the log names; the part is then done again."""
    if not fs.exists(path):
      return None
    try:
      obj = json.loads(fs.read_bytes(path).decode("utf-8"))
      if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object: {str(obj)[:60]!r}")
    except (OSError, ValueError) as e:
      self.log(f"{path} is unreadable ({type(e).__name__}: {e}); doing its part again")
      return None
    return obj

  def records(self, stage: str, prefix: str | None = None) -> list[dict]:
    """The records of `stage` (run_dir/<stage>/), those with shard prefix `prefix` (default: the
    stage's name)."""
    with doing(file=self.path(stage)):
      return list(shards.read_records(self.path(stage), prefix or stage))

  def teacher_records(self, stage: str, teachers=None) -> list[dict]:
    """Every teacher's responses in `stage` (probe or generate), teacher by teacher in run order."""
    out = []
    for t in self.teachers if teachers is None else teachers:
      with doing(teacher=t):
        out += self.records(stage, teacher_shards(stage, t))
    return out

  # -- prompts --------------------------------------------------------------------------------
  def prompts(self) -> dict[str, list[dict]]:
    """The probe / eval / train / rest split of the run's prompts (loaded once)."""
    if self._prompts is None:
      c = self.cfg.prompts
      with doing(file=c.source.path or "prompts"):
        items, skipped = load_prompts(c.source)
      if not items:
        raise ValueError(f"{c.source.path}: no usable prompts (skipped: {skipped})")
      amount = lambda v: int(v) if v >= 1 else v  # noqa: E731
      self._prompts = split_prompts(items, probe=amount(c.probe), eval=amount(c.eval), seed=c.seed)
      self._prompts["skipped"] = skipped
    return self._prompts

  # -- meshes and models ----------------------------------------------------------------------
  def mesh_for(self, config: shd.MeshConfig | None) -> jax.sharding.Mesh:
    """A stage's mesh: `config` (its `<stage>.mesh`), or the run's mesh when None; each distinct
    mesh is built once per run."""
    config = self.cfg.mesh if config is None else config
    if config not in self._meshes:
      self._meshes[config] = shd.make_mesh(config)
    return self._meshes[config]

  def load(self, ref: ModelRef, mesh: jax.sharding.Mesh, **kw):
    """(model, tokenizer) of `ref` (an HF directory or a convert output) in `ref.dtype`, laid out
    on `mesh`."""
    with doing(file=ref.path):
      return models.load_model(ref.path, dtype=ref.dtype, mesh=mesh,
                               quantize=ref.quantize or None, **kw)

  # -- what the score stage measured ----------------------------------------------------------
  def score_table(self) -> pol.ScoreTable:
    """Quality, learnability and reward of every (probe prompt, teacher) pair."""
    from persyn_jax.scoring import reward_matrix
    recs = self.records("score")
    ids, teachers, reward = reward_matrix(recs, self.teachers, "reward")
    _, _, quality = reward_matrix(recs, self.teachers, "quality")
    _, _, learn = reward_matrix(recs, self.teachers, "learnability")
    return pol.ScoreTable(tuple(ids), tuple(teachers), quality, learn, reward)
