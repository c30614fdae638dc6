"""One mesh, one set of logical-axis rules.

Parameters and activations carry logical axis names (`embed`, `mlp`, `heads`, ...); `RULES` maps
them to the mesh axes (`data`, `fsdp`, `tensor`). Nothing else in the code names a mesh axis.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (in order of preference). Activations use their own names so that a
# weight dimension sharded over `fsdp` (embed) is gathered, not kept sharded, in the activations.
RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "norm": (),
    "labels": (),
    # activations
    "batch": ("data", "fsdp"),
    "seq": (),
    "act_embed": (),
    "act_mlp": ("tensor",),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_vocab": ("tensor",),
    "cache_seq": (),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; -1 on one axis means "the rest of the devices"."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError(f"mesh {self}: at most one axis may be -1")
    for name, s in zip(AXES, sizes):
      if s == 0 or s < -1:
        raise ValueError(f"mesh.{name}={s}: sizes are positive, or -1 for the rest")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"mesh {self}: the fixed axes ({known} devices) do not divide the "
                         f"{num_devices} devices")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                       f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  config = config or MeshConfig()
  devices = list(devices if devices is not None else jax.devices())
  shape = config.shape(len(devices))
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # fake CPU devices and odd topologies: plain order is fine
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, AXES)


def single_device_mesh() -> Mesh:
  """The default mesh of an unsharded model: the first device alone."""
  return make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def mesh_of(tree) -> Mesh:
  """The mesh a model's (or a state pytree's) arrays live on; the single-device mesh for arrays
  that are not laid out on a named mesh."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
    break
  return single_device_mesh()


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | jax.sharding.AbstractMesh | None = None) -> P:
  """PartitionSpec for `logical_axes`. A mesh axis is used at most once, and only where it divides
  the dimension (a 1-kv-head model on tensor=2 keeps its kv heads whole)."""
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in RULES:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(RULES)}")
    chosen, prod = [], 1
    for ax in RULES[name]:
      if ax in used:
        continue
      size = mesh.shape[ax] if mesh is not None else 1
      if shape is not None and shape[i] % (prod * size):
        continue
      chosen.append(ax)
      prod *= size
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return P(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
  axes = getattr(var, "logical_axes", None)
  shape = var.get_value().shape
  if axes is None:
    axes = (None,) * len(shape)
  return named_sharding(mesh, axes, shape)


def state_shardings(state: nnx.State, mesh: Mesh):
  """NamedSharding for every variable of an nnx state (a pytree of the same structure)."""
  return jax.tree.map(lambda v: variable_sharding(v, mesh), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Places every variable of `model` on its sharding over `mesh` (in place; returns the model)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh)
  flat_s = dict(nnx.to_flat_state(shardings))
  for path, var in nnx.to_flat_state(state):
    var.set_value(jax.device_put(var.get_value(), flat_s[path].get_value()
                                 if isinstance(flat_s[path], nnx.Variable) else flat_s[path]))
  nnx.update(model, state)
  return model


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation, when a mesh is in context (`jax.set_mesh`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a [batch, ...] input array: batch over (data, fsdp), the rest replicated."""
  return named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape)


def put_global(x, sharding: NamedSharding) -> jax.Array:
  """A host numpy array holding the whole (global) value -> a jax.Array laid out by `sharding`.

  Every process passes the same `x`; each one's devices take their slices of it, whatever the
  mesh's layout over processes (rows replicated over a `tensor` axis that spans hosts included)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
