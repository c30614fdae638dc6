"""Fault injection: kill a process at an exact file commit, fail writes like a full disk, and run
pipeline commands as cheap forked child processes that a test can SIGKILL.

    faults.kill_at("os.replace", 3, match=".array_record")   # SIGKILL at the 3rd shard rename
    faults.fail_at("os.fsync", 1)                             # the first fsync: OSError ENOSPC
    faults.limit_file_size(64 << 10)                          # writes past 64 KiB fail (EFBIG)

These act on the calling process; use them in a child (`Launcher`, or `multiprocessing` with
fork). `Launcher` keeps one warm process that has imported the toolkit (but not started a JAX
backend) and forks a child per command, so a test can start, kill and resume dozens of runs
without paying Python, JAX and transformers start-up each time.
"""
from __future__ import annotations

import errno as errno_mod
import glob
import importlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))

# Modules the launcher imports before forking: everything a pipeline run needs, so a child starts
# in well under a second. None of them may start a JAX backend at import time (checked).
PRELOAD = ("numpy", "jax", "torch", "transformers", "orbax.checkpoint", "grain", "tensorboardX",
           "array_record.python.array_record_module", "persyn_jax.train", "persyn_jax.stages",
           "persyn_jax.toyworld", "persyn_jax.toyworld.build", "persyn_jax.sampling",
           "persyn_jax.sampling.records", "persyn_jax.scoring", "persyn_jax.router",
           "persyn_jax.router_train", "persyn_jax.sft", "persyn_jax.sft.trainer",
           "persyn_jax.training", "persyn_jax.data.batches", "persyn_jax.evaluate",
           "persyn_jax.report", "persyn_jax.report.assemble")


def _resolve(target: str) -> tuple[Any, str]:
  """("os.replace") -> (the os module, "replace")."""
  mod, _, attr = target.rpartition(".")
  return importlib.import_module(mod), attr


def _fd_path(fd: int) -> str:
  try:
    return os.readlink(f"/proc/self/fd/{fd}")
  except OSError:
    return f"<fd {fd}>"


def _call_path(args: Sequence[Any]) -> str:
  """The path a patched call acts on: the destination of a rename, else the first argument
  ("fd:<path>" for a file descriptor)."""
  if len(args) >= 2 and isinstance(args[1], (str, bytes, os.PathLike)):
    return os.fsdecode(args[1])
  if args and isinstance(args[0], int) and not isinstance(args[0], bool):
    return "fd:" + _fd_path(args[0])
  return os.fsdecode(args[0]) if args and isinstance(args[0], (str, bytes, os.PathLike)) else ""


def _patch(target: str, n: int, match: str | None, action: Callable[[str], None], when: str
           ) -> Callable[[], None]:
  if n < 1:
    raise ValueError(f"{target}: n={n}, counting starts at 1")
  if when not in ("before", "after"):
    raise ValueError(f"when={when!r}: before or after")
  mod, attr = _resolve(target)
  real = getattr(mod, attr)
  seen = [0]

  def patched(*args, **kwargs):
    path = _call_path(args)
    hit = match is None or match in path
    if hit:
      seen[0] += 1
    if hit and seen[0] == n and when == "before":
      action(path)
    out = real(*args, **kwargs)
    if hit and seen[0] == n and when == "after":
      action(path)
    return out

  setattr(mod, attr, patched)
  return lambda: setattr(mod, attr, real)


def _sigkill(_path: str) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def kill_at(target: str, n: int, *, match: str | None = None, when: str = "before"
            ) -> Callable[[], None]:
  """SIGKILL this process at the n-th call of `target` (e.g. "os.replace") whose path contains
  `match`, just before (or after) the real call. Returns a function that removes the patch."""
  return _patch(target, n, match, _sigkill, when)


def fail_at(target: str, n: int, *, match: str | None = None, errno: int = errno_mod.ENOSPC,
            when: str = "before") -> Callable[[], None]:
  """The n-th call of `target` whose path contains `match` raises OSError(errno) (by default
  ENOSPC, "No space left on device"), naming the path as the real call would (a call on a file
  descriptor, like os.fsync, names none). Returns a function that removes the patch."""
  def fail(path: str) -> None:
    if path.startswith("fd:"):  # like the real call: an fd-based call's error names no file
      raise OSError(errno, os.strerror(errno))
    raise OSError(errno, os.strerror(errno), path)
  return _patch(target, n, match, fail, when)


def limit_file_size(nbytes: int) -> None:
  """Every write of this process past `nbytes` of a file fails with EFBIG, in Python and in C++
  alike (RLIMIT_FSIZE): a disk that fills up, without root or a loop device."""
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def apply(spec: Mapping[str, Any] | None) -> None:
  """Installs faults from a JSON-able spec: {"kill_at": {...}, "fail_at": {...},
  "limit_file_size": n} (the keyword arguments of the functions above, plus "target")."""
  spec = dict(spec or {})
  if spec.get("limit_file_size"):
    limit_file_size(int(spec["limit_file_size"]))
  for key, fn in (("kill_at", kill_at), ("fail_at", fail_at)):
    if spec.get(key):
      kw = dict(spec[key])
      fn(kw.pop("target"), int(kw.pop("n")), **kw)


# -- the launcher --------------------------------------------------------------------------------

def _backend_started() -> bool:
  xb = sys.modules.get("jax._src.xla_bridge")
  return bool(xb is not None and getattr(xb, "_backends", None))


