"""`python -m persyn_jax.serve --model DIR`: the project's own sampler behind the OpenAI chat
completions API, so a pod can host teachers as services, each on its own slice, and
`engine: openai` teachers (persyn_jax.engines) can use them.

    POST /v1/chat/completions   messages, n, temperature, top_p, max_tokens, seed, stop
                                (and vLLM's top_k, stop_token_ids, ignore_eos)
    GET  /v1/models             the served model
    GET  /health                200 once the model is loaded

Request threads only parse and wait: one worker thread takes every pending request, groups those
whose sampling settings agree, and runs each group as one `sampling.generate` call (which batches
and buckets them), so concurrent clients share batches. A request's `seed` is its prompt index in
that call: the sampler's keys depend on (server seed, prompt index, sample), never on the other
prompts of the batch, so a seeded request gets the same answer whoever else is being served.
Binds 127.0.0.1 unless --host says otherwise. With --api-key-env, requests must carry that
variable's value as a Bearer token.
"""
from __future__ import annotations

import argparse
import dataclasses
import hmac
import json
import os
import queue
import random
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from persyn_jax.data import chat
from persyn_jax.sampling.config import SamplingConfig

MAX_BODY = 16 << 20  # bytes of one request body
# OpenAI / vLLM request fields the sampler cannot honour, with the values that ask for nothing:
# any other value is refused (400) rather than silently ignored
UNSUPPORTED = {"logprobs": (False,), "top_logprobs": (0,), "presence_penalty": (0,),
               "frequency_penalty": (0,), "repetition_penalty": (1,), "min_p": (0,),
               "min_tokens": (0,), "logit_bias": ({},), "include_stop_str_in_output": (False,),
               "use_beam_search": (False,), "tools": ([],), "response_format": ({"type": "text"},)}


