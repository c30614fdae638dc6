"""The SFT loop end to end: memorization, metrics, resume, NaN stop, HF export, LoRA."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.metrics import read_metrics
from persyn_jax.models import from_pretrained
from persyn_jax.sft import (LoRAConfig, LoRAEinsum, NonFiniteError, SFTConfig, apply_lora,
                            make_session, merge_lora, recast, train)
from persyn_jax.checkpoints import CheckpointManager
from test_sft_batches import batches

SEQ = 80


def cfg(**kw):
  base = dict(lr=5e-3, max_steps=6, batch_size=2, seq_len=SEQ, warmup_steps=0, schedule="constant",
              compute_dtype="float32", export_dtype="float32", checkpoint_every=2, log_every=2,
              progress=False)
  base.update(kw)
  return SFTConfig(**base)


@pytest.fixture(scope="module")
def mesh():
  return shd.make_mesh(shd.MeshConfig(1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def llama(model_dir):
  path, torch_model = model_dir("llama")
  model, tok = from_pretrained(path, dtype="float32")
  return model, tok, torch_model


@pytest.fixture(scope="module")
def memorized(llama, mesh, tmp_path_factory):
  model, tok, _ = llama
  data = batches(tok, 2, 2, SEQ)  # 8 examples
  out = str(tmp_path_factory.mktemp("memorize"))
  # The default numerics: bf16 compute, fp32 master weights.
  config = cfg(max_steps=60, warmup_steps=5, schedule="cosine", lr=1e-2, checkpoint_every=30,
               eval_every=30, log_every=10, compute_dtype="bfloat16", param_dtype="float32")
  return train(model, tok, data, config, out_dir=out, mesh=mesh, eval_batches=data), data


@nnx.jit
def forward(model, ids, positions=None, segment_ids=None):
  return model(ids, positions=positions, segment_ids=segment_ids)


def predictions(model, batch):
  logits = forward(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["positions"]),
                   jnp.asarray(batch["segment_ids"]))
  return np.asarray(jnp.argmax(logits, -1))


def test_loss_falls_and_a_tiny_dataset_is_memorized(memorized):
  result, data = memorized
  losses = [result.losses[s] for s in sorted(result.losses)]
  assert len(losses) == 60 and result.step == 60
  assert np.mean(losses[-5:]) < 0.05 * np.mean(losses[:2])
  for batch in data:  # every response token is the argmax of the trained student
    mask = batch["loss_mask"] > 0
    assert np.array_equal(predictions(result.model, batch)[mask], batch["targets"][mask])
  assert result.eval_losses[60] < 0.05
  assert result.model.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(nnxstate(result.model))} == {jnp.dtype("float32")}


def test_metrics_go_to_jsonl_and_tensorboard(memorized):
  result, _ = memorized
  rows = read_metrics(result.metrics_path, "train")
  assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
  for key in ("loss", "lr", "grad_norm", "tokens_per_s", "real_tokens_per_s"):
    assert all(np.isfinite(r[key]) for r in rows[1:]), key
  assert [r["step"] for r in read_metrics(result.metrics_path, "eval")] == [30, 60]
  assert any(f.startswith("events") for f in os.listdir(os.path.join(result.out_dir, "tb")))
  assert CheckpointManager(result.checkpoint_dir, keep=2).all_steps() == [30, 60]


def test_exported_student_logits_in_transformers_equal_ours(memorized):
  result, data = memorized
  hf = T.AutoModelForCausalLM.from_pretrained(result.export_dir, torch_dtype=torch.float32)
  hf.eval()
  ids = data[0]["input_ids"][:1, :40]  # the first packed example, unpadded
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  ours = np.asarray(forward(recast(result.model, "float32"), jnp.asarray(ids)))
  np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)  # fp32, different kernels
  tok = T.AutoTokenizer.from_pretrained(result.export_dir)
  assert tok.eos_token == "<|im_end|>"


# One config for the resume and NaN tests: the second reuses the first's compiled step.
RESUME = cfg(max_steps=5, grad_accum=2, schedule="cosine", warmup_steps=2, lr=3e-3)


def _interrupting(data, fail_at):
  """A resumable source that dies when asked for microbatch `fail_at` (a crash mid-run)."""
  def source(start):
    for i in range(start, 10 ** 6):
      if i == fail_at:
        raise RuntimeError(f"injected crash at microbatch {i}")
      yield data[i % len(data)]
  return source


def test_kill_and_resume_gives_the_losses_of_an_uninterrupted_run(llama, mesh, tmp_path):
  model, tok, _ = llama
  data = batches(tok, 6, 2, SEQ)  # distinct microbatches: a wrong data position shows
  config = RESUME
  full = train(model, tok, data, config.replace(export=False), out_dir=str(tmp_path / "a"), mesh=mesh)
  out = str(tmp_path / "b")
  with pytest.raises(RuntimeError, match="injected crash"):  # dies fetching step 4's data
    train(model, tok, _interrupting(data, fail_at=6), config, out_dir=out, mesh=mesh)
  resumed = train(model, tok, _interrupting(data, fail_at=-1), config, out_dir=out, mesh=mesh)
  assert resumed.resumed_from == 2 and sorted(resumed.losses) == [3, 4, 5]
  for s in (3, 4, 5):  # the same computation on the same bits: equal, not just close
    assert resumed.losses[s] == full.losses[s], s
  pa = jax.tree.leaves(jax.device_get(nnxstate(full.model)))
  pb = jax.tree.leaves(jax.device_get(nnxstate(resumed.model)))
  assert all(np.array_equal(a, b) for a, b in zip(pa, pb))
  # ...and so are the final checkpoints: parameters, Adam's moments and counts, the step
  target = make_session(model, config, mesh, 5).abstract_state()
  with jax.set_mesh(mesh):
    sa, ma, _ = CheckpointManager(full.checkpoint_dir, keep=2).restore(target)
    sb, mb, _ = CheckpointManager(resumed.checkpoint_dir, keep=2).restore(target)
  assert ma["position"] == mb["position"] == 10 and int(sa.step) == int(sb.step) == 5
  la, lb = jax.tree.leaves(jax.device_get(sa)), jax.tree.leaves(jax.device_get(sb))
  assert len(la) == len(lb) and all(np.array_equal(a, b) for a, b in zip(la, lb))
  steps = [r["step"] for r in read_metrics(resumed.metrics_path, "train")]
  assert steps == sorted(set(steps))  # no step logged twice


def nnxstate(model):
  return nnx.state(model, nnx.Param)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(llama, mesh, tmp_path):
  model, tok, _ = llama
  data = batches(tok, 10, 2, SEQ)
  data[5] = dict(data[5], input_ids=data[5]["input_ids"].copy())
  data[5]["input_ids"][0, 3] = model.config.vocab_size + 7  # out of range: a NaN embedding
  with pytest.raises(NonFiniteError, match=r"step 3: the loss and gradient norm are not finite.*"
                                           r"last good checkpoint is step 2"):  # microbatches 4, 5
    train(model, tok, data, RESUME, out_dir=str(tmp_path), mesh=mesh)
  ckpts = CheckpointManager(str(tmp_path / "checkpoints"), keep=2)
  assert ckpts.all_steps() == [2]


def test_lora_trains_only_adapters_and_merged_equals_unmerged(llama, mesh, tmp_path):
  model, tok, torch_base = llama
  data = batches(tok, 2, 2, SEQ)
  config = cfg(max_steps=4, lr=1e-2, lora=LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "down")))
  result = train(model, tok, data, config, out_dir=str(tmp_path), mesh=mesh)
  assert result.losses[3] < result.losses[1] and result.losses[4] < result.losses[2]  # same batches
  # Only the targeted projections moved; norms, embeddings and other projections are the base.
  base = dict(nnx.to_flat_state(nnxstate(model)))
  new = dict(nnx.to_flat_state(nnxstate(result.model)))
  assert set(base) == set(new)
  for path, var in base.items():
    moved = not np.array_equal(np.asarray(var.get_value()), np.asarray(new[path].get_value()))
    assert moved == (path[-2:] in [("q", "w"), ("v", "w"), ("down", "w")]), path
  # The export (merged) in transformers equals our merged student.
  hf = T.AutoModelForCausalLM.from_pretrained(result.export_dir, torch_dtype=torch.float32).eval()
  ids = data[0]["input_ids"][:1, :40]
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(forward(recast(result.model, "float32"), jnp.asarray(ids))), ref,
                             atol=2e-4, rtol=2e-4)


def test_lora_config_refuses_adapters_on_no_projection_or_one_twice():
  """rank > 0 with no targets used to train nothing (SFT ran, its loss never moved, the base model
  was exported); a target listed twice failed in apply_lora with 'already carries LoRA adapters'."""
  from persyn_jax import config as cfglib
  with pytest.raises(ValueError, match=r"lora.targets is empty with lora.rank=4"):
    LoRAConfig(rank=4, targets=())
  with pytest.raises(ValueError, match=r"run.yaml.sft.lora.*lora.targets is empty"):
    cfglib.from_dict(LoRAConfig, {"rank": 4, "targets": []}, where="run.yaml.sft.lora")
  with pytest.raises(ValueError, match=r"lora.targets: \['q'\] listed more than once"):
    LoRAConfig(rank=2, targets=("q", "v", "q"))
  assert LoRAConfig(rank=0, targets=()).enabled is False  # full fine-tuning needs no targets


def test_lora_scale_is_not_rounded_to_the_compute_dtype():
  """In bf16, the adapter's output times alpha/rank equals PEFT's `lora_B(lora_A(x)) * scaling`
  (torch: a bf16 tensor times a Python float, one rounding). The scale used to be cast to bf16
  first (16/3 -> 5.34375, +0.2%): a third of the outputs were one bf16 step off, all upwards."""
  import ml_dtypes
  from persyn_jax.models.layers import Einsum
  base = Einsum("BTD,DF->BTF", (4, 4), ("embed", "mlp"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                param_dtype=jnp.float32)
  base.w.set_value(jnp.zeros((4, 4)))  # the adapter's term alone
  m = LoRAEinsum(base, rank=3, alpha=16.0, rngs=nnx.Rngs(1), param_dtype=jnp.float32)
  m.lora_a.set_value(jnp.eye(4, 3))  # x·A·B = x on the first three outputs, exactly
  m.lora_b.set_value(jnp.eye(3, 4))
  x = np.random.default_rng(0).normal(size=(2, 128, 4)).astype(ml_dtypes.bfloat16)
  tx = torch.tensor(x.astype(np.float32)).to(torch.bfloat16)
  want = (tx @ torch.eye(4, 3, dtype=torch.bfloat16) @ torch.eye(3, 4, dtype=torch.bfloat16)
          * (16.0 / 3)).float().numpy()
  np.testing.assert_array_equal(np.asarray(m(jnp.asarray(x)), np.float32), want)


def test_lora_merged_equals_unmerged(llama):
  model, _, _ = llama
  adapted = apply_lora(recast(model, "float32"), LoRAConfig(rank=3, alpha=6.0), seed=1)
  for _, m in nnx.iter_graph(adapted):
    if isinstance(m, LoRAEinsum):  # B = 0 at init; make the adapters do something
      m.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(2), m.lora_b.get_value().shape))
  ids = jnp.arange(1, 30)[None] % model.config.vocab_size
  unmerged = forward(adapted, ids)
  merged = merge_lora(adapted)
  assert not any(isinstance(m, LoRAEinsum) for _, m in nnx.iter_graph(merged))
  assert float(jnp.abs(unmerged - forward(model, ids)).max()) > 1e-2
  np.testing.assert_allclose(np.asarray(forward(merged, ids)), np.asarray(unmerged), atol=2e-5,
                             rtol=1e-5)


def test_merged_lora_weights_are_the_base_plus_scaled_b_times_a_in_peft_convention(llama, tmp_path):
  """The exported weight of an adapted projection is W + (alpha/r)·B·A with PEFT's factors
  (A: [r, in], B: [out, r], in torch's [out, in] layout), computed here from the torch base."""
  from safetensors.numpy import load_file
  from persyn_jax.models import save_pretrained
  model, tok, torch_base = llama
  rank, alpha = 3, 7.0
  adapted = apply_lora(recast(model, "float32"), LoRAConfig(rank=rank, alpha=alpha), seed=1)
  hf_name = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
             "down": "mlp.down_proj"}
  want = {k: v.numpy().astype(np.float64) for k, v in torch_base.state_dict().items()}
  for i, (path, m) in enumerate((p, m) for p, m in nnx.iter_graph(adapted) if isinstance(m, LoRAEinsum)):
    m.lora_b.set_value(0.2 * jax.random.normal(jax.random.key(i), m.lora_b.get_value().shape))
    a, b = np.asarray(m.lora_a.get_value(), np.float64), np.asarray(m.lora_b.get_value(), np.float64)
    for layer in range(a.shape[0]):  # stacked: [layers, in dims..., r], [layers, r, out dims...]
      peft_a, peft_b = a[layer].reshape(-1, rank).T, b[layer].reshape(rank, -1).T
      want[f"model.layers.{layer}.{hf_name[path[-1]]}.weight"] += alpha / rank * peft_b @ peft_a
  save_pretrained(merge_lora(adapted), None, str(tmp_path), dtype="float32")
  got = load_file(str(tmp_path / "model.safetensors"))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_loss_avg_leaves_out_steps_without_response_tokens(tmp_path):
  """An all-padding step changes nothing (test_sft_step) and has no loss: loss_avg is the mean of
  the other steps' losses, and a window of only such steps has none."""
  from persyn_jax.metrics import MetricsWriter
  from persyn_jax.sft.log import StepLog
  from persyn_jax.training import StepInfo
  config = cfg(log_every=2, max_steps=4, tensorboard=False)
  metrics = MetricsWriter(str(tmp_path), tensorboard=False)
  log = StepLog(config, total=4, start=0, flops_per_token=1.0, devices=1, metrics=metrics,
                last_checkpoint=lambda: "none")
  batch = [{"segment_ids": np.ones((2, SEQ), np.int32)}]
  for n, (loss, tokens) in enumerate([(3.0, 7.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)], 1):
    m = {"loss": np.float32(loss), "tokens": np.float32(tokens), "lr": np.float32(1e-3),
         "grad_norm": np.float32(0.5), "loss_finite": True, "grad_finite": True}
    log(StepInfo(n, None, m, batch, None))
  log.flush()
  metrics.close()
  rows = read_metrics(metrics.path, "train")
  assert [r["step"] for r in rows] == [2, 4]
  assert rows[0]["loss_avg"] == 3.0 and "loss_avg" not in rows[1]


