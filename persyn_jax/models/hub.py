"""Hub checkpoints: a model `path` may be a local directory or a Hugging Face hub id.

    resolve("/ckpt/qwen2.5-7b")           # an existing directory, returned as is
    resolve("Qwen/Qwen2.5-7B-Instruct")    # downloaded once into the hub cache, then its snapshot
    resolve("org/name@v1.0")               # a branch, tag or commit

Only what loading needs is downloaded (`ALLOW_PATTERNS`): safetensors weights and their index, the
model and generation configs, tokenizer files and the chat template - never `.bin`/`.pt`/pickle,
which this toolkit will not read. On each machine one process downloads, holding an fcntl lock in
the cache directory, while the others wait for it and then find the snapshot in the cache; the
cache is the ordinary huggingface_hub one (`HF_HOME`, `HF_HUB_CACHE`, or `cache_dir`), so `hf
download` fills it ahead of time for machines that cannot reach the hub (`HF_HUB_OFFLINE=1`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex

ALLOW_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json",
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
# A repository's original/ folder holds a second copy of the weights in another layout.
IGNORE_PATTERNS = ("original/*",)

_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


class HubError(OSError):
  """A model path that is neither a local directory nor a hub id that can be had (the message
  names the id and the command that pre-downloads it)."""


def parse_id(path_or_id: str) -> tuple[str, str | None] | None:
  """(repo id, revision or None) of "org/name[@revision]"; None for anything else."""
  m = _ID.match(path_or_id)
  if not m or path_or_id.startswith((".", "/", "~")):
    return None
  return m.group("repo"), m.group("revision")


def download_command(repo_id: str, revision: str | None = None, cache_dir: str | None = None
                     ) -> str:
  """The `hf` CLI command that fills the cache with what `resolve` needs, to run where the hub
  can be reached (then copy the cache, or share it, with the offline machines)."""
  args = ["hf", "download", repo_id]
  for pattern in ALLOW_PATTERNS:
    args += ["--include", pattern]
  for pattern in IGNORE_PATTERNS:
    args += ["--exclude", pattern]
  if revision:
    args += ["--revision", revision]
  if cache_dir:
    args += ["--cache-dir", cache_dir]
  return shlex.join(args)


def missing_files(snapshot: str) -> list[str]:
  """What a snapshot lacks to be loaded: config.json, any weights, or shards its index names
  (unless it has a model.safetensors, which the loader reads before an index, as transformers)."""
  missing = [] if os.path.isfile(os.path.join(snapshot, "config.json")) else ["config.json"]
  names = os.listdir(snapshot) if os.path.isdir(snapshot) else []
  indexes = [n for n in names if n.endswith(".safetensors.index.json")]
  if "model.safetensors" in names:
    indexes = []
  for index in indexes:
    try:
      with open(os.path.join(snapshot, index), encoding="utf-8") as f:
        wmap = json.load(f)["weight_map"]
      shards = sorted(set(wmap.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      # TypeError, AttributeError: an index or weight_map that is not an object
      missing.append(f"{index} (unreadable: {type(e).__name__}: {e})")
      continue
    missing += [s for s in shards if not os.path.isfile(os.path.join(snapshot, s))]
  if not indexes and not any(n.endswith(".safetensors") for n in names):
    missing.append("*.safetensors")
  return missing


def _cached(repo_id: str, revision: str | None, cache_dir: str | None) -> str | None:
  """The complete local snapshot of the id, or None (never touches the network)."""
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import LocalEntryNotFoundError

  try:
    snapshot = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                 allow_patterns=list(ALLOW_PATTERNS),
                                 ignore_patterns=list(IGNORE_PATTERNS), local_files_only=True)
  except (LocalEntryNotFoundError, FileNotFoundError):
    return None
  return snapshot if not missing_files(snapshot) else None


def _download(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
  """Fetches the allowed files of the id into the cache; returns its snapshot directory."""
  from huggingface_hub import snapshot_download

  return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                           allow_patterns=list(ALLOW_PATTERNS),
                           ignore_patterns=list(IGNORE_PATTERNS))


@contextlib.contextmanager
def _machine_lock(repo_id: str, cache_dir: str):
  """Held by one process of the machine at a time (fcntl: released when the process dies, too)."""
  folder = os.path.join(cache_dir, ".locks", "persyn_jax")
  try:
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, "models--" + repo_id.replace("/", "--") + ".lock"), "a")
  except OSError:  # a read-only cache, filled ahead of time: nobody downloads into it
    yield
    return
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def resolve(path_or_id: str, *, cache_dir: str | None = None) -> str:
  """A local directory holding the model: `path_or_id` itself if it is a directory, else the
  cached snapshot of the hub id "org/name[@revision]", downloaded first if need be (one process
  per machine; the others wait on the lock). Raises HubError naming the id and the `hf download`
  command when the model is not cached and the hub cannot be reached (or `HF_HUB_OFFLINE=1`)."""
  path_or_id = os.fspath(path_or_id)
  if os.path.isdir(path_or_id):
    return path_or_id
  parsed = parse_id(path_or_id)
  if parsed is None:
    raise HubError(f"model path {path_or_id!r}: no such directory, and not a hub id "
                   "('org/name' or 'org/name@revision')")
  repo_id, revision = parsed
  from huggingface_hub import constants

  cache = os.fspath(cache_dir) if cache_dir else constants.HF_HUB_CACHE
  command = download_command(repo_id, revision, os.fspath(cache_dir) if cache_dir else None)
  with _machine_lock(repo_id, cache):
    snapshot = _cached(repo_id, revision, cache)
    if snapshot is not None:
      return snapshot
    if constants.HF_HUB_OFFLINE:
      raise HubError(f"model {path_or_id!r} is not a local directory nor in the hub cache {cache}, "
                     f"and HF_HUB_OFFLINE is set; pre-download it where the hub can be reached "
                     f"with:\n  {command}")
    try:
      snapshot = _download(repo_id, revision, cache)
    except Exception as e:  # hub, network and filesystem errors alike end in the same advice
      raise HubError(f"model {path_or_id!r}: cannot download from the hub ({type(e).__name__}: "
                     f"{e}); pre-download it with:\n  {command}") from e
    missing = missing_files(snapshot)
    if missing:
      raise HubError(f"model {path_or_id!r}: the hub snapshot {snapshot} has no {missing} (only "
                     "safetensors checkpoints can be loaded)")
    return snapshot
