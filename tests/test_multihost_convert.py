"""persyn_jax.convert: HF directory -> orbax checkpoint laid out for a mesh, and back.

In-process (8 fake CPU devices, conftest); tests/test_multihost.py restores one on several
processes. The reference for every weight is `models.from_pretrained` of the same HF directory,
itself checked against transformers in test_models.py.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from persyn_jax import convert, models
from persyn_jax import sharding as shd
from persyn_jax.models import CheckpointError, from_pretrained


def params(model) -> dict:
  return {k: np.asarray(jax.device_get(v.get_value()))
          for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory):
  """A tiny Qwen3 (kv heads, qk norm, untied head) converted for data=1, fsdp=4, tensor=2."""
  path, _ = model_dir("qwen3")
  out = str(tmp_path_factory.mktemp("orbax") / "qwen3")
  meta = convert.convert(path, out, shd.MeshConfig(data=1, fsdp=4, tensor=2), dtype="float32")
  return path, out, meta


def test_restores_the_same_weights_on_any_mesh(converted):
  path, out, _ = converted
  ref, _ = from_pretrained(path, dtype="float32")
  want = params(ref)
  for mc in (shd.MeshConfig(1, 4, 2), shd.MeshConfig(2, 2, 2), shd.MeshConfig(1, 1, 1)):
    mesh = shd.make_mesh(mc, jax.devices()[:mc.data * mc.fsdp * mc.tensor])
    model, tok = models.from_orbax(out, dtype="float32", mesh=mesh)
    got = params(model)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    # every parameter lands on the mesh it was asked for, with the logical-axis sharding
    for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      assert v.get_value().sharding == shd.variable_sharding(v, mesh), k
  assert tok is not None and tok("1 + 2")["input_ids"]


def test_chunks_are_the_shards_of_the_target_mesh(converted):
  """Orbax stores every shard as whole chunks (a shard held by several devices is split between
  them, to write in parallel): a host restoring on this mesh reads no byte outside its shards."""
  _, out, meta = converted
  assert meta["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  tree = ocp.StandardCheckpointer().metadata(os.path.join(out, "params")).item_metadata.tree
  mesh = shd.make_mesh(shd.MeshConfig(1, 4, 2), jax.devices()[:8])
  abstract, _ = models.from_orbax(out, dtype="float32", mesh=mesh, tokenizer=False)
  flat = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  sharded = 0
  for path, var in flat.items():
    node = tree
    for p in path:
      node = node[p] if isinstance(node, (list, tuple)) or p in node else node[str(p)]
    shard = var.get_value().sharding.shard_shape(var.get_value().shape)
    chunk = tuple(node.storage.chunk_shape)
    assert len(chunk) == len(shard) and all(s % c == 0 for s, c in zip(shard, chunk)), (path, chunk)
    sharded += shard != var.get_value().shape
  assert sharded >= 4  # embeddings, attention and MLP weights are split, not only norms


def test_dtype_is_cast_while_restoring(model_dir, tmp_path):
  path, _ = model_dir("llama")
  out = str(tmp_path / "bf16")
  meta = convert.convert(path, out, shd.MeshConfig(1, 2, 1), dtype="bfloat16")
  assert meta["dtype"] == "bfloat16"
  model, _ = models.from_orbax(out, dtype="float32", tokenizer=False)
  ref, _ = from_pretrained(path, dtype="bfloat16", tokenizer=False)
  got, want = params(model), params(ref)
  for k in want:
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], want[k].astype(np.float32))


def test_load_model_takes_either_format_and_gives_the_same_logits(converted):
  path, out, _ = converted
  mesh = shd.make_mesh(shd.MeshConfig(1, 4, 2), jax.devices()[:8])
  a, tok = models.load_model(path, dtype="float32", mesh=mesh)
  b, _ = models.load_model(out, dtype="float32", mesh=mesh)
  assert a.config == b.config
  ids = np.asarray([tok("12 + 30 = 42")["input_ids"]] * 4, np.int32)
  with jax.set_mesh(mesh):
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))


def test_cli_and_errors(model_dir, tmp_path, capsys):
  path, _ = model_dir("qwen3")
  out = str(tmp_path / "cli")
  assert convert.main([path, out, "--mesh", "fsdp=2,tensor=2"]) == 0
  meta = json.load(open(os.path.join(out, models.MARKER)))
  assert meta["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2} and meta["dtype"] == "float32"
  assert os.path.exists(os.path.join(out, "config.json"))
  assert not any(n.endswith(".safetensors") for n in os.listdir(out))
  assert convert.main([path, out, "--mesh", "fsdp=2,pipeline=2"]) == 2
  assert "AXIS=SIZE" in capsys.readouterr().err
  assert convert.main([path, out, "--mesh", "fsdp=64"]) == 2
  assert "needs 64 devices" in capsys.readouterr().err
  for bad in ("fsdp=-2", "data=0,fsdp=2"):  # refused before the size could reach XLA_FLAGS
    with pytest.raises(ValueError, match="sizes are positive"):
      convert.mesh_size(convert.parse_mesh(bad))
    assert convert.main([path, out, "--mesh", bad]) == 2
    assert "sizes are positive" in capsys.readouterr().err
  with pytest.raises(CheckpointError, match="not a persyn_jax.convert output"):
    models.from_orbax(path)
  import shutil
  src = str(tmp_path / "src" / "model")
  shutil.copytree(path, src)
  for target in (src, os.path.dirname(src)):  # would delete the HF weights: refused
    assert convert.main([src, target, "--mesh", "fsdp=2"]) == 2
    assert "would replace the model directory" in capsys.readouterr().err
  assert any(n.endswith(".safetensors") for n in os.listdir(src))
  other, _ = model_dir("llama")  # orbax weights of one model under the config of another
  bad = str(tmp_path / "mismatch")
  convert.convert(path, bad, shd.MeshConfig(1, 2, 1))
  with open(os.path.join(other, "config.json")) as f:
    cfg = f.read()
  with open(os.path.join(bad, "config.json"), "w") as f:
    f.write(cfg)
  with pytest.raises(CheckpointError, match="does not match"):
    models.from_orbax(bad, tokenizer=False)


def test_a_damaged_output_is_named_as_damaged(converted, tmp_path):
  """Junk in persyn_orbax.json or in params/ is a CheckpointError naming the damaged file, not a
  raw JSONDecodeError nor a 'does not match the model' (the config was never the problem)."""
  import shutil
  _, out, _ = converted
  for junk in ("{cut", "", "[1]"):
    d = str(tmp_path / "marker")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(out, d)
    with open(os.path.join(d, models.MARKER), "w") as f:
      f.write(junk)
    with pytest.raises(CheckpointError, match=rf"{d}/{models.MARKER}: .*convert again"):
      models.from_orbax(d, tokenizer=False)
  d = str(tmp_path / "params")
  shutil.copytree(out, d)
  manifest = os.path.join(d, "params", "manifest.ocdbt")
  os.truncate(manifest, os.path.getsize(manifest) // 2)
  with pytest.raises(CheckpointError, match="not a readable orbax checkpoint, damaged") as e:
    models.from_orbax(d, dtype="float32", tokenizer=False)
  assert "does not match" not in str(e.value)


def test_a_head_loaded_untied_stays_untied_in_the_checkpoint(model_dir, tmp_path):
  """A tied config whose weights hold an lm_head.weight of other values loads untied, as
  transformers loads it (test_models.py); the checkpoint's config.json says so, so from_orbax
  builds the same model."""
  import shutil

  import torch
  from safetensors.torch import load_file, save_file
  path = str(tmp_path / "m")
  shutil.copytree(model_dir("qwen2")[0], path)  # tie_word_embeddings=true
  weights = os.path.join(path, "model.safetensors")
  sd = load_file(weights)
  sd["lm_head.weight"] = torch.randn(sd["model.embed_tokens.weight"].shape,
                                     generator=torch.Generator().manual_seed(3)) * 0.15
  save_file(sd, weights)
  out = str(tmp_path / "orbax")
  convert.convert(path, out, shd.MeshConfig(1, 1, 1), dtype="float32")
  a, tok = from_pretrained(path, dtype="float32")
  b, _ = models.from_orbax(out, dtype="float32")
  assert not a.config.tie_embeddings and a.config == b.config
  ids = np.asarray([tok("12 + 30 = 42")["input_ids"]] * 2, np.int32)
  np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