def _child(req: dict, out_fd: int) -> None:
  """In the forked child: output to `out_fd`, install faults, run the module's main(argv) (or the
  module as `python -m` would), then exit with its code without returning to the server loop."""
  rc = 1
  try:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    os.close(null)
    os.environ.update(req.get("env") or {})
    if req.get("cwd"):
      os.chdir(req["cwd"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    apply(req.get("faults"))
    sys.argv = [req["module"]] + list(req["argv"])
    try:
      mod = importlib.import_module(req["module"])
      if callable(getattr(mod, "main", None)):
        out = mod.main(list(req["argv"]))
        rc = out if isinstance(out, int) else 0
      else:
        import runpy
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        rc = 0
    except SystemExit as e:
      rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # noqa: BLE001 - reported as `python -m` reports an uncaught exception
    import traceback
    traceback.print_exc()
    rc = 1
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(rc)


def _copy(fd: int, path: str) -> None:
  with open(path, "ab") as f, os.fdopen(fd, "rb", buffering=0) as src:
    while True:
      block = src.read(1 << 16)
      if not block:
        return
      f.write(block)
      f.flush()


def serve() -> None:
  """The launcher's warm process: reads one JSON request per line on stdin, forks a child per
  request, answers {"pid"} at once and {"pid", "returncode"} when the child ends."""
  out = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # stray prints of imported modules must not corrupt the protocol
  for name in PRELOAD:
    importlib.import_module(name)
  if _backend_started():
    raise RuntimeError("a preloaded module started a JAX backend; forking would be unsafe")
  out.write(json.dumps({"ready": True}) + "\n")
  for line in sys.stdin:
    req = json.loads(line)
    # The child's output goes through a pipe, copied to the log here: a file-size limit on the
    # child (limit_file_size) must not cut its own log short.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
      os.close(r)
      _child(req, w)
    os.close(w)
    copier = threading.Thread(target=_copy, args=(r, req["log"]), daemon=True)
    copier.start()
    out.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    copier.join(timeout=60)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    out.write(json.dumps({"pid": pid, "returncode": code}) + "\n")


class Launcher:
  """Runs `python -m module args` as children forked from one warm process (one at a time).

      with Launcher(env) as la:
        child = la.start("persyn_jax.train", ["--stages", "probe"], log="run.log")
        ...                      # watch files; os.kill(child, SIGKILL) at any point
        rc = la.wait(child)      # -9 when killed
  """

  def __init__(self, env: Mapping[str, str] | None = None, *, python: str = sys.executable,
               timeout: float = 300.0):
    self.env = dict(os.environ if env is None else env)
    # This file is imported as `faults` (tests/ on sys.path): so is the launcher's copy.
    code = f"import sys; sys.path.insert(0, {HERE!r}); from faults import serve; serve()"
    self.proc = subprocess.Popen([python, "-c", code],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env,
                                 text=True, bufsize=1)
    self.timeout = timeout
    self._read()  # {"ready": true}
    self.running: int | None = None

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the launcher process ended (returncode {self.proc.poll()})")
    return json.loads(line)

  def start(self, module: str, argv: Sequence[str], *, log: str, faults: Mapping | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None) -> int:
    if self.running is not None:
      raise RuntimeError(f"child {self.running} is still running; wait() for it first")
    req = {"module": module, "argv": list(argv), "log": os.path.abspath(log),
           "faults": dict(faults or {}), "env": dict(env or {}), "cwd": cwd}
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    self.running = int(self._read()["pid"])
    return self.running

  def wait(self, pid: int) -> int:
    """The child's exit code (negative: the signal that ended it)."""
    msg = self._read()
    if msg.get("pid") != pid:
      raise RuntimeError(f"launcher protocol: expected the end of {pid}, got {msg}")
    self.running = None
    return int(msg["returncode"])

  def close(self) -> None:
    if self.running is not None:
      try:
        os.kill(self.running, signal.SIGKILL)
      except ProcessLookupError:
        pass
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()

  def __enter__(self) -> "Launcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def alive(pid: int) -> bool:
  """The process exists and is not a zombie (the launcher reaps its children at once)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return False


def watch_and_kill(pid: int, root: str, patterns: Sequence[str], nth: int, *, delay: float = 0.0,
                   poll: float = 0.02, timeout: float = 300.0, is_done: Callable[[], bool] | None = None,
                   ignore: set[str] | None = None) -> str | None:
  """SIGKILLs `pid` `delay` seconds after the `nth` new path matching one of the glob `patterns`
  under `root` appears (paths in `ignore` and those present at the start are not new). Returns
  the path that triggered the kill, or None if the process ended first (`is_done()` true)."""
  seen = set(ignore or ())
  for pat in patterns:
    seen.update(glob.glob(os.path.join(root, pat)))
  count, t0 = 0, time.time()
  while time.time() - t0 < timeout:
    for pat in patterns:
      for path in sorted(glob.glob(os.path.join(root, pat))):
        if path in seen:
          continue
        seen.add(path)
        count += 1
        if count == nth:
          if delay:
            time.sleep(delay)
          try:
            os.kill(pid, signal.SIGKILL)
          except ProcessLookupError:
            return None
          return path
    if not alive(pid) or (is_done is not None and is_done()):
      return None
    time.sleep(poll)
  os.kill(pid, signal.SIGKILL)
  raise TimeoutError(f"no {nth}th new file matching {list(patterns)} under {root} in {timeout} s")


def seeded_delays(seed: int, n: int, high: float) -> list[float]:
  rng = random.Random(seed)
  return [rng.uniform(0.0, high) for _ in range(n)]


if __name__ == "__main__":
  serve()
