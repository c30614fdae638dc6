"""The SFT objective and step: response-only loss, packing, accumulation, sharding, schedule.

Everything in fp32 compute so that equalities hold to float rounding (tolerances say how much).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persyn_jax import sharding as shd
from persyn_jax.models import from_pretrained
from persyn_jax.sft import SFTConfig, decay_mask, loss_sums, lr_schedule, make_session, token_nll
from test_sft_batches import batches, examples, pack

SEQ = 80


def cfg(**kw):
  base = dict(lr=1e-2, max_steps=4, batch_size=2, seq_len=SEQ, warmup_steps=0, schedule="constant",
              compute_dtype="float32", param_dtype="float32", weight_decay=0.1, progress=False)
  base.update(kw)
  return SFTConfig(**base)


def one_device():
  return shd.make_mesh(shd.MeshConfig(1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def model(model_dir):
  path, _ = model_dir("llama")
  return from_pretrained(path, dtype="float32")


def loss_and_grads(session, batch):
  """(mean loss, gradients) at the session's initial parameters (one compile per session)."""
  if "test_grad" not in session.compiled:
    loss = session.loss

    def mean(p, frozen, b):
      total, aux = loss(p, frozen, b)
      return total / aux["tokens"]
    session.compiled["test_grad"] = jax.jit(jax.value_and_grad(mean))
  return session.compiled["test_grad"](session.init_params, session.frozen,
                                       {k: jnp.asarray(v) for k, v in batch.items()})


def assert_trees_close(a, b, rtol, atol):
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=rtol, atol=atol, err_msg=k)


def test_masked_tokens_contribute_zero_gradient(model):
  m, tok = model
  session = make_session(m, cfg(), one_device(), 1)
  batch = pack(examples(tok, 3), 2, SEQ, per_row=2)
  rng = np.random.default_rng(0)
  other = {k: v.copy() for k, v in batch.items()}
  masked = other["loss_mask"] == 0
  other["targets"][masked] = rng.integers(0, m.config.vocab_size, masked.sum())
  pad = other["segment_ids"] == 0
  other["input_ids"][pad] = rng.integers(0, m.config.vocab_size, pad.sum())
  assert pad.sum() > 0 and masked.sum() > pad.sum()
  l1, g1 = loss_and_grads(session, batch)
  l2, g2 = loss_and_grads(session, other)
  # The same arithmetic on the tokens that count; only exact zeros differ: equal to rounding.
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  assert_trees_close(g1, g2, rtol=1e-5, atol=1e-7)
  # ...while a changed response target does change the loss (the test can fail).
  other["targets"][~masked] = (other["targets"][~masked] + 1) % m.config.vocab_size
  l3, _ = loss_and_grads(session, other)
  assert abs(float(l3) - float(l1)) > 1e-2


def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(model):
  m, tok = model
  exs = examples(tok, 4)
  session = make_session(m, cfg(), one_device(), 1)
  packed = pack(exs, 2, SEQ, per_row=2)
  unpacked = pack(exs, 4, SEQ, per_row=1)
  l1, g1 = loss_and_grads(session, packed)
  l2, g2 = loss_and_grads(session, unpacked)
  # Different reduction orders (rows of 2 vs 1 example): fp32 rounding only.
  np.testing.assert_allclose(l1, l2, rtol=2e-6)
  assert_trees_close(g1, g2, rtol=2e-4, atol=2e-6)
  # Without segment ids the second example would see the first: a different loss.
  leaky = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
  l3, _ = loss_and_grads(session, leaky)
  assert abs(float(l3) - float(l1)) > 1e-3


def run_steps(model, config, mesh, batch_list, steps, grad_norms=None):
  """(losses, final parameters) of `steps` steps; the gradient norms go to `grad_norms` if given."""
  session = make_session(model, config, mesh, steps)
  with jax.set_mesh(mesh):
    state = session.init_state()
    losses = []
    for i in range(steps):
      k = config.grad_accum
      group = batch_list[i * k:(i + 1) * k]
      state, metrics = session.step(state, session.frozen, session.put_batch(group))
      losses.append(float(metrics["loss"]))
      if grad_norms is not None:
        grad_norms.append(float(metrics["grad_norm"]))
  return losses, jax.device_get(state.params)


def test_accumulating_k_microbatches_equals_one_batch_of_k_rows(model):
  m, tok = model
  small = batches(tok, 4, 2, SEQ)  # 4 microbatches of 2 rows, response lengths differ
  big = [{k: np.concatenate([small[2 * i][k], small[2 * i + 1][k]]) for k in small[0]}
         for i in range(2)]
  counts = [b["loss_mask"].sum() for b in small]
  assert counts[0] != counts[1]  # so a mean of microbatch means would not match
  ga, gb = [], []
  la, pa = run_steps(m, cfg(batch_size=2, grad_accum=2, lr=1e-3), one_device(), small, 2, ga)
  lb, pb = run_steps(m, cfg(batch_size=4, grad_accum=1, lr=1e-3), one_device(), big, 2, gb)
  # the accumulated gradient is the big batch's up to summation order (a mean of microbatch
  # means would be off by percents here)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  np.testing.assert_allclose(ga, gb, rtol=1e-5)
  # Adam moves a weight by about lr whatever its gradient's size, so where a gradient is near zero
  # the summation order's rounding moves the update by a fraction of lr: compared to 1% of lr
  # (one CPU differed by 1.1e-6 at a single weight of 4096 where another gave none)
  assert_trees_close(pa, pb, rtol=0, atol=1e-5)


