"""The device runtime: the runner's compile cache, the sharding rule sets, the bucket planner's two
orders, and the chunked log-prob that SFT and scoring share (against numpy)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persyn_jax import models
from persyn_jax import sharding as shd
from persyn_jax.models import ModelConfig, build_model
from persyn_jax.runtime.buckets import bucket_lengths, plan_batches
from persyn_jax.runtime.runner import Runner
from persyn_jax.sampling import engine
from persyn_jax.scoring import response_logprobs
from persyn_jax.sft.loss import chunked_nll

CFG = ModelConfig("llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def model():
  return build_model(CFG, dtype="float32", seed=3)


# ---------------------------------------------------------------------------------------------
# the runner's compile cache

TRACED = []


def row_sums(model, x, *, scale):
  """A model-dependent function of one [B, T] batch; records each trace."""
  TRACED.append(x.shape)
  return scale * model.logits(model.hidden_states(x)[0]).sum(-1)


def test_one_trace_per_shape_reused_across_calls_and_runners(model):
  TRACED.clear()
  ids = (np.arange(8 * 6).reshape(8, 6) % CFG.vocab_size).astype(np.int32)
  first = Runner(model, rules=shd.TRAINING)
  fn = first.jit(row_sums, static={"scale": 2.0})
  a = fn(first.put(ids))
  fn(first.put(ids))
  # a new runner over the same model graph (a new scorer, a new generate call) reuses the code
  second = Runner(model, rules=shd.TRAINING)
  b = second.jit(row_sums, static={"scale": 2.0})(second.put(ids))
  assert TRACED == [(8, 6)]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fn(first.put(ids[:, :4]))  # a new shape: traced once more
  assert TRACED == [(8, 6), (8, 4)]
  first.jit(row_sums, static={"scale": 3.0})(first.put(ids))  # new static constants
  assert len(TRACED) == 3


def test_other_rule_set_or_mesh_compiles_again(model):
  TRACED.clear()
  ids = (np.arange(8 * 5).reshape(8, 5) % CFG.vocab_size).astype(np.int32)
  on_two = shd.shard_model(build_model(CFG, dtype="float32", seed=3),
                           shd.make_mesh(shd.MeshConfig(1, 2, 1), jax.devices()[:2]))
  outs = []
  for m, rules in ((model, shd.TRAINING), (model, shd.SERVING), (on_two, shd.TRAINING)):
    runner = Runner(m, rules=rules)
    outs.append(np.asarray(runner.jit(row_sums, static={"scale": 1.0})(runner.put(ids))))
  assert TRACED == [(8, 5)] * 3
  for o in outs[1:]:
    np.testing.assert_allclose(o, outs[0], rtol=1e-6, atol=1e-6)


def test_runner_defaults_to_the_models_mesh_and_shards_batches(model):
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  sharded = build_model(CFG, dtype="float32", seed=3)
  shd.shard_model(sharded, mesh)
  runner = Runner(sharded)
  assert runner.mesh == mesh and runner.shards == 4 and runner.rules == shd.TRAINING
  assert runner.put(np.zeros((8, 3), np.int32)).sharding.spec == shd.P(("data", "fsdp"), None)
  assert Runner(model).mesh.devices.size == 1  # unsharded arrays: the single-device mesh


def test_sampler_engine_serves_and_consumes_its_kv_cache(model):
  st = engine.Static(max_new_tokens=3, temperature=0.0, top_k=0, top_p=1.0, cache_dtype="float32",
                     pad_id=0)
  eng = engine.Engine(model, st)
  assert eng.runner.rules == shd.SERVING
  ids, mask = np.ones((2, 8), np.int32), np.ones((2, 8), np.int32)
  cache, logits = eng.run_prefill(ids, mask)
  out = eng.run_decode(cache, logits, mask, 0, np.arange(2), np.zeros(2), ())
  jax.block_until_ready(out)
  # donated: the decode loop updated the cache's buffers in place instead of copying them
  assert all(x.is_deleted() for x in jax.tree.leaves(cache["layers"]))
  assert np.asarray(out[1]).tolist() == [3, 3]


# ---------------------------------------------------------------------------------------------
# rule sets

def specs(model, mesh, rules):
  shardings = shd.state_shardings(nnx.state(model, nnx.Param), mesh, rules=rules)
  return [s.spec for s in jax.tree.leaves(shardings)]


def test_serving_splits_weights_over_tensor_only(model):
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  serving = specs(model, mesh, shd.SERVING)
  assert not any("fsdp" in str(s) for s in serving)
  assert any("tensor" in str(s) for s in serving)
  assert any("fsdp" in str(s) for s in specs(model, mesh, shd.TRAINING))  # the check can fail
  # batches: over data x fsdp in both
  for rules in (shd.TRAINING, shd.SERVING):
    assert shd.batch_sharding(mesh, (8, 3), rules=rules).spec == shd.P(("data", "fsdp"), None)


def test_active_rule_set_is_scoped():
  mesh = shd.make_mesh(shd.MeshConfig(1, 4, 2))
  assert shd.active_rules() is shd.TRAINING
  assert shd.logical_to_spec(("embed", "mlp"), (32, 64), mesh) == shd.P("fsdp", "tensor")
  with shd.use_rules(shd.SERVING):
    assert shd.logical_to_spec(("embed", "mlp"), (32, 64), mesh) == shd.P(None, "tensor")
    assert shd.logical_to_spec(("embed",), (32,), mesh, rules=shd.TRAINING) == shd.P("fsdp")
  assert shd.active_rules() is shd.TRAINING
  with pytest.raises(KeyError, match="no sharding rule in rule set 'serving'"):
    shd.logical_to_spec(("nope",), (2,), mesh, rules=shd.SERVING)
  with pytest.raises(ValueError, match="mesh axes are"):
    shd.TRAINING.replace("bad", embed=("pipeline",))


def test_load_model_places_parameters_by_rule_set(model_dir):
  path, _ = model_dir("llama")
  mesh = shd.make_mesh(shd.MeshConfig(1, 4, 2))
  served, _ = models.load_model(path, dtype="float32", mesh=mesh, rules=shd.SERVING,
                                tokenizer=False)
  trained, _ = models.load_model(path, dtype="float32", mesh=mesh, tokenizer=False)
  leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
  assert not any("fsdp" in str(x.sharding.spec) for x in leaves(served))
  assert any("fsdp" in str(x.sharding.spec) for x in leaves(trained))
  for a, b in zip(leaves(served), leaves(trained)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# the bucket planner

LENGTHS = [30, 5, 70, 6, 31, 4, 64, 7]  # buckets 8 / 16 / 32 / 48 / 64 / 96


def test_planner_length_order_sorts_within_a_bucket():
  plan = plan_batches(LENGTHS, bucket_lengths(96, 8), batch_tokens=64, max_batch_size=8)
  got = [(b.indices.tolist(), b.rows, b.length) for b in plan]
  # a full batch has 64 // length rows (at least 1); a tail of n rows the next power of two of n
  assert got == [([5, 1, 3, 7], 4, 8), ([0, 4], 2, 32), ([6], 1, 64), ([2], 1, 96)]


def test_planner_input_order_keeps_a_buckets_rows_in_order():
  plan = plan_batches(LENGTHS, bucket_lengths(96, 8), batch_size=3, order="input")
  got = [(b.indices.tolist(), b.rows, b.length) for b in plan]
  assert got == [([1, 3, 5], 3, 8), ([7], 1, 8), ([0, 4], 2, 32), ([6], 1, 64), ([2], 1, 96)]


def test_planner_tails_on_three_batch_shards():
  # batch_size: a 5-row tail is 8 rows rounded up to a multiple of 3; batch_tokens: 3 shards x
  # the next power of two of 2 rows per shard
  by_rows = plan_batches([4] * 5, [8], batch_size=12, multiple=3)
  by_tokens = plan_batches([4] * 5, [8], batch_tokens=96, max_batch_size=12, multiple=3)
  assert [b.rows for b in by_rows] == [9] and [b.rows for b in by_tokens] == [6]


def test_sampler_buckets_round_half_steps_up():
  assert bucket_lengths(100, 5) == [5, 7, 10, 15, 20, 30, 40, 60, 80, 100]
  assert bucket_lengths(100, 5, round_up=True) == [5, 8, 10, 15, 20, 30, 40, 60, 80, 100]


# ---------------------------------------------------------------------------------------------
# the chunked log-prob

def numpy_logprobs(model, ids):
  """log p(ids[t+1] | ids[:t+1]) from the model's full fp32 logits, log-softmax in float64."""
  logits = np.asarray(model(jnp.asarray(ids)), np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]


