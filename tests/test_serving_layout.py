"""The serving layout: weights split over `tensor` only, kv heads copied where `tensor` exceeds
them, rows over `data`; on 8 CPU devices (conftest) the logits and greedy tokens equal the
one-device model's."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from persyn_jax import sharding as shd
from persyn_jax.models import CACHE_KV_AXES, load_model
from persyn_jax.sampling import SamplingConfig, generate

PROMPTS = ["hello world", "Tom has 12 apples and gives 5 to Ann.", "def f(x):", "Once upon"]


@pytest.mark.parametrize("heads,kv,tensor,copies", [
    (4, 2, 4, 2), (8, 8, 8, 1), (64, 8, 16, 2), (32, 8, 4, 1), (40, 10, 4, 2), (4, 1, 2, 2)])
def test_kv_head_copies_make_tensor_divide_the_kv_heads(heads, kv, tensor, copies):
  r = shd.kv_head_replicas(heads, kv, tensor)
  assert r == copies
  assert (kv * r) % tensor == 0 and heads % (kv * r) == 0


def test_a_tensor_size_that_splits_no_head_layout_is_refused():
  with pytest.raises(ValueError, match="teacher-x: 6 query heads do not split over tensor=4"):
    shd.kv_head_replicas(6, 2, 4, what="teacher-x")


def test_training_rules_never_copy_kv_heads():
  assert shd.SERVING.replicate_kv and not shd.TRAINING.replicate_kv
  assert shd.SERVING.replace("x", mlp=()).replicate_kv


def _mesh(data, tensor):
  return shd.make_mesh(shd.MeshConfig(data=data, fsdp=1, tensor=tensor), jax.devices()[:data * tensor])


def _logits(model, tok):
  enc = tok(PROMPTS, padding=True, return_tensors="np")
  return np.asarray(model(enc["input_ids"], enc["attention_mask"]))


@pytest.mark.parametrize("heads,kv,data,tensor", [(4, 2, 2, 4), (8, 8, 1, 8)])
def test_serving_layout_equals_the_one_device_model(model_dir, heads, kv, data, tensor):
  """tensor=4 over 2 kv heads (each kv head held twice) and tensor=8 over 8 kv heads (one each):
  logits and greedy decode equal the unsharded model's. Tolerance: fp32, where only the order of
  the tensor-parallel sums (o and down projections, psum over shards) differs."""
  path, _ = model_dir("llama", num_attention_heads=heads, num_key_value_heads=kv)
  ref, tok = load_model(path, dtype="float32")
  mesh = _mesh(data, tensor)
  model, _ = load_model(path, dtype="float32", mesh=mesh, rules=shd.SERVING)

  copies = max(1, tensor // kv)
  assert model.config.num_kv_heads == kv * copies
  k = model.model.layers.attn.k.w[...]  # stacked over layers: [L, D, K, H]
  assert k.shape[2] == kv * copies
  # every shard holds kv_heads / tensor (here one) kv head, not the whole k projection
  assert k.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
  assert k.addressable_shards[0].data.shape[2] == kv * copies // tensor
  # the copies sit next to each other: expanded head e is original head e // copies
  ref_k = np.asarray(ref.model.layers.attn.k.w[...])
  np.testing.assert_array_equal(np.asarray(k), np.repeat(ref_k, copies, axis=2))
  # weights over tensor only: the MLP is split 'tensor' ways and replicated over data
  assert model.model.layers.mlp.up.w[...].sharding.spec == jax.sharding.PartitionSpec(
      None, None, "tensor")
  # the cache splits over tensor by kv head as well
  spec = shd.logical_to_spec(CACHE_KV_AXES, (2, 8, 16, kv * copies, 8), mesh, rules=shd.SERVING)
  assert spec[0] is None  # the layers axis is never split
  assert spec[3] == "tensor" and spec[1] in ("data", ("data",), ("data", "fsdp"))

  with jax.set_mesh(mesh), shd.use_rules(shd.SERVING):
    got = _logits(model, tok)
  np.testing.assert_allclose(got, _logits(ref, tok), atol=2e-5, rtol=1e-5)

  cfg = SamplingConfig(temperature=0.0, max_new_tokens=8, batch_size=4, stop_token_ids=())
  want = [r.token_ids for r in generate(ref, tok, PROMPTS, cfg)]
  have = [r.token_ids for r in generate(model, tok, PROMPTS, cfg, mesh=mesh)]
  assert have == want


# -- the serving plan (--dry-run; architectures from the zoo, no weights) ----------------------

def _plan(path_or_yaml, tmp_path=None, num_prompts=50000):
  from persyn_jax import plan
  from persyn_jax.run_config import load_run_config
  if tmp_path is not None:
    f = tmp_path / "run.yaml"
    f.write_text(path_or_yaml)
    path_or_yaml = str(f)
  return plan.plan(load_run_config(path_or_yaml), num_prompts=num_prompts)


@pytest.mark.parametrize("config", ["configs/instruct.yaml", "configs/math.yaml"])
def test_the_paper_configs_fit_their_slices_without_gathers_in_decode(config):
  p = _plan(config)
  assert p["fits"], p["problems"]
  assert {v["name"] for v in p["serving"]} == {t["name"] for t in p["teachers"]}
  for v in p["serving"]:
    assert v["gathers_in_decode"] == 0
    assert v["weights"] + v["kv_cache"] + v["activations"] <= p["device_memory_gb"]
    assert v["rows_per_replica"] <= v["max_rows_per_replica"]


def test_the_405b_teacher_has_its_own_layout_with_kv_head_copies():
  p = _plan("configs/instruct.yaml")
  v = {v["name"]: v for v in p["serving"]}["llama3.1-405b"]
  assert v["mesh"] == {"data": 16, "fsdp": 1, "tensor": 16}
  assert v["kv_head_copies"] == 2   # 8 kv heads over tensor 16: each held by two shards
  assert v["weights"] < 95


V5E_64 = """
name: l70-v5e-64
world: null
plan: {{devices: 64, device_memory_gb: 16, prompt_tokens: 256, response_tokens: 1024}}
prompts: {{source: {{path: p.jsonl, format: jsonl}}}}
teachers:
  - {{name: llama3.1-70b, path: meta-llama/Llama-3.1-70B-Instruct{extra}}}
