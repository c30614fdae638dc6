"""Scanned layers: one stacked decoder block run by lax.scan, so the traced program does not grow
with depth; per-layer differences are scanned data; named remat policies for the block body.
(Equality with transformers for every architecture is in test_models.py and test_sampler.py.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.models import build_model, init_cache
from persyn_jax.models.config import ModelConfig, RopeConfig
from persyn_jax.models.layers import REMAT_POLICIES, layer_data, rope_inv_freq, token_einsum
from persyn_jax.models.transformer import set_remat, set_unroll


def _cfg(layers: int, **kw) -> ModelConfig:
  base = dict(model_type="llama", vocab_size=61, hidden_size=16, intermediate_size=32,
              num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=4, pad_token_id=0)
  base.update(kw)
  return ModelConfig(**base)


def _eqns(jaxpr) -> int:
  """Equations in a jaxpr, counting those of every nested jaxpr (scan, cond, while bodies)."""
  n = 0
  for e in jaxpr.eqns:
    n += 1
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          n += _eqns(inner)
  return n


def _scans(jaxpr) -> list[int]:
  out = []
  for e in jaxpr.eqns:
    if e.primitive.name == "scan":
      out.append(e.params["length"])
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          out += _scans(inner)
  return out


def _decode_step_jaxpr(layers: int):
  model = build_model(_cfg(layers), dtype="float32", seed=0)
  graphdef, state = nnx.split(model)
  cache = init_cache(model.config, 2, 8, jnp.float32)

  def step(state, ids, cache):
    m = nnx.merge(graphdef, state)
    h, cache = m.hidden_states(ids, segment_ids=jnp.ones_like(ids), positions=jnp.zeros_like(ids),
                               cache=cache)
    return m.logits(h[:, 0]), cache

  return jax.make_jaxpr(step)(state, jnp.ones((2, 1), jnp.int32), cache).jaxpr


def test_a_decode_step_holds_one_block_body_whatever_the_depth():
  """The traced decode step of a 2-layer and a 32-layer model have the same number of
  equations: one scan over the layers (length = depth) around one block body. Tracing and
  compiling thus cost the same at any depth (the measured figure: bench/compile_depth.py)."""
  two, deep = _decode_step_jaxpr(2), _decode_step_jaxpr(32)
  assert _scans(two) == [2] and _scans(deep) == [32]
  assert _eqns(two) == _eqns(deep)


def test_block_parameters_and_the_cache_are_stacked_on_an_unsplit_layers_axis():
  model = build_model(_cfg(3), dtype="float32", seed=0)
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  for path, var in nnx.to_flat_state(nnx.state(model.model.layers, nnx.Param)):
    assert var.logical_axes[0] == "layers" and var.get_value().shape[0] == 3, path
    for rules in (shd.TRAINING, shd.SERVING):
      spec = shd.logical_to_spec(var.logical_axes, var.get_value().shape, mesh, rules=rules)
      assert spec[0] is None, (path, spec)
  cache = init_cache(model.config, 2, 8, jnp.float32)
  assert cache["layers"]["k"].shape == (3, 2, 8, 2, 4)


def test_gemma_layers_differ_by_scanned_window_and_rope_data():
  """Gemma 3's pattern (sliding, sliding, global) with a local RoPE theta: per-layer windows
  (0 = global) and inverse frequencies are arrays the scan indexes, equal to each layer's own
  rule."""
  cfg = _cfg(3, model_type="gemma3_text", sliding_window=4, sliding_layers=(True, True, False),
             rope=RopeConfig(theta=10000.0, rope_type="linear", factor=2.0),
             rope_local=RopeConfig(theta=1000.0))
  data = layer_data(cfg)
  assert data["window"].tolist() == [4, 4, 0]
  np.testing.assert_array_equal(data["inv_freq"][0], rope_inv_freq(cfg.rope_local, 4))
  np.testing.assert_array_equal(data["inv_freq"][1], rope_inv_freq(cfg.rope_local, 4))
  np.testing.assert_array_equal(data["inv_freq"][2], rope_inv_freq(cfg.rope, 4))


@pytest.mark.parametrize("policy", sorted(set(REMAT_POLICIES) - {"none"}) + ["unrolled"])
def test_remat_policies_change_no_loss_nor_gradient(policy):
  """Rematerialization recomputes the block body in the backward pass instead of storing it:
  the loss and every gradient equal those without it. So does the unrolled layer loop."""
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 61, (2, 7)), jnp.int32)

  def loss_and_grads(remat):
    model = build_model(_cfg(3), dtype="float32", seed=1)
    model = set_unroll(model, True) if remat == "unrolled" else set_remat(model, remat)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
      logits = nnx.merge(graphdef, params)(ids)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

    return jax.value_and_grad(loss)(params)

  (ref, ref_g), (got, got_g) = loss_and_grads("none"), loss_and_grads(policy)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_an_unrolled_model_compiles_without_a_layer_loop():
  ids = jnp.ones((1, 3), jnp.int32)
  hlo = {}
  for unroll in (False, True):
    graphdef, state = nnx.split(set_unroll(build_model(_cfg(3), dtype="float32", seed=0), unroll))
    fn = jax.jit(lambda state, i: nnx.merge(graphdef, state)(i))
    hlo[unroll] = fn.lower(state, ids).compile().as_text()
  assert " while(" in hlo[False] and " while(" not in hlo[True]


@pytest.mark.parametrize("eqn,xs,ws", [("BTD,DNH->BTNH", (2, 5, 6), (6, 3, 4)),
                                       ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 6)),
                                       ("BTF,FD->BTD", (2, 5, 7), (7, 6)),
                                       ("BD,DL->BL", (2, 6), (6, 3))])
def test_token_einsum_is_einsum_in_value_and_gradient(eqn, xs, ws):
  rng = np.random.default_rng(0)
  x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (xs, ws))
  f = lambda fn: jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(fn(eqn, x, w))), (0, 1))(x, w)
  (v1, g1), (v2, g2) = f(token_einsum), f(jnp.einsum)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(g1, g2):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_unknown_remat_policy_is_refused_by_name():
  model = build_model(_cfg(2), dtype="float32", seed=0)
  with pytest.raises(ValueError, match="remat='most'"):
    set_remat(model, "most")
