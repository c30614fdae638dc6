"""LoRA on the decoder's Einsum projections, without touching models/transformer.py.

`apply_lora` swaps each targeted `Einsum` (attention q/k/v/o, MLP gate/up/down) for a `LoRAEinsum`
that keeps the very same frozen weight `w` and adds two trainable factors:

    y = x·W + (alpha / rank) · (x·A)·B,   A: [contracted dims..., R],  B: [R, output dims...]

so the parameter paths of the base weights do not change (checkpoints, sharding rules and the HF
weight map still apply). `merge_lora` folds B·A back into W and returns a plain model of the
original structure, which `save_pretrained` writes like any other.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from persyn_jax.models.layers import token_einsum
from persyn_jax.models.transformer import CausalLM, Einsum

RANK = "R"  # the rank axis' letter in the einsum strings (unused by the model's strings)
# Projections of one decoder block that LoRA can wrap (attribute names in models/transformer.py).
ATTN_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank adapters on the attention and MLP projections; rank 0 means full fine-tuning."""

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ATTN_TARGETS + MLP_TARGETS

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank={self.rank}: must be >= 0 (0 = full fine-tuning)")
    if not (math.isfinite(self.alpha) and self.alpha > 0):  # NaN would make every adapter NaN
      raise ValueError(f"lora.alpha={self.alpha}: must be a finite number > 0")
    bad = sorted(set(self.targets) - set(ATTN_TARGETS + MLP_TARGETS))
    if bad:
      raise ValueError(f"lora.targets: unknown projection(s) {bad}; known: "
                       f"{list(ATTN_TARGETS + MLP_TARGETS)}")
    if self.rank > 0 and not self.targets:  # adapters on nothing: a run that trains nothing
      raise ValueError(f"lora.targets is empty with lora.rank={self.rank}: name at least one of "
                       f"{list(ATTN_TARGETS + MLP_TARGETS)} (rank 0 = full fine-tuning)")
    dup = sorted({t for t in self.targets if list(self.targets).count(t) > 1})
    if dup:
      raise ValueError(f"lora.targets: {dup} listed more than once")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0


class LoRAParam(nnx.Param):
  """A trainable low-rank factor (a Param subtype, so filters can pick adapters alone)."""


def split_eqn(eqn: str) -> tuple[str, str, str, str, str]:
  """"BTD,DNH->BTNH" -> (x, w, out, contracted "D", free "NH") subscripts."""
  lhs, out = eqn.replace(" ", "").split("->")
  x, w = lhs.split(",")
  contracted = "".join(c for c in w if c in x and c not in out)
  free = "".join(c for c in w if c in out)
  if RANK in eqn or contracted + free != w:
    raise ValueError(f"LoRA cannot factor the einsum {eqn!r}")
  return x, w, out, contracted, free


