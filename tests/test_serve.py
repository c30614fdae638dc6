"""python -m persyn_jax.serve over real HTTP on localhost: the OpenAI API, concurrent clients in one
batching loop, greedy answers equal to the in-process sampler's, seeds, refusals, API keys."""
import concurrent.futures as cf
import copy
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from persyn_jax import models
from persyn_jax.engines.openai import Client, EngineError, OpenAIEngineConfig, wait_ready
from persyn_jax.sampling.config import GenerationResult, SamplingConfig
from persyn_jax.sampling.generate import generate
from persyn_jax.serve import Pending, completion, make_server

# Every test here and in test_openai_engine.py uses these shapes (one prompt bucket of 32 tokens,
# batches of 1 or 2 rows, 16 new tokens), so the server and the in-process sampler compile a
# handful of programs once (the compilation cache is shared with the server processes).
SERVER_ARGS = ["--dtype", "float32", "--batch-size", "2", "--min-bucket", "32",
               "--max-prompt-len", "32", "--max-tokens", "16"]
GREEDY = SamplingConfig(max_new_tokens=16, temperature=0.0, top_p=1.0, stop_token_ids=(),
                        batch_size=2, min_bucket=32, max_prompt_len=32)
PROMPTS = ["hi", "what is 3 + 4?", "count to ten", "name a color", "hello world", "2 + 2 =",
           "tell me a joke", "why?"]


class Server:
  """A `python -m persyn_jax.serve` subprocess; stderr (one line per request) goes to a file."""

  def __init__(self, model_path, log_path, port=0, env=None, extra=()):
    self.log_path = log_path
    cmd = [sys.executable, "-m", "persyn_jax.serve", "--model", model_path, "--port", str(port),
           "--served-model-name", "tiny", *SERVER_ARGS, *extra]
    self.log = open(log_path, "ab")
    self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log,
                                 env={**os.environ, **(env or {})})
    line = self.proc.stdout.readline().decode()  # "serving tiny on http://127.0.0.1:PORT/v1"
    m = re.search(r"on (http://\S+)", line)
    if not m:
      self.proc.kill()
      raise RuntimeError(f"server did not start: {line!r}; log: {open(log_path).read()[-2000:]}")
    self.url = m.group(1)
    self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

  def posts(self) -> int:
    """Chat completion requests the server has answered so far (its request log)."""
    with open(self.log_path) as f:
      return f.read().count('"POST /v1/chat/completions')

  def kill(self):
    self.proc.kill()
    self.proc.wait()
    self.proc.stdout.close()
    self.log.close()


def post(url, body, headers=None):
  req = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(),
                               {"Content-Type": "application/json", **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=600) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def tiny_model(model_dir):
  path, _ = model_dir("llama")
  model, tok = models.from_pretrained(path, dtype="float32")
  return path, model, tok


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
  s = Server(tiny_model[0], str(tmp_path_factory.mktemp("serve") / "server.log"),
             env={"SERVE_TEST_KEY": "sk-serve-test-0123"}, extra=["--api-key-env", "SERVE_TEST_KEY"])
  yield s
  s.kill()


AUTH = {"Authorization": "Bearer sk-serve-test-0123"}


def test_health_and_models(server):
  wait_ready(server.url, timeout_s=60)
  with urllib.request.urlopen(server.url.replace("/v1", "/health"), timeout=60) as r:
    assert r.status == 200
  req = urllib.request.Request(server.url + "/models", headers=AUTH)
  with urllib.request.urlopen(req, timeout=60) as r:
    assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny"]


def test_concurrent_greedy_clients_get_the_in_process_answers(server, tiny_model):
  _, model, tok = tiny_model
  want = generate(model, tok, PROMPTS, GREEDY)
  before = server.posts()
  body = lambda p: {"model": "tiny", "messages": [{"role": "user", "content": p}], "n": 1,  # noqa: E731
                    "temperature": 0, "top_p": 1, "max_tokens": 16, "ignore_eos": True, "seed": 5}
  with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
    answers = list(pool.map(lambda p: post(server.url, body(p), AUTH), PROMPTS))
  assert server.posts() - before == len(PROMPTS)
  for (status, resp), w in zip(answers, want):
    assert status == 200, resp
    (choice,) = resp["choices"]
    assert choice["message"]["content"] == w.text
    assert choice["finish_reason"] == w.finish_reason == "length"
    assert resp["usage"] == {"prompt_tokens": w.prompt_tokens, "completion_tokens": 16,
                             "total_tokens": w.prompt_tokens + 16}
  with open(server.log_path) as f:
    sizes = [int(n) for n in re.findall(r"batch of (\d+) requests", f.read())]
  assert max(sizes) > 1, "concurrent requests must share one generate() call"


def test_a_seed_names_the_sampler_stream(server, tiny_model):
  """A request's seed is its prompt index for the sampler: its answer is the in-process one for
  that index, whatever else is served with it, and the same on every request."""
  _, model, tok = tiny_model
  cfg = GREEDY.replace(temperature=1.0, num_samples=2)
  want = generate(model, tok, ["hello world"], cfg, indices=[12345])
  body = {"model": "tiny", "messages": [{"role": "user", "content": "hello world"}], "n": 2,
          "temperature": 1.0, "top_p": 1, "max_tokens": 16, "ignore_eos": True, "seed": 12345}
  with cf.ThreadPoolExecutor(3) as pool:
    answers = list(pool.map(lambda b: post(server.url, b, AUTH),
                            [body, body, {**body, "seed": 7}]))
  texts = [[c["message"]["content"] for c in a[1]["choices"]] for a in answers]
  assert texts[0] == texts[1] == [w.text for w in want]
  assert texts[2] != texts[0] and texts[0][0] != texts[0][1]
  assert [c["completion_tokens"] for c in answers[0][1]["choices"]] == [16, 16]


