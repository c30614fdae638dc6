"""Our Flax decoders against transformers' PyTorch models on the same (random, seeded) weights."""
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

import tiny
from persyn_jax import sharding as shd
from persyn_jax.models import CheckpointError, from_pretrained, save_pretrained

ARCHS = list(tiny.ARCHS)
B, S = 4, 13


def batch(vocab, seed=0):
  """Mixed lengths: row 1 left-padded, row 2 right-padded, row 3 both (4 pads)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, vocab, (B, S))
  mask = np.ones((B, S), np.int64)
  mask[1, :4] = 0
  mask[2, 9:] = 0
  mask[3, :2] = 0
  mask[3, 11:] = 0
  return ids, mask


def torch_logits(tm, ids, mask):
  # transformers' plain forward numbers positions 0..S-1 whatever the mask; ours follow the mask
  # (as generate() does), so the reference gets the same positions explicitly.
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(pos))
  return (out.logits if hasattr(out, "logits") else out).float().numpy()


@nnx.jit
def forward(model, ids, mask):
  return model(ids, mask)


def rel_err(out, ref, mask):
  m = mask.astype(bool)
  return np.abs(np.asarray(out, np.float32) - ref)[m].max() / np.abs(ref[m]).max()


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_logits_match_transformers(arch, model_dir):
  path, tm = model_dir(arch)
  model, _ = from_pretrained(path, dtype="float32")
  ids, mask = batch(model.config.vocab_size)
  ref = torch_logits(tm, ids, mask)
  out = forward(model, jnp.asarray(ids), jnp.asarray(mask))
  assert out.shape == ref.shape
  assert rel_err(out, ref, mask) <= 1e-4


def test_a_mask_with_zeros_inside_a_row_numbers_positions_as_transformers(model_dir):
  """An attention mask with a run of zeros between tokens (not only padding at the ends): the
  tokens after it see those before it and take positions cumsum(mask) - 1, as in transformers'
  generate; not positions restarted after the gap."""
  path, tm = model_dir("llama")
  model, _ = from_pretrained(path, dtype="float32")
  ids, mask = batch(model.config.vocab_size, seed=6)
  mask[0, 5:7] = 0
  mask[1, 8] = 0  # after left padding
  ref = torch_logits(tm, ids, mask)
  assert rel_err(forward(model, jnp.asarray(ids), jnp.asarray(mask)), ref, mask) <= 1e-4


# Trimmed or older config.json files: each key left out (or set) means what it means to
# transformers, whose config class fills in the defaults and the derived keys.
TRIMMED = [
    ("qwen2", dict(sliding_window=5, use_sliding_window=True, max_window_layers=1), {},
     ["layer_types"]),  # v4 layout: only layers >= max_window_layers slide
    ("qwen3", dict(sliding_window=5, use_sliding_window=True, max_window_layers=1), {},
     ["layer_types"]),
    ("gemma2", {}, {}, ["query_pre_attn_scalar", "attn_logit_softcapping",
                        "final_logit_softcapping"]),  # 256, 50, 30
    ("gemma3", {}, {}, ["query_pre_attn_scalar", "sliding_window"]),  # 256, 4096
    ("gemma3", {}, {"attn_logit_softcapping": 5.0}, []),  # transformers' Gemma 3 ignores it
    ("phi3", {}, {}, ["rms_norm_eps"]),  # 1e-5
    # keys a family's transformers model does not read: Llama has no sliding window, Phi-3 slides
    # on every layer and has no biases, Mistral has no biases
    ("llama", {}, {"sliding_window": 5, "layer_types": ["sliding_attention"] * 2}, []),
    ("phi3", {}, {"layer_types": ["full_attention", "sliding_attention"],
                  "attention_bias": True}, []),
    ("mistral", {}, {"attention_bias": True, "mlp_bias": True}, []),
    ("llama", {}, {"hidden_activation": "gelu_pytorch_tanh"}, []),  # Gemma's key; Llama's is silu
    # llama3 RoPE: a top-level original_max_position_embeddings (32) wins over the table's (16)
    ("llama", {}, {"original_max_position_embeddings": 32}, []),
]


@pytest.mark.parametrize("arch,made,setk,drop", TRIMMED,
                         ids=[f"{a}-{'-'.join(d) or '-'.join(k)}" for a, _, k, d in TRIMMED])
def test_a_trimmed_config_means_what_it_means_to_transformers(arch, made, setk, drop, model_dir,
                                                             tmp_path):
  import json
  src, _ = model_dir(arch, **made)
  path = str(tmp_path / arch)
  shutil.copytree(src, path)
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  for k in drop:
    del cfg[k]
  cfg.update(setk)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  tm = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="eager").eval()
  model, _ = from_pretrained(path, dtype="float32")
  ids, mask = batch(model.config.vocab_size)
  ref = torch_logits(tm, ids, mask)
  assert rel_err(forward(model, jnp.asarray(ids), jnp.asarray(mask)), ref, mask) <= 1e-4


def test_qwen_windows_follow_max_window_layers_without_transformers_defaults(monkeypatch):
  """The Qwen rule (layers from max_window_layers on slide) also where transformers' config class
  gives no layer_types (older transformers): our own fallback, not every layer."""
  from persyn_jax.models import config as mc
  monkeypatch.setattr(mc, "_with_hf_defaults", lambda hf, mt: hf)
  base = dict(model_type="qwen2", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              vocab_size=300, intermediate_size=64, sliding_window=5, use_sliding_window=True)
  assert mc.config_from_hf({**base, "max_window_layers": 1}).sliding_layers == (False, True, True)
  assert mc.config_from_hf({**base, "max_window_layers": 0}).sliding_layers == (True,) * 3
  assert not any(mc.config_from_hf(base).sliding_layers)  # the default 28 >= 3 layers


def test_llama3_pretraining_length_follows_transformers_without_its_defaults(monkeypatch):
  """transformers' standardize_rope_params: a llama3 table without original_max_position_embeddings
  takes max_position_embeddings, and a top-level original_max_position_embeddings replaces the
  table's own; also where transformers' config class fills in nothing (older transformers)."""
  from persyn_jax.models import config as mc
  monkeypatch.setattr(mc, "_with_hf_defaults", lambda hf, mt: hf)
  table = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
  base = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=300, intermediate_size=64, max_position_embeddings=64)
  omax = lambda **kw: mc.config_from_hf({**base, **kw}).rope.original_max_position_embeddings
  assert omax(rope_scaling=table) == 64
  assert omax(rope_parameters=table) == 64
  assert omax(rope_scaling={**table, "original_max_position_embeddings": 16}) == 16
  assert omax(rope_scaling={**table, "original_max_position_embeddings": 16},
              original_max_position_embeddings=32) == 32
  nested = {"full_attention": table, "sliding_attention": {"rope_type": "default"}}
  assert mc.config_from_hf({**base, "model_type": "gemma3_text", "rope_parameters": nested}
                           ).rope.original_max_position_embeddings == 64


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_long_rows_in_causal_query_blocks_match_transformers(arch, model_dir):
  """From 128 tokens on, a forward without a cache scores its queries in causal blocks that skip
  the future keys (kernels.attention.causal_blocks); the logits still equal transformers', with
  left and right padding, a sliding window and a softcap (gemma2)."""
  path, tm = model_dir(arch, max_position_embeddings=256)
  model, _ = from_pretrained(path, dtype="float32")
  rng = np.random.default_rng(5)
  ids = rng.integers(4, model.config.vocab_size, (2, 200))
  mask = np.ones((2, 200), np.int64)
  mask[0, :37] = 0
  mask[1, 150:] = 0
  ref = torch_logits(tm, ids, mask)
  out = forward(model, jnp.asarray(ids), jnp.asarray(mask))
  assert rel_err(out, ref, mask) <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_8_devices_match_transformers(arch, model_dir):
  assert len(jax.devices()) == 8
  path, tm = model_dir(arch)
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  model, _ = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
  q = model.model.layers.attn.q.w[...]  # stacked over layers: [L, D, N, H]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8
  ids, mask = batch(model.config.vocab_size, seed=1)
  ref = torch_logits(tm, ids, mask)
  with jax.set_mesh(mesh):
    sh = shd.batch_sharding(mesh, ids.shape)
    out = forward(model, jax.device_put(jnp.asarray(ids), sh), jax.device_put(jnp.asarray(mask), sh))
  assert rel_err(out, ref, mask) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_bf16_logits_close_to_fp32_reference(arch, model_dir):
  # bf16 keeps 8 mantissa bits (relative rounding 2**-8 = 0.4%). Weights, activations and the
  # attention probabilities are each rounded; through 2 layers of ~6 rounded stages each, with
  # residual sums, the error compounds to a few percent of the logit scale. 5% of max|ref| bounds
  # it with margin, while a real bug (a wrong norm, rope or mask) moves logits by O(100%).
  path, tm = model_dir(arch)
  model, _ = from_pretrained(path, dtype="bfloat16")
  assert model.model.embed[...].dtype == jnp.bfloat16
  ids, mask = batch(model.config.vocab_size, seed=2)
  ref = torch_logits(tm, ids, mask)
  out = forward(model, jnp.asarray(ids), jnp.asarray(mask))
  assert rel_err(out, ref, mask) <= 5e-2
  m = mask.astype(bool)
  agree = (np.asarray(out).argmax(-1) == ref.argmax(-1))[m].mean()
  assert agree >= 0.9


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_roundtrips_through_transformers(arch, model_dir, tmp_path):
  path, tm = model_dir(arch)
  model, tok = from_pretrained(path, dtype="float32")
  out_dir = str(tmp_path / "saved")
  save_pretrained(model, tok, out_dir)
  loaded = T.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager")
  loaded.eval()
  ids, mask = batch(model.config.vocab_size, seed=3)
  ref = torch_logits(tm, ids, mask)
  assert rel_err(torch_logits(loaded, ids, mask), ref, mask) <= 1e-5
  assert T.AutoTokenizer.from_pretrained(out_dir)("3 + 4")["input_ids"] == tok("3 + 4")["input_ids"]
  again, _ = from_pretrained(out_dir, dtype="float32")
  assert rel_err(forward(again, jnp.asarray(ids), jnp.asarray(mask)), ref, mask) <= 1e-4


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_save_pretrained_keeps_gemma_attention_biases(arch, model_dir, tmp_path):
  """Gemma's q/k/v/o biases (attention_bias) are in the saved config.json, so transformers reads
  the saved model with them."""
  path, tm = model_dir(arch, attention_bias=True)
  model, _ = from_pretrained(path, dtype="float32")
  out_dir = str(tmp_path / "saved")
  save_pretrained(model, None, out_dir)
  loaded = T.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
  ids, mask = batch(model.config.vocab_size, seed=3)
  ref = torch_logits(tm, ids, mask)
  assert rel_err(forward(model, jnp.asarray(ids), jnp.asarray(mask)), ref, mask) <= 1e-4
  assert rel_err(torch_logits(loaded, ids, mask), ref, mask) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_reward_head_matches_sequence_classification(arch, model_dir):
  path, tm = model_dir(arch, classifier=True)
  model, _ = from_pretrained(path, dtype="float32")
  assert type(model).__name__ == "SequenceClassifier"
  ids, mask = batch(model.config.vocab_size, seed=4)
  # transformers pools at the last non-pad token by input_ids == pad_token_id
  ids = np.where(mask == 1, ids, tm.config.pad_token_id)
  ref = torch_logits(tm, ids, mask)
  out = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
  assert out.shape == (B, 1)
  np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())


# ---- errors name the problem ---------------------------------------------------------------

def copy_dir(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_unsupported_model_type_lists_supported(model_dir, tmp_path):
  path = copy_dir(model_dir("llama")[0], tmp_path / "m")
  tiny.edit_config(path, model_type="gpt2")
  with pytest.raises(CheckpointError, match=r"'gpt2' is not supported; supported: llama, mistral"):
    from_pretrained(path)


# Configs transformers reads but that ask for what the decoder does not compute: a clear error,
# not other logits.
UNSUPPORTED = [
    # transformers' Phi-3 rotates only the first half of each head here
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                  "partial_rotary_factor": 0.5}},
     r"rope_parameters.partial_rotary_factor=0.5: partial rotary is not supported"),
    # transformers' Gemma 3 attends both ways (EmbeddingGemma)
    ("gemma3", {"use_bidirectional_attention": True},
     r"use_bidirectional_attention=true .* is not supported"),
    ("qwen3", {"layer_types": ["full_attention", "chunked_attention"]},
     r"layer_types \['chunked_attention'\] are not supported"),
    # sliding layers without a window: transformers' sliding-window mask raises on these files
    # (and Gemma 3 would give those layers its local RoPE theta), not a model that attends globally
    ("gemma3", {"sliding_window": None},
     r"layer_types has sliding_attention layers, but no sliding window is set "
     r"\(sliding_window = None\)"),
    ("gemma2", {"sliding_window": None}, r"no sliding window is set \(sliding_window = None\)"),
    ("qwen2", {"sliding_window": 4, "use_sliding_window": False,
               "layer_types": ["sliding_attention", "full_attention"]},
     r"no sliding window is set \(sliding_window = 4, use_sliding_window = false\)"),
    ("mistral", {"sliding_window": None, "layer_types": ["sliding_attention", "full_attention"]},
     r"no sliding window is set \(sliding_window = None\)"),
]


@pytest.mark.parametrize("arch,fields,match", UNSUPPORTED,
                         ids=[f"{a}-{'-'.join(f)}" for a, f, _ in UNSUPPORTED])
def test_a_config_asking_for_what_we_do_not_compute_is_refused(arch, fields, match, model_dir,
                                                               tmp_path):
  path = copy_dir(model_dir(arch)[0], tmp_path / "m")
  tiny.edit_config(path, **fields)
  with pytest.raises(CheckpointError, match=match):
    from_pretrained(path)


def _rewrite_weights(src_path, dst_path, fn):
  from safetensors.torch import load_file, save_file
  path = copy_dir(src_path, dst_path)
  sd = load_file(os.path.join(path, "model.safetensors"))
  save_file(fn(dict(sd)), os.path.join(path, "model.safetensors"))
  return path


@pytest.mark.parametrize("same", [False, True], ids=["other-values", "equal"])
def test_a_head_the_weights_hold_apart_from_a_tied_embedding_loads_as_transformers_does(
    same, model_dir, tmp_path):
  """tie_word_embeddings=true, but the weights also hold an lm_head.weight: transformers
  (PreTrainedModel.tie_weights) leaves the head untied when its values differ from the
  embedding's, and ties it when they are equal. Saved again, transformers reads the same model."""
  def add_head(sd):
    emb = sd["model.embed_tokens.weight"]
    sd["lm_head.weight"] = emb.clone() if same else \
        torch.randn(emb.shape, generator=torch.Generator().manual_seed(3)) * 0.15
    return sd

  path = _rewrite_weights(model_dir("qwen2")[0], tmp_path / "m", add_head)  # tied
  tm = T.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model, tok = from_pretrained(path, dtype="float32")
  assert model.config.tie_embeddings == same
  assert any("loaded untied" in str(w.message) for w in caught) != same
  ids, mask = batch(model.config.vocab_size, seed=5)
  ref = torch_logits(tm, ids, mask)
  assert rel_err(forward(model, jnp.asarray(ids), jnp.asarray(mask)), ref, mask) <= 1e-4
  save_pretrained(model, tok, str(tmp_path / "saved"))
  loaded = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"),
                                                  attn_implementation="eager").eval()
  assert rel_err(torch_logits(loaded, ids, mask), ref, mask) <= 1e-5


