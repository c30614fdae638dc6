"""Everything one SFT run compiles once: the model split into trained and frozen parts, their
shardings on the mesh, the optimizer, and the jitted (donating) train step and eval step."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.checkpoints import abstract
from persyn_jax.models import CausalLM, as_dtype, build_model
from persyn_jax.models.lora import LoRAParam, apply_lora, has_lora
from persyn_jax.models.transformer import set_remat, set_unroll
from persyn_jax.sft.config import SFTConfig
from persyn_jax.sft.loss import BATCH_KEYS
from persyn_jax.sft.optim import lr_schedule, param_group
from persyn_jax.sft.step import (ParamTree, batch_shardings, flat_shardings, make_loss,
                                 opt_shardings)
from persyn_jax.training import (TrainState, make_eval_step, make_optimizer, make_train_step,
                                 state_shapes)


def recast(model: CausalLM, compute_dtype, param_dtype=None) -> CausalLM:
  """The same weights under another compute dtype (and, if given, storage dtype)."""
  if not isinstance(model, CausalLM):
    raise TypeError(f"SFT trains a CausalLM, got {type(model).__name__}")
  if has_lora(model):
    raise ValueError("recast() takes a model without LoRA adapters (merge_lora first)")
  compute = as_dtype(compute_dtype)
  state = nnx.state(model)
  if param_dtype is not None:
    state = jax.tree.map(lambda x: x.astype(as_dtype(param_dtype)), state)
  if model.dtype == compute:
    return nnx.merge(nnx.graphdef(model), state)
  graphdef = nnx.graphdef(build_model(model.config, dtype=compute, abstract=True))
  return nnx.merge(graphdef, state)


def _buffers(x: jax.Array) -> set[int]:
  """Device buffer addresses of an array (a device_put to an equivalent sharding may wrap the same
  buffers in a new Array object, so identity of the objects says nothing)."""
  try:
    return {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}
  except Exception:  # a backend without raw pointers: report one common address, so all is copied
    return {0}


def prepare(model: CausalLM, config: SFTConfig) -> CausalLM:
  """Compute dtype from the config; full fine-tuning keeps master weights in param_dtype, LoRA
  keeps the frozen base as stored and its factors in param_dtype."""
  if config.lora.enabled:
    model = recast(model, config.compute_dtype)
    return apply_lora(model, config.lora, seed=config.seed, param_dtype=as_dtype(config.param_dtype))
  return recast(model, config.compute_dtype, config.param_dtype)


# The config fields that enter the traced step (the rest only steer the loop around it).
TRACED_FIELDS = ("lr", "schedule", "warmup_steps", "warmup_ratio", "min_lr_ratio", "weight_decay",
                 "b1", "b2", "eps", "grad_clip", "z_loss", "loss_chunk", "remat", "unroll_layers",
                 "compute_dtype", "param_dtype", "lora")
# Compiled steps by (graph, parameter names, traced config, steps, mesh): a pipeline that trains
# one student per routing policy with the same shapes compiles its step once.
_COMPILED: dict[Any, dict[str, Any]] = {}
_COMPILED_MAX = 8


@dataclasses.dataclass
class Session:
  config: SFTConfig
  model_config: Any  # the ModelConfig
  mesh: Any
  graphdef: Any
  trained: ParamTree
  frozen_tree: ParamTree
  frozen: dict[str, jax.Array]
  init_params: dict[str, jax.Array] | None  # handed to (and donated by) the first state only
  state_shardings: TrainState  # of NamedShardings
  compiled: dict[str, Any]  # tx, schedule, loss and the jitted step/eval, shared via _COMPILED
  param_shapes: dict[str, jax.ShapeDtypeStruct]

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.compiled["tx"]

  @property
  def schedule(self) -> Callable:
    return self.compiled["schedule"]

  @property
  def loss(self) -> Callable:
    return self.compiled["loss"]

  def init_state(self) -> TrainState:
    """The state at step 0; it takes over `init_params` (the first step donates them)."""
    if self.init_params is None:
      raise RuntimeError("init_state() was already called, or the run was restored")
    params, self.init_params = self.init_params, None
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state: the target of a checkpoint restore."""
    return abstract(state_shapes(self.param_shapes, self.tx), self.state_shardings)

  def put_batch(self, micro: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    """k global microbatches [batch_size, seq] (the same on every process) -> [k, rows, seq]
    device arrays, rows over (data, fsdp); each process' devices take their slices."""
    stacked = {k: np.stack([np.asarray(m[k]) for m in micro]) for k in BATCH_KEYS}
    shardings = batch_shardings(self.mesh, stacked["input_ids"].shape)
    return {k: shd.put_global(v, shardings[k]) for k, v in stacked.items()}

  def put_rows(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """One global batch [rows, seq] -> device arrays, rows over (data, fsdp)."""
    sharding = shd.batch_sharding(self.mesh, np.shape(batch["input_ids"]))
    return {k: shd.put_global(batch[k], sharding) for k in BATCH_KEYS}

  @property
  def step(self) -> Callable:
    """step(state, frozen, batch) -> (state, metrics); the state is donated."""
    if self.compiled["step"] is None:
      fn = make_train_step(self.loss, self.tx, normalize_by="tokens", schedule=self.schedule)
      self.compiled["step"] = jax.jit(fn, donate_argnums=(0,),
                                      out_shardings=(self.state_shardings, shd.replicated(self.mesh)))
    return self.compiled["step"]

  @property
  def evaluate(self) -> Callable:
    if self.compiled["eval"] is None:
      self.compiled["eval"] = jax.jit(make_eval_step(self.loss, normalize_by="tokens"))
    return self.compiled["eval"]

  def model(self, params: dict[str, jax.Array]) -> CausalLM:
    """The model with `params` (adapters not merged)."""
    return nnx.merge(self.graphdef, self.trained.state(params), self.frozen_tree.state(self.frozen))


def unrolled(config: SFTConfig, mesh) -> bool:
  """Whether the step unrolls the layer scan: `unroll_layers`, or (None) when the mesh is CPUs'."""
  if config.unroll_layers is not None:
    return config.unroll_layers
  return mesh.devices.flat[0].platform == "cpu"


def make_session(model: CausalLM, config: SFTConfig, mesh, total_steps: int) -> Session:
  """Splits, places and compiles (lazily) for `model` as `prepare` makes it."""
  original = model
  with jax.set_mesh(mesh):
    # the policy applies to the scanned block body (models/layers.py), not to the whole loss
    model = set_remat(prepare(model, config), config.remat)
    model = set_unroll(model, unrolled(config, mesh))
    trained_filter = LoRAParam if config.lora.enabled else nnx.Param
    graphdef, trained_state, frozen_state = nnx.split(model, trained_filter, ...)
    ttree, ftree = ParamTree.of(trained_state), ParamTree.of(frozen_state)
    p_shard = flat_shardings(trained_state, mesh)
    f_shard = flat_shardings(frozen_state, mesh)
    params = jax.device_put(ttree.flat(trained_state), p_shard)
    # The step donates its state: arrays still shared with the caller's model are copied (a
    # dtype or sharding change already made new ones, and copying those would double memory).
    callers = set().union(*map(_buffers, jax.tree.leaves(nnx.state(original))))
    params = {k: jnp.copy(v) if _buffers(v) & callers else v for k, v in params.items()}
    frozen = jax.device_put(ftree.flat(frozen_state), f_shard)
    key = (graphdef, ttree.keys, ftree.keys, tuple(getattr(config, f) for f in TRACED_FIELDS),
           total_steps, mesh)
    compiled = _COMPILED.pop(key, None)
    if compiled is None:
      schedule = lr_schedule(config, total_steps)
      tx = make_optimizer([param_group(config, schedule)], grad_clip=config.grad_clip)
      loss = make_loss(graphdef, ttree, ftree, z_loss=config.z_loss, chunk=config.loss_chunk)
      compiled = {"tx": tx, "schedule": schedule, "loss": loss, "step": None, "eval": None}
    _COMPILED[key] = compiled  # most recently used last
    while len(_COMPILED) > _COMPILED_MAX:
      _COMPILED.pop(next(iter(_COMPILED)))
    tx = compiled["tx"]
    o_shard = opt_shardings(jax.eval_shape(tx.init, params), p_shard, mesh)
    state_shardings = TrainState(step=shd.replicated(mesh), params=p_shard, opt_state=o_shard)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
  return Session(config, model.config, mesh, graphdef, ttree, ftree, frozen, params,
                 state_shardings, compiled, shapes)