def test_sft_and_scoring_logprobs_equal_numpy(model):
  rng = np.random.default_rng(0)
  B, T = 3, 13  # 13 tokens: chunks of 4 leave a padded last chunk
  ids = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
  mask = (rng.random((B, T)) < 0.6).astype(np.float32)
  mask[:, -1] = 0  # no target after the last token
  targets = np.zeros_like(ids)
  targets[:, :-1] = ids[:, 1:]
  ref = numpy_logprobs(model, ids)  # [B, T - 1]
  ref_sums = (ref * mask[:, :-1]).sum(-1)

  hidden, _ = model.hidden_states(jnp.asarray(ids))
  nll, _ = chunked_nll(model.logits, hidden, jnp.asarray(targets), 4)
  sft = -np.asarray(nll)[:, :-1]
  batch = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.ones((B, T), jnp.int32),
           "targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask)}
  sums, counts = response_logprobs(model, batch, 4)
  # fp32 logits of a 2-layer model: log-probs near -4.6 agree to ~1e-6 relative
  np.testing.assert_allclose(sft, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(sums), ref_sums, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(counts), mask.sum(-1))
  # the two consumers share one computation: the same fp32 values, summed differently
  np.testing.assert_allclose(np.asarray(sums), (sft * mask[:, :-1]).sum(-1), rtol=1e-6, atol=1e-6)
  whole, _ = chunked_nll(model.logits, hidden, jnp.asarray(targets), T)  # one chunk
  np.testing.assert_allclose(np.asarray(whole), np.asarray(nll), rtol=1e-6, atol=1e-6)