def test_eight_devices_data_fsdp_tensor_equal_one_device(model):
  m, tok = model
  data = batches(tok, 2, 4, SEQ)
  config = cfg(batch_size=4, lr=1e-3)
  mesh8 = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  assert mesh8.size == 8
  l8, p8 = run_steps(m, config, mesh8, data, 2)
  l1, p1 = run_steps(m, config, one_device(), data, 2)
  # Sharded matmuls sum partial products in another order: fp32 rounding. Adam's first steps
  # move every weight by about ±lr whatever the gradient's size, so a near-zero gradient whose
  # sign rounding flips moves a weight by up to 2·lr: parameters are compared to 5% of lr.
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert_trees_close(p8, p1, rtol=0, atol=5e-5)


def test_z_loss_adds_the_mean_squared_logsumexp(model):
  m, tok = model
  batch = {k: jnp.asarray(v) for k, v in pack(examples(tok, 2), 1, SEQ).items()}
  logits = np.asarray(nnx.jit(lambda m, b: m(b["input_ids"], positions=b["positions"],
                                              segment_ids=b["segment_ids"]))(m, batch), np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  tgt = np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  mask = np.asarray(batch["loss_mask"], np.float64)
  ce, z = ((lse - tgt) * mask).sum(), (lse ** 2 * mask).sum()
  sums = nnx.jit(loss_sums, static_argnames=("z_loss", "chunk"))
  total, aux = sums(m, batch, z_loss=1e-3)
  np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(total), ce + 1e-3 * z, rtol=1e-5)
  total_chunked, _ = sums(m, batch, z_loss=1e-3, chunk=16)
  np.testing.assert_allclose(float(total_chunked), float(total), rtol=1e-6)


def test_token_nll_is_fp32_log_softmax():
  logits = jnp.asarray([[2.0, 1.0, -1.0]], jnp.bfloat16)
  nll, _ = token_nll(logits, jnp.asarray([0]))
  assert nll.dtype == jnp.float32
  ref = -np.log(np.exp(2.0) / np.exp([2.0, 1.0, -1.0]).sum())
  np.testing.assert_allclose(float(nll[0]), ref, rtol=1e-6)


