"""One jitted runner for a model: the device side shared by the sampler, the scorers and the router.

    runner = Runner(model, mesh=mesh, rules=shd.SERVING)
    step = runner.jit(decode, static={"st": st}, donate=(0,))   # decode(model, cache, ...)
    out = step(cache, runner.put(ids), runner.replicate(seed))

A function is jitted once per (model graph, function, static constants, mesh, rule set, donated
arguments) and kept in a process-wide cache, so a new Runner over the same model graph (a new
`generate` call, a new scorer) reuses the compiled code; jax.jit then keeps one executable per
input shape. The function is traced under the runner's mesh and rule set: its activation
constraints (`sharding.constrain`) follow the rule set the cache key names.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from persyn_jax import sharding as shd

_COMPILED: dict[Any, Callable] = {}


def _static_key(static: Mapping[str, Any] | None) -> tuple:
  items = tuple(sorted((static or {}).items()))
  try:
    hash(items)
  except TypeError:
    raise TypeError(f"static={dict(items)!r}: static constants must be hashable (they key the "
                    "compile cache)") from None
  return items


def compiled(graphdef, fn: Callable, static: Mapping[str, Any] | None, mesh: jax.sharding.Mesh,
             rules: shd.Rules, donate: tuple[int, ...] = ()) -> Callable:
  """jit(lambda state, *args: fn(merge(graphdef, state), *args, **static)), cached.

  donate: positions in `args` whose buffers the call consumes (XLA reuses them for outputs).
  """
  key = (graphdef, fn, _static_key(static), mesh, rules, tuple(donate))
  if key not in _COMPILED:
    kwargs = dict(static or {})

    def run(state, *args):
      return fn(nnx.merge(graphdef, state), *args, **kwargs)

    _COMPILED[key] = jax.jit(run, donate_argnums=tuple(i + 1 for i in donate))
  return _COMPILED[key]


class Runner:
  """One model's (graphdef, state) on one mesh under one rule set.

  mesh: default the mesh the model's parameters live on (`sharding.mesh_of`). rules: default the
  active rule set. The parameters are used where they are: loading places them (e.g.
  `models.load_model(..., rules=SERVING)`); the rule set here governs the traced activations.
  """

  def __init__(self, model: nnx.Module, *, mesh: jax.sharding.Mesh | None = None,
               rules: shd.Rules | None = None):
    self.graphdef, self.state = nnx.split(model)
    self.mesh = mesh if mesh is not None else shd.mesh_of(self.state)
    self.rules = rules if rules is not None else shd.active_rules()
    self.shards = shd.batch_shards(self.mesh)  # batch rows are padded to a multiple of this

  def jit(self, fn: Callable, *, static: Mapping[str, Any] | None = None,
          donate: tuple[int, ...] = ()) -> Callable:
    """fn(model, *args, **static) as a compiled callable(*args) over this runner's state.

    Calls dispatch asynchronously and return device arrays; inputs must already be placed
    (`put`, `replicate`, or outputs of an earlier call).
    """
    jitted = compiled(self.graphdef, fn, static, self.mesh, self.rules, donate)

    def call(*args):
      with jax.set_mesh(self.mesh), shd.use_rules(self.rules):
        return jitted(self.state, *args)
    return call

  def put(self, x) -> jax.Array:
    """A host [batch, ...] array placed with its rows over the mesh's batch axes (data x fsdp)."""
    x = np.asarray(x)
    return jax.device_put(x, shd.batch_sharding(self.mesh, x.shape, rules=self.rules))

  def put_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    return {k: self.put(v) for k, v in batch.items()}

  def replicate(self, x) -> jax.Array:
    """A host value replicated on every device of the mesh (scalars, small tables)."""
    return jax.device_put(np.asarray(x), shd.replicated(self.mesh))