student: {{name: qwen2.5-0.5b, path: Qwen/Qwen2.5-0.5B}}
sampling: {{max_new_tokens: 2048, batch_size: 64, max_prompt_len: 1024, mesh: {mesh}}}
sft: {{batch_size: 64}}  # one row per chip of the run's mesh (1x64x1)
"""


def test_a_70b_teacher_on_v5e_64_needs_int8_at_tensor_8(tmp_path):
  """Llama-3.1-70B (141 GB in bf16) on 16 GB chips split 8 ways: 17.6 GB of weights per chip do
  not fit, and the plan says so by name instead of gathering weights in decode; in int8 they
  take about 9 GB and the plan fits, with room for more rows."""
  mesh = "{data: 8, fsdp: 1, tensor: 8}"
  p = _plan(V5E_64.format(extra="", mesh=mesh), tmp_path)
  assert not p["fits"]
  assert any("teacher llama3.1-70b" in e and "quantize: int8" in e and "tensor=8" in e
             for e in p["problems"]), p["problems"]
  q = _plan(V5E_64.format(extra=", quantize: int8", mesh=mesh), tmp_path)
  assert q["fits"], q["problems"]
  v = q["serving"][0]
  assert v["quantize"] == "int8" and v["kv_head_copies"] == 1 and 8 < v["weights"] < 10
  assert v["rows_per_replica"] == 8 and v["max_rows_per_replica"] > 8


def test_a_70b_teacher_on_v5e_64_at_tensor_16_copies_its_kv_heads(tmp_path):
  """tensor 16 over 8 kv heads: two copies of each (not a replicated cache), bf16 fits."""
  p = _plan(V5E_64.format(extra="", mesh="{data: 4, fsdp: 1, tensor: 16}"), tmp_path)
  assert p["fits"], p["problems"]
  v = p["serving"][0]
  assert v["kv_head_copies"] == 2 and v["weights"] < 9.5


def test_fsdp_does_not_split_serving_weights_and_the_plan_says_so(tmp_path):
  p = _plan(V5E_64.format(extra="", mesh="{data: 1, fsdp: 16, tensor: 4}"), tmp_path)
  assert not p["fits"]
  msg = " ".join(p["problems"])
  assert "gather weights inside decode" in msg and "; fsdp=16 adds replicas" in msg
  assert "fits with `mesh: {data: 4, fsdp: 1, tensor: 16}`" in msg


def test_a_tensor_size_that_splits_no_head_layout_is_refused_by_teacher(tmp_path):
  p = _plan(V5E_64.format(extra="", mesh="{data: 2, fsdp: 1, tensor: 32}").replace(
      "meta-llama/Llama-3.1-70B-Instruct", "Qwen/Qwen2.5-7B-Instruct"), tmp_path)
  assert not p["fits"]
  assert any(e.startswith("teacher llama3.1-70b (Qwen/Qwen2.5-7B-Instruct): 28 query heads do "
                          "not split over tensor=32") for e in p["problems"]), p["problems"]


@pytest.mark.parametrize("data,fsdp", [(2, 1), (1, 2)])
def test_a_decode_step_on_the_serving_layout_gathers_nothing(model_dir, data, fsdp):
  """One cached decode step (the sampler's: hidden states of one token, then the logits),
  compiled on tensor 4 with kv-head copies, rows over data (or fsdp, which under SERVING only
  adds replicas): the program has no all-gather at all, of weights or anything else."""
  from flax import nnx
  from persyn_jax.models import init_cache
  import jax.numpy as jnp
  path, _ = model_dir("llama")
  mesh = shd.make_mesh(shd.MeshConfig(data=data, fsdp=fsdp, tensor=4), jax.devices()[:8])
  model, _ = load_model(path, dtype="float32", mesh=mesh, rules=shd.SERVING, tokenizer=False)
  graphdef, state = nnx.split(model)
  B = 4

  def step(state, ids, cache):
    m = nnx.merge(graphdef, state)
    layers = {k: shd.constrain(v, CACHE_KV_AXES) for k, v in cache["layers"].items()}
    h, cache = m.hidden_states(ids, segment_ids=jnp.ones_like(ids), positions=jnp.zeros_like(ids),
                               cache={**cache, "layers": layers})
    return m.logits(h[:, 0]), cache

  with jax.set_mesh(mesh), shd.use_rules(shd.SERVING):
    cache = init_cache(model.config, B, 16, jnp.float32)
    ids = jax.device_put(np.ones((B, 1), np.int32), shd.batch_sharding(mesh, (B, 1)))
    hlo = jax.jit(step).lower(state, ids, cache).compile().as_text()
  assert "all-reduce" in hlo          # the tensor-parallel sums are there: the program is split
  assert "all-gather" not in hlo


@pytest.mark.parametrize("arch,tensor,quantize", [
    ("qwen2", 4, ""), ("qwen2", 4, "int8"), ("gemma2", 4, ""), ("qwen3", 2, "int8"),
    ("llama_bias", 4, "")])
def test_the_planned_serving_weights_are_the_loaded_models_bytes(model_dir, arch, tensor,
                                                                 quantize):
  """The plan's weights per device equal the bytes a device holds once the teacher is loaded
  (kv heads copied, int8 scales), biases (Qwen2 q/k/v, Llama's attention and MLP), Gemma 2's
  post norms and Qwen3's q/k norms included."""
  from flax import nnx
  from persyn_jax import plan, zoo
  from persyn_jax.run_config import ModelRef
  path, _ = model_dir(arch)
  mesh = shd.make_mesh(shd.MeshConfig(data=8 // tensor, fsdp=1, tensor=tensor), jax.devices()[:8])
  model, _ = load_model(path, dtype="bfloat16", mesh=mesh, rules=shd.SERVING, tokenizer=False,
                        quantize=quantize or None)
  dev = jax.devices()[0]
  held = sum(s.data.nbytes for leaf in jax.tree.leaves(nnx.state(model))
             for s in leaf.addressable_shards if s.device == dev)
  ref = ModelRef(name="t", path=path, quantize=quantize)
  sp, bad = plan.serving_plan(zoo.architecture(path), ref, SamplingConfig(),
                              {"data": 8 // tensor, "fsdp": 1, "tensor": tensor}, 0)
  assert not bad and sp["weights"] == held


# -- the training-layout stages of the plan (SFT, score, router) --------------------------------

def _stage(p, stage, model=None):
  return next(r for r in p["memory_per_device"] if r["stage"] == stage
              and (model is None or r["model"] == model))


def test_training_weights_split_only_where_the_mesh_divides_them():
  """Qwen2.5-0.5B on 4x16x4: its 14 query and 2 kv heads do not split over tensor 4, so q/k/v/o
  (and their biases) split over fsdp alone; norms are whole on every chip (hand count, fp32)."""
  from persyn_jax import plan
  D, L, N, K, H, F, V = 896, 24, 14, 2, 64, 4864, 151936
  layer = (2 * D * N * H + 2 * D * K * H) / 16 + 3 * D * F / 64 + 2 * D + N * H + 2 * K * H
  n = V * D / 64 + L * layer + D  # tied embedding over vocab x embed = 64
  p = _plan("configs/instruct.yaml")
  sft = _stage(p, "sft")
  assert sft["mesh"] == {"data": 4, "fsdp": 16, "tensor": 4}
  assert sft["params"] == sft["grads"] == round(n * 4 / plan.GB, 3)
  assert sft["optimizer"] == round(2 * n * 4 / plan.GB, 3)   # AdamW's mu and nu, fp32
  assert _stage(p, "score", "qwen2.5-0.5b")["params"] == round(n * 2 / plan.GB, 3)  # bf16


SFT_ROWS = """
name: sft-rows
world: null
mesh: {mesh}
plan: {{devices: 256, device_memory_gb: 95}}
prompts: {{source: {{path: p.jsonl, format: jsonl}}}}
teachers:
  - {{name: a, path: Qwen/Qwen2.5-1.5B-Instruct}}
  - {{name: b, path: Qwen/Qwen2.5-7B-Instruct}}
student: {{name: s, path: Qwen/Qwen2.5-1.5B}}
sampling: {{mesh: {{data: 64, fsdp: 1, tensor: 4}}}}
sft: {{batch_size: 64, seq_len: 8192, loss_chunk: 1024}}
"""


@pytest.mark.parametrize("mesh,rows", [("{data: 8, fsdp: 16, tensor: 2}", 8),
                                       ("{data: 4, fsdp: 16, tensor: 4}", 1)])
def test_sft_rows_per_device_are_those_the_mesh_splits(tmp_path, mesh, rows):
  """SFT pads no rows: 64 rows over data 8 x fsdp 16 split over data alone (fsdp does not divide
  them), so each chip holds 8 rows, not half of one; over data 4 x fsdp 16 one each."""
  from persyn_jax import plan
  D, L, F, V, T = 1536, 28, 8960, 151936, 8192
  act = rows * T * L * (10 * D + 3 * F) * 2 + rows * 1024 * V * 4
  sft = _stage(_plan(SFT_ROWS.format(mesh=mesh), tmp_path), "sft")
  assert sft["rows_per_device"] == rows
  assert sft["activations"] == round(act / plan.GB, 3)


def test_router_rows_are_padded_and_the_reward_model_has_no_lm_head():
  """The router pads its 16 rows to the 64 batch shards (one row per chip, not a quarter); the
  reward model holds a [D, 1] score head, not a [D, V] LM head (Llama-3.1-8B, bf16, 4x16x4)."""
  from persyn_jax import plan
  p = _plan("configs/instruct.yaml")
  router = _stage(p, "router")
  assert router["rows_per_device"] == 1
  assert router["activations"] == round(1 * 1024 * 28 * 12 * 1536 * 2 / plan.GB, 3)
  D, L, N, K, H, F, V = 4096, 32, 32, 8, 128, 14336, 128256
  n = V * D / 64 + L * ((2 * D * N * H + 2 * D * K * H + 3 * D * F) / 64 + 2 * D) + D + D / 16
  assert _stage(p, "score", "reward_model")["params"] == round(n * 2 / plan.GB, 3)


def test_the_70b_weights_docs_int8_md_quotes(tmp_path):
  """docs/INT8.md: Llama-3.1-70B's weights take 141.1 GB in bf16 and 72.7 GB in int8 (the plan's
  figures on one tensor shard, in GiB: 131.4 and 67.7)."""
  import os
  mesh = "{data: 64, fsdp: 1, tensor: 1}"
  gb = lambda extra: _plan(V5E_64.format(extra=extra, mesh=mesh), tmp_path)["serving"][0][
      "weights"] * 2**30 / 1e9
  assert (round(gb(""), 1), round(gb(", quantize: int8"), 1)) == (141.1, 72.7)
  assert round(gb("") * 1e9 / 2**30, 1) == 131.4  # what --dry-run shows (GB of 2^30 bytes)
  assert round(gb(", quantize: int8") * 1e9 / 2**30, 1) == 67.7
  with open(os.path.join(os.path.dirname(__file__), "..", "docs", "INT8.md")) as f:
    doc = " ".join(f.read().split())
  assert "from 141.1 GB in bf16 to 72.7 GB" in doc and "shows 131.4 and 67.7" in doc