def test_a_tied_model_stored_through_its_head_only_loads_as_transformers_does(model_dir,
                                                                             tmp_path):
  """tie_word_embeddings=true and only lm_head.weight stored (no model.embed_tokens.weight):
  transformers ties the embedding to the stored head; so do we, rather than refuse the file."""
  def head_only(sd):
    sd["lm_head.weight"] = torch.randn(sd.pop("model.embed_tokens.weight").shape,
                                       generator=torch.Generator().manual_seed(4)) * 0.15
    return sd

  path = _rewrite_weights(model_dir("qwen2")[0], tmp_path / "m", head_only)  # tied
  tm = T.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
  model, _ = from_pretrained(path, dtype="float32")
  ids, mask = batch(model.config.vocab_size, seed=7)
  ref = torch_logits(tm, ids, mask)
  assert rel_err(forward(model, jnp.asarray(ids), jnp.asarray(mask)), ref, mask) <= 1e-4


def test_missing_tensor_is_named(model_dir, tmp_path):
  path = _rewrite_weights(model_dir("llama")[0], tmp_path / "m",
                          lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k})
  with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
    from_pretrained(path)


def test_unexpected_tensor_is_named(model_dir, tmp_path):
  path = _rewrite_weights(model_dir("llama")[0], tmp_path / "m",
                          lambda sd: {**sd, "model.extra.weight": torch.zeros(2)})
  with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.extra.weight'\]"):
    from_pretrained(path)


