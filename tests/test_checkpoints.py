"""persyn_jax.checkpoints: parameter trees and train states round-trip through orbax, sharded, onto
the mesh the reader asks for; a checkpoint of another layout is refused by name."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from persyn_jax import sharding as shd
from persyn_jax.checkpoints import CheckpointManager, abstract, restore_tree, save_tree
from persyn_jax.training import TrainState, state_shapes


def mesh8():
  return shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))


def tree_of(rng):
  return {"embed": rng.normal(size=(16, 8)).astype(np.float32),
          "layers": {"w": rng.normal(size=(8, 4)).astype(np.float32),
                     "scale": rng.normal(size=(4,)).astype(np.float32)}}


def shardings(mesh, tree):
  """Matrices over (fsdp, tensor), vectors replicated."""
  return jax.tree.map(lambda x: NamedSharding(mesh, P("fsdp", "tensor") if x.ndim == 2 else P()),
                      tree)


def test_a_sharded_tree_round_trips_onto_any_mesh(tmp_path):
  ref = tree_of(np.random.default_rng(0))
  mesh = mesh8()
  tree = jax.tree.map(jax.device_put, ref, shardings(mesh, ref))
  assert len(tree["embed"].sharding.device_set) == 8
  save_tree(str(tmp_path / "params"), tree)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ref)
  # the same layout
  back = restore_tree(str(tmp_path / "params"), abstract(shapes, shardings(mesh, ref)))
  assert back["embed"].sharding == tree["embed"].sharding
  # another mesh (one device) and a cast while reading
  one = shd.single_device_mesh()
  cast = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), shapes)
  small = restore_tree(str(tmp_path / "params"), abstract(cast, shardings(one, ref)))
  for a, b, c in zip(jax.tree.leaves(ref), jax.tree.leaves(back), jax.tree.leaves(small)):
    np.testing.assert_array_equal(np.asarray(b), a)
    assert c.dtype == jnp.bfloat16 and len(c.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(c), np.asarray(jnp.asarray(a, jnp.bfloat16)))
  # save_tree replaces what was there
  save_tree(str(tmp_path / "params"), jax.tree.map(lambda x: x + 1, tree))
  again = restore_tree(str(tmp_path / "params"), abstract(shapes, shardings(mesh, ref)))
  np.testing.assert_array_equal(np.asarray(again["layers"]["w"]), ref["layers"]["w"] + 1)
  with pytest.raises(FileNotFoundError, match="no saved tree"):
    restore_tree(str(tmp_path / "missing"), shapes)


def train_state(mesh, tx, seed):
  params = tree_of(np.random.default_rng(seed))
  params = jax.tree.map(jax.device_put, params, shardings(mesh, params))
  # take one step, so that Adam's moments and count are not their zero initial values
  state = TrainState.create(params, tx)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt = tx.update(grads, state.opt_state, params)
  return TrainState(state.step + 1, optax.apply_updates(params, updates), opt)


def target_of(state, tx, mesh):
  """The abstract TrainState of `state`'s parameters under `tx`: moments sharded like matrices
  (by rank, as `shardings` does), counters and vectors replicated."""
  shapes = state_shapes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                     state.params), tx)
  return abstract(shapes, shardings(mesh, shapes))


def test_a_train_state_round_trips_with_its_meta_and_keeps_the_newest(tmp_path):
  mesh, tx = mesh8(), optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  state = train_state(mesh, tx, 1)
  target = target_of(state, tx, mesh)
  ckpts = CheckpointManager(str(tmp_path / "ckpt"), keep=2, async_save=True)
  for step in (1, 2, 3):
    ckpts.save(step, state, {"step": step, "position": 10 * step})
  ckpts.wait()
  assert ckpts.all_steps() == [2, 3] and ckpts.latest_step() == 3
  back, meta, step = ckpts.restore(target)
  ckpts.close()
  assert step == 3 and meta == {"step": 3, "position": 30} and isinstance(back, TrainState)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert back.params["embed"].sharding == state.params["embed"].sharding
  assert back.opt_state[1][0].mu["embed"].sharding == state.params["embed"].sharding
  with open(tmp_path / "ckpt" / "2" / "meta" / "metadata") as f:
    assert json.load(f)["position"] == 20
  # an older step on request; a plain {"step", "params", "opt_state"} dict reads it too
  ckpts = CheckpointManager(str(tmp_path / "ckpt"), keep=2)
  as_dict = {"step": target.step, "params": target.params, "opt_state": target.opt_state}
  old, meta, step = ckpts.restore(as_dict, step=2)
  assert step == 2 and meta["position"] == 20 and set(old) == {"step", "params", "opt_state"}
  ckpts.close()


def test_a_checkpoint_of_another_layout_is_refused_with_its_directory(tmp_path):
  mesh = mesh8()
  state = train_state(mesh, optax.adamw(1e-2), 2)
  ckpts = CheckpointManager(str(tmp_path / "ckpt"), keep=1, async_save=False)
  ckpts.save(5, state, {"step": 5})
  clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))  # another optimizer
  shapes = target_of(state, clipped, mesh)
  with pytest.raises(ValueError, match=r"ckpt/5: the saved train state is laid out differently"):
    ckpts.restore(shapes)
  ckpts.close()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    CheckpointManager(str(tmp_path / "empty"), keep=1).restore(shapes)
  assert not os.path.exists(tmp_path / "empty" / "5")
