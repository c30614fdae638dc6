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
  k = model.model.layers[0].attn.k.w[...]
  assert k.shape[1] == kv * copies
  # every shard holds kv_heads / tensor (here one) kv head, not the whole k projection
  assert k.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
  assert k.addressable_shards[0].data.shape[1] == kv * copies // tensor
  # the copies sit next to each other: expanded head e is original head e // copies
  ref_k = np.asarray(ref.model.layers[0].attn.k.w[...])
  np.testing.assert_array_equal(np.asarray(k), np.repeat(ref_k, copies, axis=1))
  # weights over tensor only: the MLP is split 'tensor' ways and replicated over data
  assert model.model.layers[0].mlp.up.w[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  # the cache splits over tensor by kv head as well
  spec = shd.logical_to_spec(CACHE_KV_AXES, (8, 16, kv * copies, 8), mesh, rules=shd.SERVING)
  assert spec[2] == "tensor" and spec[0] in ("data", ("data",), ("data", "fsdp"))

  with jax.set_mesh(mesh), shd.use_rules(shd.SERVING):
    got = _logits(model, tok)
  np.testing.assert_allclose(got, _logits(ref, tok), atol=2e-5, rtol=1e-5)

  cfg = SamplingConfig(temperature=0.0, max_new_tokens=8, batch_size=4, stop_token_ids=())
  want = [r.token_ids for r in generate(ref, tok, PROMPTS, cfg)]
  have = [r.token_ids for r in generate(model, tok, PROMPTS, cfg, mesh=mesh)]
  assert have == want