def test_misshaped_tensor_names_both_shapes(model_dir, tmp_path):
  def cut(sd):
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:8]
    return sd
  path = _rewrite_weights(model_dir("llama")[0], tmp_path / "m", cut)
  with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                                            r"\(8, 32\), expected \(16, 32\)"):
    from_pretrained(path)


def test_pickle_checkpoint_is_refused(model_dir, tmp_path):
  path = copy_dir(model_dir("llama")[0], tmp_path / "m")
  os.remove(os.path.join(path, "model.safetensors"))
  torch.save({"x": torch.zeros(1)}, os.path.join(path, "pytorch_model.bin"))
  with pytest.raises(CheckpointError, match=r"pytorch_model.bin: pickle checkpoints are refused"):
    from_pretrained(path)


def test_truncated_safetensors_is_named(model_dir, tmp_path):
  path = copy_dir(model_dir("llama")[0], tmp_path / "m")
  f = os.path.join(path, "model.safetensors")
  data = open(f, "rb").read()
  open(f, "wb").write(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* truncated or corrupt"):
    from_pretrained(path)


def test_sharded_index_checkpoint_loads(model_dir, tmp_path):
  path, tm = model_dir("qwen3")
  out = str(tmp_path / "sharded")
  tm.save_pretrained(out, max_shard_size="20KB")
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  shutil.copy(os.path.join(path, "tokenizer.json"), out)
  shutil.copy(os.path.join(path, "tokenizer_config.json"), out)
  model, _ = from_pretrained(out, dtype="float32")
  ids, mask = batch(model.config.vocab_size)
  assert rel_err(forward(model, jnp.asarray(ids), jnp.asarray(mask)), torch_logits(tm, ids, mask), mask) <= 1e-4


@pytest.mark.parametrize("first_shard_bytes,second_shard_bytes", [(20_000, 4 << 30),
                                                                   (4 << 30, 20_000),
                                                                   (20_000, 40_000)])
def test_saving_over_an_earlier_save_leaves_only_the_new_weights(model_dir, tmp_path,
                                                                 first_shard_bytes,
                                                                 second_shard_bytes):
  """Model b saved into the directory of model a, sharded differently: the directory holds only b's
  weight files, and both our loader and transformers read b. Before, a single-file save over a
  sharded one left the old index (which we read first: model a) and a sharded save over another
  left old shards."""
  from persyn_jax.models.hf import save_params
  a, _ = from_pretrained(model_dir("llama")[0], dtype="float32")
  path_b, tm_b = model_dir("llama", seed=1)
  b, _ = from_pretrained(path_b, dtype="float32")
  out = str(tmp_path / "saved")
  os.makedirs(out)
  save_params(a, out, max_shard_bytes=first_shard_bytes)
  save_params(b, out, max_shard_bytes=second_shard_bytes)
  names = sorted(n for n in os.listdir(out) if "safetensors" in n)
  if second_shard_bytes > 1 << 20:
    assert names == ["model.safetensors"]
  else:
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert names == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})
  for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(path_b, f), out)
  both_loaders_read(out, tm_b)