class LoRAEinsum(nnx.Module):
  """An Einsum plus a low-rank update; `w` is the wrapped module's own (frozen) variable."""

  def __init__(self, base: Einsum, rank: int, alpha: float, *, rngs: nnx.Rngs, param_dtype):
    self.eqn, self.dtype, self.w = base.eqn, base.dtype, base.w
    x, w, _, contracted, free = split_eqn(base.eqn)
    full = tuple(self.w.get_value().shape)
    all_axes = tuple(getattr(self.w, "logical_axes", (None,) * len(full)))
    # a stacked weight (scanned blocks) gets stacked factors: the scan hands each layer its slice
    lead = full[:len(full) - len(w)]
    lead_axes = all_axes[:len(lead)]
    shape = dict(zip(w, full[len(lead):]))
    axes = dict(zip(w, all_axes[len(lead):]))
    fan_in = 1
    for c in contracted:
      fan_in *= shape[c]
    bound = fan_in ** -0.5  # PEFT's kaiming-uniform A; B = 0, so training starts at the base model
    a_shape = lead + tuple(shape[c] for c in contracted) + (rank,)
    self.lora_a = LoRAParam(
        jax.random.uniform(rngs.params(), a_shape, param_dtype, -bound, bound),
        logical_axes=lead_axes + tuple(axes[c] for c in contracted) + (None,))
    self.lora_b = LoRAParam(jnp.zeros(lead + (rank,) + tuple(shape[c] for c in free), param_dtype),
                            logical_axes=lead_axes + (None,) + tuple(axes[c] for c in free))
    self.scale = alpha / rank

  def __call__(self, x):
    xs, _, out, contracted, free = split_eqn(self.eqn)
    batch = "".join(c for c in xs if c not in contracted)
    # token_einsum: one token axis, as the base Einsum (a CPU backward without transposed copies)
    y = token_einsum(self.eqn, x, self.w[...].astype(self.dtype))
    a = self.lora_a[...].astype(self.dtype)
    b = self.lora_b[...].astype(self.dtype)
    h = token_einsum(f"{xs},{contracted}{RANK}->{batch}{RANK}", x, a)
    z = token_einsum(f"{batch}{RANK},{RANK}{free}->{out}", h, b)
    # the scale multiplies in fp32 (as PEFT's `lora_B(lora_A(x)) * scaling` with a Python float):
    # in bf16 alpha/rank itself would round (16/3 -> 5.34375), a bias merge_lora does not have
    return y + (z.astype(jnp.float32) * self.scale).astype(y.dtype)

  def delta(self) -> jax.Array:
    """scale · A·B in the layout of `w` (fp32; stacked like `w`)."""
    _, w, _, contracted, free = split_eqn(self.eqn)
    a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
    f = lambda a, b: jnp.einsum(f"{contracted}{RANK},{RANK}{free}->{w}", a, b)
    for _ in range(a.ndim - len(contracted) - 1):  # one vmap per leading (layers) axis
      f = jax.vmap(f)
    return self.scale * f(a, b)


def _projections(model: CausalLM, targets):
  block = model.model.layers  # one stacked block: its projections hold every layer
  for name in targets:
    parent = block.attn if name in ATTN_TARGETS else block.mlp
    yield parent, name


def apply_lora(model: CausalLM, config: LoRAConfig, *, seed: int = 0, param_dtype=jnp.float32
               ) -> CausalLM:
  """Wraps the targeted projections of `model` in place (returns it)."""
  if not isinstance(model, CausalLM):
    raise TypeError(f"LoRA applies to a CausalLM, got {type(model).__name__}")
  rngs = nnx.Rngs(seed)
  for parent, name in _projections(model, config.targets):
    mod = getattr(parent, name)
    if isinstance(mod, LoRAEinsum):
      raise ValueError("the model already carries LoRA adapters")
    setattr(parent, name, LoRAEinsum(mod, config.rank, config.alpha, rngs=rngs,
                                     param_dtype=param_dtype))
  return model


def has_lora(model: nnx.Module) -> bool:
  return any(isinstance(m, LoRAEinsum) for _, m in nnx.iter_graph(model))


def merged_weights(model: nnx.Module) -> dict[tuple, jax.Array]:
  """{path of w: W + scale·A·B} for every adapted projection, in the dtype of W."""
  out = {}
  for path, m in nnx.iter_graph(model):
    if isinstance(m, LoRAEinsum):
      w = m.w[...]
      out[tuple(path) + ("w",)] = (w.astype(jnp.float32) + m.delta()).astype(w.dtype)
  return out


def merge_lora(model: CausalLM) -> CausalLM:
  """A plain model (no adapters) whose weights are the merged W + scale·A·B; `model` is unchanged."""
  if not has_lora(model):
    return model
  merged = merged_weights(model)
  base = nnx.eval_shape(lambda: CausalLM(model.config, rngs=nnx.Rngs(0), dtype=model.dtype,
                                         param_dtype=jnp.float32))
  graphdef, _ = nnx.split(base)
  flat = {p: v for p, v in nnx.to_flat_state(nnx.state(model))
          if p[-1] not in ("lora_a", "lora_b")}
  for p, arr in merged.items():
    flat[p] = flat[p].replace(arr)
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