@pytest.mark.parametrize("body, status, match", [
    ({"model": "other"}, 404, "not served here"),
    ({"stream": True}, 400, "stream"),
    ({"n": 0}, 400, "num_samples"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user"}]}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"seed": -1}, 400, "seed"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"repetition_penalty": 1.2}, 400, "repetition_penalty"),
])
def test_bad_requests_are_refused_with_the_reason(server, body, status, match):
  full = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}
  code, resp = post(server.url, full, AUTH)
  assert code == status and match in resp["error"]["message"]
  assert set(resp["error"]) == {"message", "type", "param", "code"}


def test_parameters_that_ask_for_nothing_are_accepted(server):
  """Fields the sampler cannot honour are refused (above) unless they ask for nothing."""
  body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
          "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
          "response_format": {"type": "text"}, "tools": None}
  code, resp = post(server.url, body, AUTH)
  assert code == 200, resp


def test_the_api_key_is_required_and_a_4xx_is_not_retried(server, monkeypatch):
  code, resp = post(server.url, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
  assert code == 401
  monkeypatch.setenv("WRONG_KEY", "sk-wrong")
  client = Client(OpenAIEngineConfig(server.url, "tiny", api_key_env="WRONG_KEY", retries=3,
                                     backoff_s=0))
  t0 = time.time()
  with pytest.raises(EngineError, match="HTTP 401") as e:
    client.chat("hi", GREEDY, 1)
  assert client.attempts == 1 and time.time() - t0 < 60
  assert "sk-wrong" not in str(e.value)
  monkeypatch.setenv("RIGHT_KEY", "sk-serve-test-0123")
  client = Client(OpenAIEngineConfig(server.url, "tiny", api_key_env="RIGHT_KEY"))
  out = client.chat("hi", GREEDY, 1)
  assert out["usage"]["completion_tokens"] == 16 and client.attempts == 1


def test_max_completion_tokens_supersedes_max_tokens(server):
  """As vLLM and SGLang read them: OpenAI deprecated max_tokens for max_completion_tokens."""
  body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
          "ignore_eos": True, "max_tokens": 16, "max_completion_tokens": 4}
  code, resp = post(server.url, body, AUTH)
  assert code == 200 and resp["usage"]["completion_tokens"] == 4
  assert resp["choices"][0]["finish_reason"] == "length"


def test_a_refusal_before_the_body_is_read_leaves_the_connection_usable(server):
  """A keep-alive client (the openai SDK's pool) sends its next request on the same connection:
  a body the server did not read (unknown route, no key) must not be taken for that request."""
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
  chat_body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                          "temperature": 0, "max_tokens": 4})
  try:
    for path, headers, status in [("/v1/completions", AUTH, 404), ("/v1/chat/completions", {}, 401),
                                  ("/v1/chat/completions", AUTH, 200)]:
      conn.request("POST", path, chat_body, {"Content-Type": "application/json", **headers})
      resp = conn.getresponse()
      data = json.loads(resp.read())
      assert resp.status == status, data
    assert data["usage"]["completion_tokens"] == 4
    conn.request("POST", "/v1/chat/completions", chat_body, {**AUTH, "Content-Length": "ten"})
    resp = conn.getresponse()
    assert resp.status == 400 and "Content-Length" in json.loads(resp.read())["error"]["message"]
  finally:
    conn.close()


def test_messages_the_chat_template_refuses_are_a_400_that_fails_alone(tiny_model):
  """As vLLM answers them: a 400 for that request (a retry cannot fix it), not a 500 for every
  request batched with it."""
  _, model, tok = tiny_model
  strict = copy.copy(tok)
  strict.chat_template = (
      "{% for m in messages %}{% if m['role'] not in ('system', 'user', 'assistant') %}"
      "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}<|im_start|>{{ m['role'] }}\n"
      "{{ m['content'] }}<|im_end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  srv = make_server(model, strict, "tiny", port=0, base=GREEDY)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
  good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
          "max_tokens": 16}
  bad = {**good, "messages": [{"role": "tool", "content": "hi"}]}
  try:
    with cf.ThreadPoolExecutor(2) as pool:
      (code_good, resp_good), (code_bad, resp_bad) = pool.map(lambda b: post(url, b), [good, bad])
  finally:
    srv.shutdown()
    srv.server_close()
  assert code_bad == 400 and "unknown role tool" in resp_bad["error"]["message"], resp_bad
  assert code_good == 200, resp_good


def test_stop_reason_is_vllms():
  """vLLM's stop_reason: the stop string or listed stop token id; null for the tokenizer's EOS
  (unless ignore_eos made it an ordinary listed id) and for a response cut by max_tokens."""
  eos = 3
  results = [GenerationResult(0, 0, "a", (5, eos), "stop", 4, 2, eos),
             GenerationResult(0, 1, "b", (7,), "stop", 4, 1, 7),
             GenerationResult(0, 2, "c", (5,), "stop", 4, 1, "\n"),
             GenerationResult(0, 3, "d", (5, 6), "length", 4, 2, None)]
  p = Pending([{"role": "user", "content": "hi"}], GREEDY, 0, eos)
  p.results = results
  assert [c["stop_reason"] for c in completion(p, "tiny")["choices"]] == [None, 7, "\n", None]
  p.eos = None  # ignore_eos: only the listed ids end a response
  assert [c["stop_reason"] for c in completion(p, "tiny")["choices"]] == [eos, 7, "\n", None]
