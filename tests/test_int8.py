"""Weight-only int8 teachers (qwix): the decoder's projections are stored in int8, the rest as
loaded; the error against the same model in bf16 stays small on tiny random models (the table in
docs/INT8.md comes from `int8_error`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("qwix", reason="the int8 extra: pip install 'persyn_jax[int8]'")

from persyn_jax import sharding as shd  # noqa: E402
from persyn_jax.models import load_model  # noqa: E402
from persyn_jax.models.quant import is_quantized, quantize_model  # noqa: E402
from persyn_jax.sampling import SamplingConfig, generate  # noqa: E402

PROMPTS = ["hello world", "Tom has 12 apples and gives 5 to Ann.", "def f(x):", "Once upon",
           "The answer is", "how are you today?", "Step 1: 3 + 4", "a tiny language model"]
NEW = 16


def int8_error(path: str, tok) -> dict:
  """Logit error and greedy agreement of the int8 model against the bf16 one (same weights)."""
  bf16, _ = load_model(path, dtype="bfloat16", tokenizer=False)
  int8, _ = load_model(path, dtype="bfloat16", tokenizer=False, quantize="int8")
  enc = tok(PROMPTS, padding=True, return_tensors="np")
  mask = enc["attention_mask"].astype(bool)
  a = np.asarray(bf16(enc["input_ids"], enc["attention_mask"]))[mask]
  b = np.asarray(int8(enc["input_ids"], enc["attention_mask"]))[mask]
  cfg = SamplingConfig(temperature=0.0, max_new_tokens=NEW, batch_size=8, stop_token_ids=())
  ga = [r.token_ids for r in generate(bf16, tok, PROMPTS, cfg)]
  gb = [r.token_ids for r in generate(int8, tok, PROMPTS, cfg)]
  same = [int(np.argmax(np.asarray(x) != np.asarray(y))) if x != y else NEW for x, y in zip(ga, gb)]
  return {"max_abs_logit_err": float(np.max(np.abs(a - b))),
          "rel_logit_err": float(np.sqrt(np.mean((a - b) ** 2) / np.mean(a ** 2))),
          "next_token_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
          "greedy_prefix_agreement": float(np.mean(same) / NEW),
          "greedy_identical": float(np.mean([x == y for x, y in zip(ga, gb)]))}


def test_the_decoder_projections_are_int8_and_the_rest_is_not(model_dir):
  path, _ = model_dir("qwen2")
  model, _ = load_model(path, dtype="bfloat16", tokenizer=False, quantize="int8")
  assert is_quantized(model)
  dtypes = {"/".join(map(str, p)): v.get_value().dtype
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  # the blocks are stacked over layers: one int8 array per projection holds every layer
  assert dtypes["model/layers/attn/q/w/array/qvalue"] == jnp.int8
  assert dtypes["model/layers/mlp/down/w/array/qvalue"] == jnp.int8
  # one scale per output channel and layer: q's [L, 1, N, H] for its L x D x N x H weight
  cfg = model.config
  scale = model.model.layers.attn.q.w.array.scale[...]
  assert scale.shape == (cfg.num_layers, 1, cfg.num_heads, cfg.head_dim)
  for name in ("model/embed", "model/final_norm/scale", "model/layers/attn/q_bias/b"):
    assert dtypes[name] == jnp.bfloat16
  int8 = sum(d == jnp.int8 for d in dtypes.values())
  assert int8 == 7


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_int8_error_against_bf16_on_tiny_models(model_dir, tok, arch):
  """Weight-only int8 with per-channel scales perturbs each weight by at most half a step
  (absmax / 254); through 2 layers of random weights that is a few percent of the logits' RMS.
  Greedy decoding agrees on most next tokens; exact sequences can part where two logits tie
  within that error (random tiny models have many near ties)."""
  path, _ = model_dir(arch)
  e = int8_error(path, tok)
  assert e["rel_logit_err"] < 0.05, e
  assert e["next_token_agreement"] >= 0.9, e
  assert e["greedy_prefix_agreement"] >= 0.5, e
  # docs/INT8.md reports these numbers: its row agrees up to its rounding, and a token or two
  doc = documented_error(arch)
  assert abs(doc["max_abs_logit_err"] - e["max_abs_logit_err"]) <= 0.05 * doc["max_abs_logit_err"]
  assert abs(doc["rel_logit_err"] - e["rel_logit_err"]) <= 0.001, (doc, e)
  assert abs(doc["next_token_agreement"] - e["next_token_agreement"]) <= 1.01 / 91, (doc, e)
  assert abs(doc["greedy_prefix_agreement"] - e["greedy_prefix_agreement"]) <= 2.01 / 128, (doc, e)
  assert abs(doc["greedy_identical"] - e["greedy_identical"]) <= 1 / 8, (doc, e)


def documented_error(arch: str) -> dict:
  """The row of `arch` in docs/INT8.md's error table, as int8_error's numbers."""
  import os
  with open(os.path.join(os.path.dirname(__file__), "..", "docs", "INT8.md")) as f:
    row = next(line for line in f if line.startswith(f"| {arch} |"))
  cells = [c.strip() for c in row.strip().strip("|").split("|")][1:]
  pct = lambda c: float(c.rstrip("%")) / 100
  same, n = map(int, cells[4].split("/"))
  return {"max_abs_logit_err": float(cells[0]), "rel_logit_err": pct(cells[1]),
          "next_token_agreement": pct(cells[2]), "greedy_prefix_agreement": pct(cells[3]),
          "greedy_identical": same / n}


def test_an_int8_teacher_samples_on_the_serving_layout(model_dir, tok):
  """int8 and the kv-head copies together (tensor 4 over 2 kv heads): greedy tokens equal the
  one-device int8 model's."""
  path, _ = model_dir("llama")
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=1, tensor=4), jax.devices()[:8])
  one, _ = load_model(path, dtype="float32", tokenizer=False, quantize="int8")
  model, _ = load_model(path, dtype="float32", tokenizer=False, quantize="int8", mesh=mesh,
                        rules=shd.SERVING)
  assert model.config.num_kv_heads == 4
  qv = model.model.layers.attn.k.w.array.qvalue[...]  # [L, D, K, H]
  assert qv.dtype == jnp.int8 and qv.sharding.spec[2] == "tensor"
  cfg = SamplingConfig(temperature=0.0, max_new_tokens=8, batch_size=4, stop_token_ids=())
  want = [r.token_ids for r in generate(one, tok, PROMPTS[:4], cfg)]
  assert [r.token_ids for r in generate(model, tok, PROMPTS[:4], cfg, mesh=mesh)] == want


def test_unknown_modes_are_refused_by_name(model_dir):
  from persyn_jax.run_config import ModelRef
  path, _ = model_dir("llama")
  model, _ = load_model(path, dtype="bfloat16", tokenizer=False)
  with pytest.raises(ValueError, match="quantize='int4'"):
    quantize_model(model, "int4", what=path)
  with pytest.raises(ValueError, match="model 't': quantize='fp8'"):
    ModelRef("t", path, quantize="fp8")
