"""An OpenAI-compatible chat-completions client for teachers served by an existing engine (vLLM,
SGLang, JetStream's OpenAI front end, or `python -m persyn_jax.serve`).

One call of `chat` is one request for `n` samples of one prompt. It is retried with exponential
backoff on what a busy or restarting server does (refused or reset connections, timeouts, HTTP
408, 429 and 5xx, honouring Retry-After) and on answers that cannot be used (malformed or
truncated JSON, a wrong number of choices, no usage counts, a finish_reason other than stop or
length); never on another 4xx, which a retry cannot fix. The API key is read from the
environment variable the config names, sent only in the Authorization header, and scrubbed from
every error message, so it reaches no record, log or report. Plain http.client, no redirects
followed: a redirect could carry the key elsewhere.
"""
from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.parse
from typing import Any

from persyn_jax.data import chat
from persyn_jax.sampling.config import SamplingConfig


class EngineError(RuntimeError):
  """A request that failed (after its retries, or at once when retrying cannot help)."""


class _Retryable(EngineError):
  def __init__(self, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class OpenAIEngineConfig:
  """A teacher on an OpenAI-compatible server.

  url: the server's API base, as the OpenAI SDK's base_url: http(s)://host[:port][/path], e.g.
    http://127.0.0.1:8000/v1 (a bare host gets /v1); requests go to <url>/chat/completions.
  model: the served model name sent with each request.
  api_key_env: the environment variable holding the API key (None: no Authorization header).
    Never the key itself: configs are written into run directories.
  concurrency: requests in flight at once for this teacher.
  timeout_s: socket timeout of one attempt (connect, and each read).
  retries: further attempts after the first; the wait before attempt k+1 is
    min(max_backoff_s, backoff_s * 2^k), or the server's Retry-After (up to max_backoff_s).
  rate_limit_rps: requests started per second at most (0 = no limit).
  """

  url: str
  model: str
  api_key_env: str | None = None
  concurrency: int = 8
  timeout_s: float = 600
  retries: int = 5
  backoff_s: float = 1.0
  max_backoff_s: float = 60
  rate_limit_rps: float = 0

  def __post_init__(self):
    endpoint(self.url)
    checks = [
        ("model", isinstance(self.model, str) and bool(self.model), "must be a non-empty string"),
        ("api_key_env", self.api_key_env is None or (isinstance(self.api_key_env, str) and
                                                     self.api_key_env.isidentifier()),
         "must name an environment variable (the key itself never goes into a config)"),
        ("concurrency", self.concurrency >= 1, "must be >= 1"),
        ("timeout_s", self.timeout_s > 0, "must be > 0"),
        ("retries", self.retries >= 0, "must be >= 0"),
        ("backoff_s", self.backoff_s >= 0, "must be >= 0"),
        ("max_backoff_s", self.max_backoff_s >= 0, "must be >= 0"),
        ("rate_limit_rps", self.rate_limit_rps >= 0, "must be >= 0 (0 = no limit)"),
    ]
    for name, ok, why in checks:
      if not ok:
        raise ValueError(f"engine.{name}={getattr(self, name)!r}: {why}")

  def replace(self, **kw) -> "OpenAIEngineConfig":
    return dataclasses.replace(self, **kw)


def endpoint(url: str) -> tuple[str, str, int, str]:
  """(scheme, host, port, path of the chat completions endpoint) of an engine url; anything but
  a plain http(s) URL is refused, credentials and query strings included (keys go in the env)."""
  if not isinstance(url, str):
    raise ValueError(f"engine.url={url!r}: must be a string")
  u = urllib.parse.urlsplit(url)
  if u.scheme not in ("http", "https") or not u.hostname:
    raise ValueError(f"engine.url={url!r}: only http:// and https:// URLs with a host are accepted")
  if u.username or u.password or "@" in u.netloc:
    raise ValueError("engine.url: credentials in the URL are refused; put the API key in an "
                     "environment variable and name it in engine.api_key_env")
  if u.query or u.fragment:
    raise ValueError(f"engine.url={url!r}: no query string or fragment (only scheme://host[:port]"
                     "[/path])")
  try:
    port = u.port or (443 if u.scheme == "https" else 80)
  except ValueError:
    raise ValueError(f"engine.url={url!r}: invalid port") from None
  path = u.path.rstrip("/") or "/v1"
  return u.scheme, u.hostname, port, path + "/chat/completions"


def public_url(url: str) -> str:
  """The url as recorded in provenance (endpoint() refused anything secret in it)."""
  endpoint(url)
  return url.rstrip("/")


def api_key(cfg: OpenAIEngineConfig) -> str | None:
  if cfg.api_key_env is None:
    return None
  key = (os.environ.get(cfg.api_key_env) or "").strip()  # a secret file's trailing newline
  if not key:
    raise EngineError(f"engine.api_key_env: the environment variable {cfg.api_key_env} is not "
                      "set or empty")
  if not all("!" <= c <= "~" for c in key):  # http.client's error would quote the header
    raise EngineError(f"engine.api_key_env: the value of {cfg.api_key_env} has a space, control "
                      "or non-ASCII character, which an HTTP header cannot carry (not shown)")
  return key


def request_seed(seed: int, teacher: str, prompt_id: str) -> int:
  """The seed of one request, from (sampling seed, teacher, prompt id): the same prompt gets the
  same seed on every rerun, whatever else ran. 31 bits, which every engine accepts."""
  digest = hashlib.sha256(f"{seed}\x00{teacher}\x00{prompt_id}".encode("utf-8")).digest()
  return int.from_bytes(digest[:4], "big") >> 1


def request_body(cfg: OpenAIEngineConfig, prompt: chat.Prompt, sampling: SamplingConfig,
                 seed: int) -> dict:
  """The chat completions request for `sampling.num_samples` responses to one prompt.

  top_k, stop_token_ids and ignore_eos are vLLM's extensions (also read by persyn_jax.serve):
  sent only when the config asks for something the standard API cannot say.
  """
  body: dict[str, Any] = {
      "model": cfg.model, "messages": chat.to_messages(prompt, sampling.system_prompt),
      "n": sampling.num_samples, "temperature": sampling.temperature, "top_p": sampling.top_p,
      "max_tokens": sampling.max_new_tokens, "seed": seed}
  if sampling.stop_strings:
    body["stop"] = list(sampling.stop_strings)
  if sampling.top_k:
    body["top_k"] = sampling.top_k
  if sampling.stop_token_ids is not None:
    if sampling.stop_token_ids:
      body["stop_token_ids"] = list(sampling.stop_token_ids)
    body["ignore_eos"] = True  # only the listed ids (or none) end a response, as in-process
  return body


def parse_response(data: bytes, n: int) -> dict:
  """{"choices": [{"text", "finish_reason", "stop", "tokens"}] in sample order, "usage",
  "prompt_truncated"} of a response body; _Retryable when it cannot be used (a finish_reason
  other than "stop" or "length" included). A null message.content is the text ""."""
  try:
    resp = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise _Retryable(f"malformed or truncated JSON response ({len(data)} bytes): {e}") from None
  if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list):
    raise _Retryable(f"response without a 'choices' list: {str(resp)[:200]}")
  choices = resp["choices"]
  if len(choices) != n:
    raise _Retryable(f"response has {len(choices)} choices, {n} were asked for")
  usage = resp.get("usage")
  if not isinstance(usage, dict) or not all(isinstance(usage.get(k), int) and usage[k] >= 0
                                            for k in ("prompt_tokens", "completion_tokens")):
    raise _Retryable(f"response without usage.prompt_tokens / completion_tokens: {usage!r:.200}")
  out: list[dict | None] = [None] * n
  for j, c in enumerate(choices):
    idx = c.get("index", j) if isinstance(c, dict) else None
    msg = c.get("message") if isinstance(c, dict) else None
    text = msg.get("content") if isinstance(msg, dict) else None
    if text is None and isinstance(msg, dict) and "content" in msg:
      text = ""  # the API's content is a string or null: an answer without text
    reason = c.get("finish_reason") if isinstance(c, dict) else None
    if not isinstance(idx, int) or not 0 <= idx < n or out[idx] is not None \
        or not isinstance(text, str) or not isinstance(reason, str):
      raise _Retryable(f"choice {j} lacks a unique index < {n}, message.content or "
                       f"finish_reason: {str(c)[:200]}")
    if reason not in ("stop", "length"):  # vLLM's abort / error: the engine did not finish it
      raise _Retryable(f"choice {j} has finish_reason {reason!r}, not 'stop' or 'length'")
    stop = c.get("stop_reason")
    tokens = c.get("completion_tokens")  # persyn_jax.serve's per-choice count
    if not isinstance(tokens, int):
      tokens = usage["completion_tokens"] if n == 1 else None
    out[idx] = {"text": text, "finish_reason": reason,
                "stop": stop if isinstance(stop, (int, str)) else None, "tokens": tokens}
  return {"choices": out, "prompt_truncated": resp.get("prompt_truncated") is True,
          "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
                    if isinstance(usage.get(k), int)}}