class RequestError(ValueError):
  """A request the server refuses (an HTTP status and an OpenAI-style message)."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class Pending:
  """One request waiting for the worker: its prompt, settings and seed (prompt index)."""

  messages: list
  config: SamplingConfig
  index: int
  eos: int | None = None  # the tokenizer's EOS when it ends responses (stop_reason null, as vLLM)
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  results: list | None = None
  error: str | None = None


def _number(body: dict, key: str, default, integer: bool = False):
  v = body.get(key)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
    raise RequestError(400, f"{key}={v!r}: must be {'an integer' if integer else 'a number'}")
  return v


def sampling_config(body: dict, base: SamplingConfig, eos_ids: tuple[int, ...]) -> SamplingConfig:
  """The request's sampling settings over the server's (`base`: batch size, prompt length...).

  Stop tokens as vLLM reads them: EOS (`eos_ids`) plus any `stop_token_ids`; with
  `ignore_eos`, only the listed ids (none: always max_tokens tokens).
  """
  # max_completion_tokens supersedes OpenAI's deprecated max_tokens (vLLM and SGLang read it first)
  max_tokens = _number(body, "max_completion_tokens", _number(body, "max_tokens",
                                                              base.max_new_tokens, True), True)
  stop = body.get("stop") or ()
  stop = (stop,) if isinstance(stop, str) else stop
  if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
    raise RequestError(400, f"stop={stop!r}: a string or a list of strings")
  listed = body.get("stop_token_ids") or []
  if not isinstance(listed, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                             for i in listed):
    raise RequestError(400, f"stop_token_ids={listed!r}: a list of integers")
  if body.get("ignore_eos") is True:
    stop_ids: tuple[int, ...] | None = tuple(listed)
  else:
    stop_ids = tuple(dict.fromkeys(eos_ids + tuple(listed))) if listed else None
  try:
    return base.replace(max_new_tokens=max_tokens,
                        temperature=float(_number(body, "temperature", 1.0)),
                        top_p=float(_number(body, "top_p", 1.0)),
                        top_k=_number(body, "top_k", 0, True),
                        num_samples=_number(body, "n", 1, True),
                        stop_strings=tuple(stop), stop_token_ids=stop_ids)
  except ValueError as e:
    raise RequestError(400, str(e).replace("sampling.", "")) from None


class Batcher:
  """The batching loop: a worker thread that runs pending requests as few generate() calls."""

  def __init__(self, model, tokenizer, *, wait_s: float = 0.005, log=None):
    self.model, self.tokenizer = model, tokenizer
    self.wait_s = wait_s
    self.queue: queue.Queue[Pending] = queue.Queue()
    self.log = log or (lambda msg: None)
    self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
    self.thread.start()

  def submit(self, p: Pending) -> Pending:
    self.queue.put(p)
    p.done.wait()
    return p

  def _loop(self) -> None:
    from persyn_jax.sampling.generate import generate
    while True:
      pending = [self.queue.get()]
      time.sleep(self.wait_s)  # requests sent together arrive a little apart: batch them too
      while True:
        try:
          pending.append(self.queue.get_nowait())
        except queue.Empty:
          break
      groups: dict[SamplingConfig, list[Pending]] = {}
      for p in pending:
        groups.setdefault(p.config, []).append(p)
      for cfg, group in groups.items():
        t0 = time.perf_counter()
        try:
          results = generate(self.model, self.tokenizer, [p.messages for p in group], cfg,
                             indices=[p.index for p in group])
          n = cfg.num_samples
          for j, p in enumerate(group):
            p.results = results[j * n:(j + 1) * n]
        except Exception as e:  # noqa: BLE001  the clients get a 500; the server keeps serving
          for p in group:
            p.error = f"generation failed: {type(e).__name__}: {e}"
        self.log(f"batch of {len(group)} requests x {cfg.num_samples} samples in "
                 f"{time.perf_counter() - t0:.2f} s")
        for p in group:
          p.done.set()


def completion(p: Pending, model_name: str) -> dict:
  """The chat.completion object of a served request."""
  rs = p.results
  # vLLM's stop_reason: the stop string or listed stop token id, null for EOS (or none)
  choices = [{"index": r.sample, "message": {"role": "assistant", "content": r.text},
              "finish_reason": r.finish_reason,
              "stop_reason": None if p.eos is not None and r.stop == p.eos else r.stop,
              "completion_tokens": r.response_tokens, "logprobs": None} for r in rs]
  completion_tokens = sum(r.response_tokens for r in rs)
  return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
          "created": int(time.time()), "model": model_name, "choices": choices,
          "prompt_truncated": rs[0].truncated,
          "usage": {"prompt_tokens": rs[0].prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": rs[0].prompt_tokens + completion_tokens}}


def make_handler(batcher: Batcher, model_name: str, base: SamplingConfig, api_key: str | None):
  from persyn_jax.sampling.generate import stop_ids
  eos_ids = stop_ids(batcher.model, batcher.tokenizer, base.replace(stop_token_ids=None))

  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "persyn_jax.serve"

    def _send(self, status: int, obj: Any) -> None:
      data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      if self.command == "POST" and not self.body_read:
        # an answer before the body was read (a refusal): the rest of the body would be taken
        # for the next request on this keep-alive connection, so it is closed
        self.send_header("Connection", "close")
      self.end_headers()
      self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
      kind = "invalid_request_error" if status < 500 else "server_error"
      self._send(status, {"error": {"message": message, "type": kind, "param": None,
                                    "code": status}})  # OpenAI's error object, as vLLM fills it

    def _authorized(self) -> bool:
      if api_key is None:
        return True
      given = self.headers.get("Authorization", "")
      if hmac.compare_digest(given.encode("utf-8"), f"Bearer {api_key}".encode("utf-8")):
        return True
      self._error(401, "missing or wrong API key (Authorization: Bearer ...)")
      return False

    def do_GET(self) -> None:
      if self.path == "/health":
        self._send(200, {"status": "ok"})
      elif self.path == "/v1/models":
        if self._authorized():
          self._send(200, {"object": "list", "data": [
              {"id": model_name, "object": "model", "created": 0, "owned_by": "persyn_jax"}]})
      else:
        self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
      self.body_read = False
      if self.path != "/v1/chat/completions":
        self._error(404, f"no route POST {self.path}")
        return
      if not self._authorized():
        return
      try:
        p = self._parse()
      except RequestError as e:
        self._error(e.status, str(e))
        return
      batcher.submit(p)
      if p.error is not None:
        self._error(500, p.error)
      else:
        self._send(200, completion(p, model_name))

    def _parse(self) -> Pending:
      try:
        length = int(self.headers.get("Content-Length") or 0)
      except ValueError:
        length = -1
      if not 0 < length <= MAX_BODY:
        raise RequestError(413 if length > MAX_BODY else 400 if length else 411,
                           f"a JSON body of 1 to {MAX_BODY} bytes, with Content-Length, is "
                           "required")
      data = self.rfile.read(length)
      self.body_read = True
      try:
        body = json.loads(data.decode("utf-8"))
      except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"the body is not JSON: {e}") from None
      if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
      if body.get("model") not in (None, model_name):
        raise RequestError(404, f"model {body.get('model')!r} is not served here "
                                f"(this server serves {model_name!r})")
      if body.get("stream"):
        raise RequestError(400, "stream=true is not supported")
      for key, off in UNSUPPORTED.items():
        if body.get(key) is not None and body[key] not in off:
          raise RequestError(400, f"{key}={body[key]!r:.80} is not supported by this server")
      if not isinstance(body.get("messages"), list):  # the API's messages is an array
        raise RequestError(400, f"messages: a list of {{'role', 'content'}} messages is required, "
                                f"got {body.get('messages')!r:.80}")
      try:
        messages = chat.to_messages(body.get("messages"))
      except (TypeError, ValueError) as e:
        raise RequestError(400, f"messages: {e}") from None
      if not messages:
        raise RequestError(400, "messages: at least one message is required")
      try:  # here, so that messages the chat template refuses fail alone (not their batch)
        chat.prompt_text(batcher.tokenizer, messages)
      except (TypeError, ValueError) as e:  # chat.ChatTemplateError included
        raise RequestError(400, f"messages: {e}") from None
      seed = body.get("seed")
      if seed is None:
        seed = random.randrange(2 ** 32)
      if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise RequestError(400, f"seed={seed!r}: an integer in [0, 2^32)")
      eos = None if body.get("ignore_eos") is True else batcher.tokenizer.eos_token_id
      return Pending(messages, sampling_config(body, base, eos_ids), seed, eos)

    def log_message(self, fmt: str, *args) -> None:
      sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

  return Handler


def make_server(model, tokenizer, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
                base: SamplingConfig = SamplingConfig(), api_key: str | None = None,
                log=None) -> ThreadingHTTPServer:
  """The HTTP server (not yet serving: call serve_forever); port 0 picks a free port."""
  batcher = Batcher(model, tokenizer, log=log)
  server = ThreadingHTTPServer((host, port), make_handler(batcher, model_name, base, api_key))
  server.daemon_threads = True
  return server


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m persyn_jax.serve", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="an HF model directory or a persyn_jax.convert "
                                                 "output")
  ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
  ap.add_argument("--port", type=int, default=8000, help="0 = any free port (printed at start)")
  ap.add_argument("--batch-size", type=int, default=64, help="rows (prompt x sample) per batch")
  ap.add_argument("--served-model-name", default=None, help="default: the model directory's name")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--max-prompt-len", type=int, default=1024,
                  help="longer prompts are cut from the left (the response says prompt_truncated)")
  ap.add_argument("--max-tokens", type=int, default=512, help="when a request gives no max_tokens")
  ap.add_argument("--min-bucket", type=int, default=16)
  ap.add_argument("--seed", type=int, default=0, help="the sampler seed (request seeds index it)")
  ap.add_argument("--api-key-env", default=None,
                  help="require the key in this environment variable from every client")
  args = ap.parse_args(argv)
  try:
    base = SamplingConfig(max_new_tokens=args.max_tokens, batch_size=args.batch_size,
                          max_prompt_len=args.max_prompt_len, min_bucket=args.min_bucket,
                          seed=args.seed)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  api_key = None
  if args.api_key_env:
    api_key = (os.environ.get(args.api_key_env) or "").strip()  # as the client reads it
    if not api_key:
      print(f"error: --api-key-env {args.api_key_env}: the variable is not set", file=sys.stderr)
      return 2
  from persyn_jax.models import CheckpointError, load_model
  try:
    model, tok = load_model(args.model, dtype=args.dtype)
  except (CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  server = make_server(model, tok, name, host=args.host, port=args.port, base=base,
                       api_key=api_key, log=log)
  host, port = server.server_address[:2]
  print(f"serving {name} on http://{host}:{port}/v1", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