def test_schedule_warms_up_from_lr_over_warm_then_decays():
  c = SFTConfig(lr=1e-3, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
  s = lr_schedule(c, 20)
  lrs = [float(s(i)) for i in range(20)]
  np.testing.assert_allclose(lrs[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)
  assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
  assert 1e-4 < lrs[-1] < 1.2e-4
  lin = lr_schedule(c.replace(schedule="linear", warmup_steps=0, warmup_ratio=0.0), 10)
  assert float(lin(0)) < 1e-3 and abs(float(lin(4)) - (1e-3 - 0.9e-3 * 5 / 11)) < 1e-9


def test_no_weight_decay_on_norms_and_biases(model_dir):
  path, _ = model_dir("llama_bias")
  m, _ = from_pretrained(path, dtype="float32", tokenizer=False)
  session = make_session(m, cfg(), one_device(), 1)
  mask = decay_mask(session.init_params)
  # the decoder blocks are stacked over layers: one [layers, ...] array per parameter
  assert mask["model/layers/attn/q/w"] and mask["model/embed"] and mask["lm_head"]
  assert not mask["model/layers/attn/q_bias/b"]  # 3-D ([layers, heads, head_dim]) but a bias
  assert not mask["model/layers/mlp/up_bias/b"] and not mask["model/final_norm/scale"]
  assert not mask["model/layers/attn_norm/scale"]  # 2-D ([layers, width]) but a norm


def test_an_all_padding_batch_leaves_parameters_and_adam_state_as_they_were(model):
  """A step without response tokens (sft_batches(num_batches=) pads an epoch with such batches)
  trains as if the batch were not there: AdamW at a zero gradient would still move every weight
  by its momentum and weight decay, and advance the schedule's count."""
  m, tok = model
  data = batches(tok, 2, 2, SEQ)
  empty = {k: np.zeros_like(v) for k, v in data[0].items()}
  mesh = one_device()
  # the same optimizer in both runs (weight decay, a constant schedule): the lengths differ
  runs = {}
  for name, seq in (("padded", [data[0], empty, data[1]]), ("plain", data)):
    session = make_session(m, cfg(weight_decay=0.1, lr=1e-3), mesh, 3)
    with jax.set_mesh(mesh):
      state = session.init_state()
      for b in seq:
        state, metrics = session.step(state, session.frozen, session.put_batch([b]))
        assert bool(metrics["loss_finite"]) and bool(metrics["grad_finite"])
    runs[name] = jax.device_get(state)
  padded, plain = runs["padded"], runs["plain"]
  assert int(padded.step) == int(plain.step) == 2
  for a, b in zip(jax.tree.leaves((padded.params, padded.opt_state)),
                  jax.tree.leaves((plain.params, plain.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_three_steps_equal_torch_adamw_with_clipping_decay_mask_and_schedule(model_dir, tmp_path):
  """Accumulated microbatches, global-norm clipping, AdamW with decay on matrices only, warmup then
  cosine: the parameters after 3 steps equal torch.optim.AdamW's on the same weights and tokens
  (its loss from one unpacked forward per example), the lr the documented schedule's (SFT.md)."""
  import glob
  import math

  import torch
  from safetensors.numpy import load_file

  from persyn_jax.models import save_pretrained
  path, torch_model = model_dir("llama_bias")
  m, tok = from_pretrained(path, dtype="float32")
  data = batches(tok, 6, 2, SEQ)
  lr, steps, warm, end = 3e-3, 3, 1, 3e-4
  config = cfg(lr=lr, grad_accum=2, warmup_steps=warm, schedule="cosine", min_lr_ratio=0.1,
               weight_decay=0.1, grad_clip=0.5, b2=0.99)
  ref = type(torch_model)(torch_model.config).double()
  ref.load_state_dict(torch_model.state_dict())
  named = list(ref.named_parameters())
  opt = torch.optim.AdamW([{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": 0.1},
                           {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}],
                          betas=(0.9, 0.99), eps=1e-8)
  session = make_session(m, config, one_device(), steps)
  with jax.set_mesh(session.mesh):
    state = session.init_state()
    for i in range(steps):
      group = data[2 * i:2 * i + 2]
      state, metrics = session.step(state, session.frozen, session.put_batch(group))
      nll, count = 0.0, 0
      for b in group:
        for r, s in zip(*np.nonzero(np.diff(b["segment_ids"], prepend=0, axis=1) > 0)):
          seg = b["segment_ids"][r] == b["segment_ids"][r, s]
          ids = torch.as_tensor(b["input_ids"][r][seg], dtype=torch.long)
          mask = torch.as_tensor(b["loss_mask"][r][seg][:-1] > 0)
          logp = torch.log_softmax(ref(ids[None]).logits[0, :-1], -1)
          nll = nll - logp.gather(-1, ids[1:, None])[:, 0][mask].sum()
          count += int(mask.sum())
      opt.zero_grad()
      loss = nll / count
      loss.backward()
      norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
      p = (i - warm + 1) / (steps - warm + 1)
      want_lr = lr * (i + 1) / warm if i < warm else end + (lr - end) * (1 + math.cos(math.pi * p)) / 2
      for g in opt.param_groups:
        g["lr"] = want_lr
      opt.step()
      np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
      np.testing.assert_allclose(float(metrics["grad_norm"]), float(norm), rtol=1e-4)
      np.testing.assert_allclose(float(metrics["lr"]), want_lr, rtol=1e-6)
    assert float(metrics["grad_norm"]) > 0.5  # the clipping was in play
    save_pretrained(session.model(state.params), None, str(tmp_path), dtype="float32")
  ours = {}
  for f in glob.glob(str(tmp_path / "*.safetensors")):
    ours.update(load_file(f))
  assert set(ours) == {n for n, _ in named}
  # Adam moves a weight by about lr whatever its gradient's size: fp32 vs fp64 rounding of a
  # near-zero gradient shows as a fraction of lr at a few weights (weights moved by up to ~3·lr)
  for n, p in named:
    np.testing.assert_allclose(ours[n], p.detach().numpy(), rtol=0, atol=0.02 * lr, err_msg=n)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_packed_loss_is_the_sum_of_torch_per_example_losses(model_dir, arch):
  """Examples packed into rows (segment ids, positions restarting per segment) give the summed
  response-token cross-entropy that transformers computes on each example alone; also with
  sliding windows shorter than the examples (Mistral's: there a leak across segments would not
  reach the answers, Llama's full attention and Gemma 2's global layers show one) and Gemma 2's
  logit soft-capping."""
  import torch
  path, tmodel = model_dir(arch)
  m, tok = from_pretrained(path, dtype="float32")
  exs = examples(tok, 5)
  want, count = 0.0, 0
  for ids, mask in exs:
    with torch.no_grad():
      logp = torch.log_softmax(tmodel(torch.tensor([ids])).logits[0].double(), -1).numpy()
    resp = np.asarray(mask[1:], bool)  # targets ids[1:], response tokens only
    want -= logp[np.arange(len(ids) - 1), ids[1:]][resp].sum()
    count += resp.sum()
  batch = pack(exs, 2, SEQ, per_row=3)
  assert batch["segment_ids"].max() == 3
  total, aux = nnx.jit(loss_sums)(m, {k: jnp.asarray(v) for k, v in batch.items()})
  assert float(aux["count"]) == count
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