class RateLimiter:
  """Spaces request starts at least 1/rps seconds apart (shared by a teacher's threads)."""

  def __init__(self, rps: float):
    self.gap = 1.0 / rps if rps > 0 else 0.0
    self.next = 0.0
    self.lock = threading.Lock()

  def wait(self) -> None:
    if not self.gap:
      return
    with self.lock:
      now = time.monotonic()
      start = max(now, self.next)
      self.next = start + self.gap
    if start > now:
      time.sleep(start - now)


def _retry_after(value: str | None) -> float | None:
  """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


class Client:
  """Requests to one engine; safe to share between threads (a connection per attempt)."""

  def __init__(self, cfg: OpenAIEngineConfig, *, sleep=time.sleep):
    self.cfg = cfg
    self.scheme, self.host, self.port, self.path = endpoint(cfg.url)
    self.key = api_key(cfg)
    self.limiter = RateLimiter(cfg.rate_limit_rps)
    self.sleep = sleep
    self.attempts = 0  # requests sent, retries included (cost and log lines)

  def scrub(self, text: str) -> str:
    """`text` without the API key (a server may echo the header back in an error body)."""
    return text.replace(self.key, "***") if self.key else text

  def _post(self, body: bytes) -> bytes:
    conn_cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(self.host, self.port, timeout=self.cfg.timeout_s)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self.key:
      headers["Authorization"] = f"Bearer {self.key}"
    try:
      conn.request("POST", self.path, body=body, headers=headers)
      resp = conn.getresponse()
      data = resp.read()
    except (OSError, http.client.HTTPException) as e:  # refused, reset, timeout, cut short
      raise _Retryable(f"{type(e).__name__}: {e}") from None
    finally:
      conn.close()
    if resp.status == 200:
      return data
    detail = data[:300].decode("utf-8", "replace")
    msg = f"HTTP {resp.status} {resp.reason}: {detail}"
    if resp.status in (408, 429) or resp.status >= 500:  # 408: RFC 9110 lets the client repeat
      raise _Retryable(msg, _retry_after(resp.getheader("Retry-After")))
    raise EngineError(msg)

  def chat(self, prompt: chat.Prompt, sampling: SamplingConfig, seed: int) -> dict:
    """One prompt's `num_samples` responses (see parse_response), retried as the module says."""
    body = json.dumps(request_body(self.cfg, prompt, sampling, seed)).encode("utf-8")
    where = f"{self.cfg.url} (model {self.cfg.model})"
    for attempt in range(self.cfg.retries + 1):
      self.limiter.wait()
      self.attempts += 1
      try:
        return parse_response(self._post(body), sampling.num_samples)
      except _Retryable as e:
        if attempt == self.cfg.retries:
          raise EngineError(self.scrub(f"{where}: {e} (after {attempt + 1} attempts)")) from None
        wait = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt)
        if e.retry_after is not None:
          wait = min(self.cfg.max_backoff_s, e.retry_after)
        self.sleep(wait * (1 + 0.1 * random.random()))  # jitter: restarts are not hit in step
      except EngineError as e:
        raise EngineError(self.scrub(f"{where}: {e}")) from None
    raise AssertionError("unreachable")


def wait_ready(url: str, timeout_s: float = 60) -> None:
  """Blocks until GET <base>/health (persyn_jax.serve, vLLM) answers 200."""
  scheme, host, port, _ = endpoint(url)
  conn_cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
  deadline = time.monotonic() + timeout_s
  while True:
    conn = conn_cls(host, port, timeout=5)
    try:
      conn.request("GET", "/health")
      if conn.getresponse().status == 200:
        return
    except (OSError, http.client.HTTPException, socket.timeout):
      pass
    finally:
      conn.close()
    if time.monotonic() > deadline:
      raise EngineError(f"{url}: no healthy server after {timeout_s} s")
    time.sleep(0.2)


__all__ = ["OpenAIEngineConfig", "Client", "EngineError", "endpoint", "request_seed",
           "request_body", "parse_response", "wait_ready", "public_url"]
