"""Meshes and logical-axis rule sets.

Parameters and activations carry logical axis names (`embed`, `mlp`, `heads`, ...); a `Rules` set
maps them to the mesh axes (`data`, `fsdp`, `tensor`). Nothing else in the code names a mesh axis.
Two rule sets: `TRAINING` (weights over fsdp x tensor) and `SERVING` (weights over tensor only, so
a decode loop never gathers FSDP shards). The active set (`use_rules`, default TRAINING) is what
every function here uses unless it is given `rules=`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from persyn_jax.config import ConfigError

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class Rules:
  """A named rule set: logical axis -> mesh axes, in order of preference. Frozen and hashable, so
  that compiled functions can be cached per rule set."""

  name: str
  table: tuple[tuple[str, tuple[str, ...]], ...]
  # serving only: when `tensor` does not divide the kv heads, loading keeps copies of each kv head
  # (`kv_head_replicas`) so that the k/v projections and the cache split over `tensor` too
  replicate_kv: bool = False

  @classmethod
  def of(cls, name: str, table: Mapping[str, Sequence[str]]) -> "Rules":
    for logical, axes in table.items():
      bad = [a for a in axes if a not in AXES]
      if bad:
        raise ValueError(f"rules {name!r}: {logical!r} -> {bad}: mesh axes are {AXES}")
    return cls(name, tuple((k, tuple(v)) for k, v in table.items()))

  def replace(self, name: str, **axes: Sequence[str]) -> "Rules":
    """A new rule set: this one with the given logical axes remapped (or added)."""
    return dataclasses.replace(Rules.of(name, {**dict(self.table), **axes}),
                               replicate_kv=self.replicate_kv)

  def __getitem__(self, logical: str) -> tuple[str, ...]:
    for k, v in self.table:
      if k == logical:
        return v
    raise KeyError(f"logical axis {logical!r} has no sharding rule in rule set {self.name!r}; "
                   f"known: {sorted(self)}")

  def __contains__(self, logical: str) -> bool:
    return any(k == logical for k, _ in self.table)

  def __iter__(self) -> Iterator[str]:
    return (k for k, _ in self.table)


# Activations use their own names so that a weight dimension sharded over `fsdp` (embed) is
# gathered, not kept sharded, in the activations.
TRAINING = Rules.of("training", {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "norm": (),
    "labels": (),
    # the stacked axis of scanned decoder blocks and of their KV cache: never split (a scan
    # step reads one whole layer)
    "layers": (),
    # activations
    "batch": ("data", "fsdp"),
    "seq": (),
    "act_embed": (),
    "act_mlp": ("tensor",),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_vocab": ("tensor",),
    "cache_seq": (),
})
# Serving replicates weights over data and fsdp (more memory per device) so that a decode step
# reads its weights locally instead of all-gathering every layer's FSDP shards once per token.
SERVING = dataclasses.replace(TRAINING.replace("serving", embed=()), replicate_kv=True)


def kv_head_replicas(num_heads: int, num_kv_heads: int, tensor: int, *, what: str = "model") -> int:
  """Copies of each kv head the serving layout keeps on a `tensor`-way split (1: none needed).

  With r copies (kept next to each other, so expanded head e is a copy of head e // r), query
  head n reads expanded head n // (N / (K r)), a copy of its own head n // (N / K); choosing
  K r = lcm(K, tensor) makes `tensor` divide the expanded heads, so each shard holds exactly the
  kv heads its query heads read and the cache splits over `tensor` like the query heads
  (tensor 4, K 2: two copies; tensor 16, K 8: two). Without it a kv axis that `tensor` does not
  divide is replicated whole, the cache included. Raises when the query heads do not split."""
  if tensor <= 1 or num_kv_heads % tensor == 0:
    return 1
  if num_heads % tensor:
    raise ValueError(f"{what}: {num_heads} query heads do not split over tensor={tensor}; "
                     "choose a tensor size that divides them")
  r = math.lcm(num_kv_heads, tensor) // num_kv_heads
  if num_heads % (num_kv_heads * r):
    raise ValueError(f"{what}: {num_kv_heads} kv heads cannot be copied to split over "
                     f"tensor={tensor} ({num_heads} query heads are not a multiple of "
                     f"{num_kv_heads * r}); choose a tensor size that divides or is a multiple "
                     f"of {num_kv_heads}")
  return r

_ACTIVE: contextvars.ContextVar[Rules] = contextvars.ContextVar("persyn_jax_rules", default=TRAINING)


def active_rules() -> Rules:
  return _ACTIVE.get()


@contextlib.contextmanager
def use_rules(rules: Rules | None):
  """Makes `rules` the active rule set inside the block (None: leave the active set)."""
  if rules is None:
    yield active_rules()
    return
  if not isinstance(rules, Rules):
    raise TypeError(f"rules={rules!r}: expected a sharding.Rules (TRAINING or SERVING)")
  token = _ACTIVE.set(rules)
  try:
    yield rules
  finally:
    _ACTIVE.reset(token)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; -1 on one axis means "the rest of the devices"."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """The axis sizes on `num_devices`. A mesh that does not fit them is bad input: a ConfigError
    (a ValueError), which the CLI reports in one line with exit 2."""
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ConfigError(f"mesh {self}: at most one axis may be -1")
    for name, s in zip(AXES, sizes):
      if s == 0 or s < -1:
        raise ConfigError(f"mesh.{name}={s}: sizes are positive, or -1 for the rest")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ConfigError(f"mesh {self}: the fixed axes ({known} devices) do not divide the "
                         f"{num_devices} devices")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ConfigError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
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
                    mesh: Mesh | jax.sharding.AbstractMesh | None = None, *,
                    rules: Rules | None = None) -> P:
  """PartitionSpec for `logical_axes` under `rules` (default: the active set). A mesh axis is used
  at most once, and only where it divides the dimension (a 1-kv-head model on tensor=2 keeps its
  kv heads whole)."""
  rules = rules if rules is not None else active_rules()
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    chosen, prod = [], 1
    for ax in rules[name]:
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


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int], *,
                   rules: Rules | None = None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules=rules))


def variable_sharding(var: nnx.Variable, mesh: Mesh, *, rules: Rules | None = None) -> NamedSharding:
  axes = getattr(var, "logical_axes", None)
  shape = var.get_value().shape
  if axes is None:
    axes = (None,) * len(shape)
  return named_sharding(mesh, axes, shape, rules=rules)


def state_shardings(state: nnx.State, mesh: Mesh, *, rules: Rules | None = None):
  """NamedSharding for every variable of an nnx state (a pytree of the same structure)."""
  rules = rules if rules is not None else active_rules()
  return jax.tree.map(lambda v: variable_sharding(v, mesh, rules=rules), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, *, rules: Rules | None = None) -> nnx.Module:
  """Places every variable of `model` on its sharding over `mesh` (in place; returns the model)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules=rules)
  flat_s = dict(nnx.to_flat_state(shardings))
  for path, var in nnx.to_flat_state(state):
    var.set_value(jax.device_put(var.get_value(), flat_s[path].get_value()
                                 if isinstance(flat_s[path], nnx.Variable) else flat_s[path]))
  nnx.update(model, state)
  return model


def constrain(x: jax.Array, logical_axes: Sequence[str | None], *,
              rules: Rules | None = None) -> jax.Array:
  """Sharding constraint on an activation, when a mesh is in context (`jax.set_mesh`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh,
                                                             rules=rules))


def batch_sharding(mesh: Mesh, shape: Sequence[int], *, rules: Rules | None = None) -> NamedSharding:
  """Sharding of a [batch, ...] input array: batch over (data, fsdp), the rest replicated."""
  return named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape, rules=rules)


def batch_shards(mesh: Mesh) -> int:
  """The number of batch shards of `mesh` (data x fsdp): batch rows are padded to a multiple."""
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


def put_global(x, sharding: NamedSharding) -> jax.Array:
  """A host numpy array holding the whole (global) value -> a jax.Array laid out by `sharding`.

  Every process passes the same `x`; each one's devices take their slices of it, whatever the
  mesh's layout over processes (rows replicated over a `tensor` axis that spans hosts included)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