def both_loaders_read(out, tm):
  """transformers' loader and ours both read `out` as the torch model `tm` (its logits)."""
  ids, mask = batch(tm.config.vocab_size)
  ref = torch_logits(tm, ids, mask)
  loaded = T.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert rel_err(torch_logits(loaded, ids, mask), ref, mask) <= 1e-5
  model, _ = from_pretrained(out, dtype="float32")
  assert rel_err(forward(model, jnp.asarray(ids), jnp.asarray(mask)), ref, mask) <= 1e-4


def test_a_directory_with_both_weight_layouts_loads_what_transformers_loads(model_dir, tmp_path):
  """model.safetensors beside an index of other weights: transformers reads model.safetensors
  first; so do we."""
  path, tm = model_dir("qwen3")
  other = model_dir("qwen3", seed=1)[1]
  out = copy_dir(path, tmp_path / "both")
  other.save_pretrained(str(tmp_path / "other"), max_shard_size="20KB")
  for f in os.listdir(tmp_path / "other"):
    if f.startswith("model-") or f.endswith(".index.json"):
      shutil.copy(tmp_path / "other" / f, out)
  both_loaders_read(out, tm)


def test_missing_tokenizer_is_named(model_dir, tmp_path):
  path = copy_dir(model_dir("llama")[0], tmp_path / "m")
  for f in os.listdir(path):
    if f.startswith("tokenizer"):
      os.remove(os.path.join(path, f))
  with pytest.raises(CheckpointError, match=r"no tokenizer files"):
    from_pretrained(path)
  model, tok = from_pretrained(path, tokenizer=False)
  assert tok is None


