"""Mesh construction, logical-axis rules and config loading."""
import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec as P

from persyn_jax import config as C
from persyn_jax import sharding as shd


def test_mesh_rest_axis_and_errors():
  assert shd.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
  assert shd.make_mesh(shd.MeshConfig(1, -1, 1)).shape == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="do not divide the 8 devices"):
    shd.MeshConfig(data=3, fsdp=-1).shape(8)
  with pytest.raises(ValueError, match="needs 4 devices, but 8 are available"):
    shd.MeshConfig(data=2, fsdp=2, tensor=1).shape(8)


def test_logical_rules_skip_axes_that_do_not_divide():
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  assert shd.logical_to_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == P("fsdp", "tensor", None)
  # one kv head cannot be split over tensor=2: kept whole
  assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 1, 8), mesh) == P("fsdp", None, None)
  assert shd.logical_to_spec(("batch", "seq"), (8, 5), mesh) == P(("data", "fsdp"), None)
  assert shd.logical_to_spec(("batch", "seq"), (2, 5), mesh) == P("data", None)
  with pytest.raises(KeyError, match="no sharding rule"):
    shd.logical_to_spec(("nope",), (2,), mesh)


@dataclasses.dataclass(frozen=True)
class Inner:
  lr: float = 1e-3
  steps: int = 10


@dataclasses.dataclass(frozen=True)
class Outer:
  name: str = "x"
  inner: Inner = Inner()
  tags: tuple[str, ...] = ()
  mesh: shd.MeshConfig = shd.MeshConfig()


def test_yaml_and_dotted_overrides(tmp_path):
  p = tmp_path / "run.yaml"
  p.write_text("name: run1\ninner:\n  lr: 0.1\ntags: [a, b]\n")
  cfg = C.load(Outer, str(p), ["inner.steps=7", "mesh.tensor=2"])
  assert cfg == Outer(name="run1", inner=Inner(lr=0.1, steps=7), tags=("a", "b"),
                      mesh=shd.MeshConfig(tensor=2))


def test_unknown_key_names_key_and_file(tmp_path):
  p = tmp_path / "bad.yaml"
  p.write_text("inner:\n  lrr: 0.1\n")
  with pytest.raises(C.ConfigError, match=r"bad.yaml.inner: unknown key\(s\) \['lrr'\]"):
    C.load(Outer, str(p))


def test_wrong_type_names_key_and_file(tmp_path):
  p = tmp_path / "bad.yaml"
  p.write_text("inner:\n  steps: ten\n")
  with pytest.raises(C.ConfigError, match=r"bad.yaml.inner.steps: expected an integer, got 'ten'"):
    C.load(Outer, str(p))
  with pytest.raises(C.ConfigError, match=r"^--set inner.lr=fast: expected a number"):
    C.load(Outer, None, ["inner.lr=fast"])


def test_yaml_is_loaded_safely(tmp_path):
  p = tmp_path / "evil.yaml"
  p.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
  with pytest.raises(C.ConfigError, match="invalid YAML"):
    C.load(Outer, str(p))