def test_the_logged_step_time_leaves_out_checkpoints_and_evals(tmp_path):
  """Time spent in StepLog.paused() (the trainer's checkpoint and eval hooks) is not a training
  step's: the logged step_time_s / tokens_per_s / mfu of the window around it stay the steps'."""
  import time

  from persyn_jax.metrics import MetricsWriter
  from persyn_jax.sft.log import StepLog
  from persyn_jax.training import StepInfo
  config = cfg(log_every=3, max_steps=3, tensorboard=False)
  metrics = MetricsWriter(str(tmp_path), tensorboard=False)
  log = StepLog(config, total=3, start=0, flops_per_token=1.0, devices=1, metrics=metrics,
                last_checkpoint=lambda: "none")
  batch = [{"segment_ids": np.ones((2, SEQ), np.int32)}]
  m = {"loss": np.float32(1.0), "tokens": np.float32(7.0), "lr": np.float32(1e-3),
       "grad_norm": np.float32(0.5), "loss_finite": True, "grad_finite": True}
  for n in (1, 2, 3):
    log(StepInfo(n, None, m, batch, None))
    if n == 2:
      with log.paused():  # e.g. a checkpoint of 0.5 s
        time.sleep(0.5)
  log.flush()
  metrics.close()
  (row,) = read_metrics(metrics.path, "train")
  assert row["step"] == 3 and row["step_time_s"] < 0.1, row