def test_remote_code_config_is_refused(model_dir, tmp_path):
  path = copy_dir(model_dir("llama")[0], tmp_path / "m")
  tiny.edit_config(path, auto_map={"AutoModelForCausalLM": "modeling_x.X"})
  with pytest.raises(CheckpointError, match="remote code"):
    from_pretrained(path)


def test_tokenizer_is_the_one_transformers_loads(model_dir):
  for arch in ("qwen2", "llama"):
    path, _ = model_dir(arch)
    _, loaded = from_pretrained(path, dtype="float32")
    ref = T.AutoTokenizer.from_pretrained(path)
    text = "Step 12 + 345 = 357. The answer is 357."
    assert type(loaded) is type(ref)
    assert loaded(text)["input_ids"] == ref(text)["input_ids"]


SHARDED_FORWARD = """
import sys, numpy as np, jax
from flax import nnx
from persyn_jax import sharding as shd
from persyn_jax.models import from_pretrained
mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
m, _ = from_pretrained(sys.argv[1], dtype="float32", mesh=mesh)
ids = (np.arange(64, dtype=np.int32).reshape(8, 8) % 50 + 3)
put = lambda x: jax.device_put(x, shd.batch_sharding(mesh, x.shape))
g, s = nnx.split(m)
with jax.set_mesh(mesh):
  out = jax.jit(lambda s, i, k: nnx.merge(g, s)(i, k))(s, put(ids), put(np.ones_like(ids)))
print(out.shape)
"""


def test_the_sharded_embedding_lookup_needs_no_rematerialization(model_dir):
  """On a mesh sharding the table on both axes (vocab on tensor, embed on fsdp) and the ids on
  (data, fsdp), XLA partitions the lookup without falling back to replicating it (it prints
  'Involuntary full rematerialization' when it does)."""
  import subprocess
  import sys
  path, _ = model_dir("llama")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARDED_FORWARD, path], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "(8, 8," in proc.stdout
  assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-2000:]
