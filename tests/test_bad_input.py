"""Bad input: each case is a clear error naming the file, field or value, or a counted skip, never
a traceback from deep inside JAX or transformers. docs/FAILURES.md lists every case with the test
that backs it (some live in test_models.py, test_data_*.py, test_sampler.py, test_scoring.py).
"""
import dataclasses
import json
import os
import shutil
import struct

import numpy as np
import pytest

import tiny
from persyn_jax import config as C
from persyn_jax.data import records as R
from persyn_jax.data import sources as S
from persyn_jax.models import CheckpointError, from_pretrained

def copy_model(model_dir, tmp_path, arch="llama", **kw):
  src = model_dir(arch, **kw)[0]
  dst = str(tmp_path / "m")
  shutil.copytree(src, dst)
  return dst


def edit_header(path, fn):
  """Rewrites the JSON header of model.safetensors (data section unchanged)."""
  p = os.path.join(path, "model.safetensors")
  data = open(p, "rb").read()
  (n,) = struct.unpack("<Q", data[:8])
  header = fn(json.loads(data[8:8 + n]))
  hb = json.dumps(header).encode()
  hb += b" " * (-len(hb) % 8)
  open(p, "wb").write(struct.pack("<Q", len(hb)) + hb + data[8 + n:])


def retype(path, tensor, dtype):
  """Declares `tensor` as `dtype` in the safetensors header (its bytes unchanged)."""
  def edit(h):
    h[tensor]["dtype"] = dtype
    return h
  edit_header(path, edit)


# -- weights ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,match", [
    (b"hello", r"model.safetensors: not a safetensors file \(only 5 bytes\)"),
    (bytes(range(256)) * 20, r"model.safetensors: header size \d+ is larger than the file"),
])
def test_a_file_that_is_not_safetensors_is_named(model_dir, tmp_path, content, match):
  path = copy_model(model_dir, tmp_path)
  open(os.path.join(path, "model.safetensors"), "wb").write(content)
  with pytest.raises(CheckpointError, match=match):
    from_pretrained(path)


def test_a_header_whose_dtype_disagrees_with_the_data_is_named(model_dir, tmp_path):
  path = copy_model(model_dir, tmp_path)
  retype(path, "model.embed_tokens.weight", "F64")  # twice the bytes the data section holds
  with pytest.raises(CheckpointError, match=r"tensor 'model.embed_tokens.weight' \(shape \[\d+, 32\], "
                                            r"F64\) needs bytes .*truncated or corrupt"):
    from_pretrained(path)


def test_an_unknown_dtype_is_named(model_dir, tmp_path):
  path = copy_model(model_dir, tmp_path)
  retype(path, "model.norm.weight", "F8_E4M3")
  with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has unsupported dtype 'F8_E4M3'"):
    from_pretrained(path)


@pytest.mark.parametrize("edit", ["not_a_dict", "no_offsets"])
def test_a_malformed_safetensors_header_is_named(model_dir, tmp_path, edit):
  path = copy_model(model_dir, tmp_path)

  def bad(h):
    if edit == "not_a_dict":
      return [1, 2]
    del h["model.norm.weight"]["data_offsets"]
    return h
  edit_header(path, bad)
  with pytest.raises(CheckpointError, match="model.safetensors"):
    from_pretrained(path)


BAD_ENTRIES = {  # field of the header entry of 'model.norm.weight' (32 F32 values) -> bad value
    "string_shape": ("shape", "32", "has a shape that is not a list of non-negative integers"),
    "string_dim": ("shape", ["32"], "has a shape that is not a list of non-negative integers"),
    "negative_dims": ("shape", [-4, -8], "has a shape that is not a list of non-negative integers"),
    "fractional_dim": ("shape", [32.5], "has a shape that is not a list of non-negative integers"),
    "boolean_dim": ("shape", [True], "has a shape that is not a list of non-negative integers"),
    # 2**64 * 2**64 elements: wraps to 0 in int64; as a Python integer it is plainly too big
    "huge_shape": ("shape", [2**64, 2**64], r"\(shape \[18446744073709551616, .*needs bytes"),
    "list_dtype": ("dtype", ["F32"], r"has unsupported dtype \['F32'\]"),
    "null_dtype": ("dtype", None, "has unsupported dtype None"),
    "negative_offsets": ("data_offsets", [-128, 0], "has data_offsets that are not two"),
    "string_offsets": ("data_offsets", ["0", "128"], "has data_offsets that are not two"),
    "reversed_offsets": ("data_offsets", [128, 0], "has data_offsets that are not two"),
    "offsets_past_the_end": ("data_offsets", [10**15, 10**15 + 128], r"needs bytes \[10+, "),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_a_bad_shape_dtype_or_offset_in_a_header_is_named(model_dir, tmp_path, case):
  """Each value is checked before it reaches numpy: no raw TypeError or ValueError from a shape
  computation, the same CheckpointError (naming the file and the tensor) as the other faults."""
  path = copy_model(model_dir, tmp_path)
  field, value, problem = BAD_ENTRIES[case]

  def edit(h):
    h["model.norm.weight"][field] = value
    return h
  edit_header(path, edit)
  with pytest.raises(CheckpointError, match=r"/model.safetensors: tensor 'model.norm.weight' .*"
                                            + problem):
    from_pretrained(path)


def _overlap(h):
  h["model.norm.weight"]["data_offsets"] = h["model.layers.0.input_layernorm.weight"]["data_offsets"]
  return h


def _nan(h):
  h["model.norm.weight"]["note"] = float("nan")  # json.dumps writes the token NaN
  return h


def _metadata_number(h):
  h["__metadata__"] = {"format": 1}
  return h


HEADER_FAULTS = {  # a file the reference reader (the safetensors library) refuses -> our error
    "overlapping_tensors": (_overlap, b"", "tensors overlap or leave a gap"),
    "trailing_bytes": (lambda h: h, b"\0" * 8, "trailing bytes"),
    "nan_token": (_nan, b"", r"unreadable safetensors header \(NaN is not JSON\)"),
    "metadata_not_strings": (_metadata_number, b"", r"__metadata__ \{\"format\": 1\} is not an object of strings"),
}


@pytest.mark.parametrize("case", sorted(HEADER_FAULTS))
def test_a_file_the_reference_reader_refuses_is_refused_and_named(model_dir, tmp_path, case):
  """Overlapping tensors (a write to one changes another), bytes past the last tensor, a NaN token
  and a non-string metadata value are all refused by the safetensors library's own reader; ours
  refuses the same bytes, naming the file."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  path = copy_model(model_dir, tmp_path)
  edit, tail, problem = HEADER_FAULTS[case]
  edit_header(path, edit)
  p = os.path.join(path, "model.safetensors")
  open(p, "ab").write(tail)
  with pytest.raises(SafetensorError):
    load_file(p)
  with pytest.raises(CheckpointError, match=r"/model.safetensors: .*" + problem):
    from_pretrained(path)


def test_a_header_with_a_byte_order_mark_is_refused_like_the_reference(model_dir, tmp_path):
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  path = copy_model(model_dir, tmp_path)
  p = os.path.join(path, "model.safetensors")
  data = open(p, "rb").read()
  (n,) = struct.unpack("<Q", data[:8])
  header = b"\xef\xbb\xbf" + data[8:8 + n].rstrip(b" ")
  header += b" " * (-len(header) % 8)
  open(p, "wb").write(struct.pack("<Q", len(header)) + header + data[8 + n:])
  with pytest.raises(SafetensorError):
    load_file(p)
  with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable safetensors header "
                                            r"\(Unexpected UTF-8 BOM"):
    from_pretrained(path)


def test_a_header_number_too_long_to_convert_is_named(model_dir, tmp_path):
  path = copy_model(model_dir, tmp_path)

  def edit(h):
    h["model.norm.weight"]["shape"] = [0]
    return h
  edit_header(path, edit)
  p = os.path.join(path, "model.safetensors")
  data = open(p, "rb").read()
  (n,) = struct.unpack("<Q", data[:8])
  header = data[8:8 + n].replace(b'"shape": [0]', b'"shape": [' + b"9" * 5000 + b"]")
  header += b" " * (-len(header) % 8)
  open(p, "wb").write(struct.pack("<Q", len(header)) + header + data[8 + n:])
  with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable safetensors header"):
    from_pretrained(path)


def test_integer_weights_are_refused_not_cast(model_dir, tmp_path):
  """A float weight stored as I32 (a mis-typed export) would load as garbage numbers."""
  path = copy_model(model_dir, tmp_path)
  retype(path, "model.norm.weight", "I32")
  with pytest.raises(CheckpointError, match=r"'model.norm.weight'.*I32|int32"):
    from_pretrained(path)


# -- config.json -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "relu", r"config.json: hidden activation 'relu' is not supported"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4},
     r"rope type 'yarn' is not supported"),
    ("partial_rotary_factor", 0.5, r"config.json: partial_rotary_factor=0.5 is not supported"),
    ("num_key_value_heads", 3, r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("head_dim", 7, r"config.json: tensor 'model.layers.0.self_attn.q_proj.weight' has shape "
                    r"\(32, 32\), expected \(28, 32\) from num_attention_heads \* head_dim = 4 \* 7"),
])
def test_unsupported_config_fields_are_named(model_dir, tmp_path, field, value, match):
  path = copy_model(model_dir, tmp_path)
  tiny.edit_config(path, **{field: value})
  with pytest.raises((CheckpointError, ValueError), match=match):
    from_pretrained(path)


@pytest.mark.parametrize("value", ["abc", None, 3.5])
def test_a_mistyped_config_field_is_named(model_dir, tmp_path, value):
  path = copy_model(model_dir, tmp_path)
  tiny.edit_config(path, hidden_size=value)
  with pytest.raises(CheckpointError, match=r"config.json: .*'hidden_size'"):
    from_pretrained(path)


@pytest.mark.parametrize("text,match", [("{not json", r"config.json: invalid JSON"),
                                        ("[1, 2]", r"config.json: .*(object|mapping|dict)")])
def test_an_unreadable_config_is_named(model_dir, tmp_path, text, match):
  path = copy_model(model_dir, tmp_path)
  open(os.path.join(path, "config.json"), "w").write(text)
  with pytest.raises(CheckpointError, match=match):
    from_pretrained(path)


def test_a_corrupt_tokenizer_is_named(model_dir, tmp_path):
  path = copy_model(model_dir, tmp_path)
  open(os.path.join(path, "tokenizer.json"), "w").write("{truncated")
  with pytest.raises(CheckpointError, match=r"/m: the tokenizer does not load \(JSONDecodeError"):
    from_pretrained(path)


@pytest.mark.parametrize("where,template,error", [
    ("chat_template.jinja", "{{ raise_exception('system turns are not supported') }}",
     r"TemplateError: system turns are not supported"),
    ("chat_template.jinja", "{% for m in messages %}{{ m.content }", r"TemplateSyntaxError: "),
    ("tokenizer_config.json", "{{ (messages | length) // 0 }}", r"ZeroDivisionError: "),
])
def test_a_chat_template_that_fails_names_the_model_and_the_template(model_dir, tmp_path, where,
                                                                      template, error):
  """Wherever the template lives (transformers 5 writes chat_template.jinja; older models keep it
  in tokenizer_config.json), its failure names the model directory and the template's file."""
  import re
  from persyn_jax.data import chat
  from persyn_jax.models import load_tokenizer
  path = copy_model(model_dir, tmp_path)
  jinja, tc = os.path.join(path, "chat_template.jinja"), os.path.join(path, "tokenizer_config.json")
  if where == "chat_template.jinja":
    open(jinja, "w").write(template)
    source = jinja
  else:
    os.remove(jinja)
    json.dump({**json.load(open(tc)), "chat_template": template}, open(tc, "w"))
    source = tc + " (its chat_template)"
  tok = load_tokenizer(path)
  assert tok.chat_template == template
  match = re.escape(source) + f": the chat template of model {re.escape(path)} fails \\({error}"
  for call in (lambda: chat.prompt_ids(tok, "hi"), lambda: chat.pair_ids(tok, "hi", "ho"),
               lambda: chat.pair_ids_batch(tok, ["hi"], ["ho"])):
    with pytest.raises(chat.ChatTemplateError, match=match):
      call()


def test_a_missing_model_directory_is_named(tmp_path):
  with pytest.raises(CheckpointError, match=r"nope: not a directory"):
    from_pretrained(str(tmp_path / "nope"))


# -- sizes and absurd values -----------------------------------------------------------------------

@pytest.mark.parametrize("name,limit", [
    ("config.json", "MAX_CONFIG_BYTES"), ("generation_config.json", "MAX_CONFIG_BYTES"),
    ("tokenizer_config.json", "MAX_TOKENIZER_CONFIG_BYTES"),
    ("chat_template.jinja", "MAX_CHAT_TEMPLATE_BYTES"),
])
def test_an_oversized_config_or_template_is_refused_before_it_is_parsed(model_dir, tmp_path, name,
                                                                         limit):
  """The file stays valid (JSON padded with whitespace, a template with a long comment): it is
  refused for its size alone, before a parser spends memory or time on it."""
  from persyn_jax.models import checks
  path = copy_model(model_dir, tmp_path)
  p = os.path.join(path, name)
  text = open(p).read()
  size = getattr(checks, limit) + 1
  pad = size - len(text.encode()) - (len("{#  #}") if name.endswith(".jinja") else 0)
  text = text + "{# " + "x" * pad + " #}" if name.endswith(".jinja") else text + " " * pad
  open(p, "w").write(text)
  assert os.path.getsize(p) == size
  with pytest.raises(CheckpointError, match=rf"m/{name}: {size} bytes, over the limit of "
                                            rf"{getattr(checks, limit)} bytes .*checks\.{limit}"):
    from_pretrained(path)


def test_a_chat_template_too_long_inside_tokenizer_config_is_refused(model_dir, tmp_path):
  from persyn_jax.models import checks, load_tokenizer
  path = copy_model(model_dir, tmp_path)
  os.remove(os.path.join(path, "chat_template.jinja"))
  tc = os.path.join(path, "tokenizer_config.json")
  n = checks.MAX_CHAT_TEMPLATE_BYTES + 1
  json.dump({**json.load(open(tc)), "chat_template": "{{ 'x' }}" + " " * (n - 9)}, open(tc, "w"))
  with pytest.raises(CheckpointError, match=rf"m: its chat template has {n} characters, over the "
                                            r"limit of \d+ \(persyn_jax.models.checks.MAX_CHAT"):
    load_tokenizer(path)


@pytest.mark.parametrize("field,value,match", [
    ("num_hidden_layers", 10**9, r"field 'num_hidden_layers' = 1000000000 is over the limit of "
                                 r"1024 \(persyn_jax.models.checks.MAX_LAYERS\)"),
    ("vocab_size", 10**12, r"field 'vocab_size' = 1000000000000 is over the limit of \d+ "
                           r"\(persyn_jax.models.checks.MAX_VOCAB\)"),
    ("hidden_size", 2**40, r"field 'hidden_size' = 1099511627776 is over the limit"),
    ("num_hidden_layers", 64, r"num_hidden_layers = 64, but the weights hold 2 layers "
                              r"\(model.layers.0 to model.layers.1\)"),
    ("vocab_size", 10007, r"tensor 'model.embed_tokens.weight' has shape \(\d+, 32\), expected "
                          r"\(10007, 32\) from vocab_size = 10007, hidden_size = 32"),
    ("hidden_size", 64, r"tensor 'model.embed_tokens.weight' has shape \((\d+), 32\), expected "
                        r"\(\1, 64\) from vocab_size = \1, hidden_size = 64"),
    ("num_attention_heads", 8, r"tensor 'model.layers.0.self_attn.q_proj.weight' has shape "
                               r"\(32, 32\), expected \(64, 32\) from num_attention_heads \* "
                               r"head_dim = 8 \* 8"),
    ("intermediate_size", 4096, r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                                r"\(64, 32\), expected \(4096, 32\) from intermediate_size"),
    ("max_position_embeddings", "lots", r"field 'max_position_embeddings' = 'lots': expected a "
                                        r"positive integer"),
    ("rms_norm_eps", "tiny", r"field 'rms_norm_eps' = 'tiny': expected a positive number"),
    ("rope_parameters", {"rope_type": "linear", "factor": 0, "rope_theta": 1e4},
     r"field 'rope_parameters.factor' = 0: expected a positive number"),
])
def test_absurd_config_values_are_named_before_a_model_is_built(model_dir, tmp_path, field, value,
                                                                 match):
  """Caught by load_config (before any model, even an abstract one, is built), by an upper bound
  or against the safetensors shapes: no OOM, no hang, the key and the file named."""
  from persyn_jax.models import load_config
  path = copy_model(model_dir, tmp_path)
  tiny.edit_config(path, **{field: value})
  with pytest.raises(CheckpointError, match=r"m/config.json: " + match):
    load_config(path)
  with pytest.raises(CheckpointError, match=r"m/config.json: " + match):
    from_pretrained(path)


# -- reward models ---------------------------------------------------------------------------------

def test_a_reward_model_with_a_wide_head_is_refused(model_dir, tmp_path):
  from persyn_jax.scoring import RewardScorer, ScoringConfig
  path = copy_model(model_dir, tmp_path, classifier=True)
  # weights of a 1-wide head, config of a 2-class classifier: the shapes disagree, named
  tiny.edit_config(path, id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
  with pytest.raises(CheckpointError, match=r"tensor 'score.weight' has shape \(1, 32\), expected \(2, 32\)"):
    RewardScorer.from_pretrained(path, ScoringConfig(dtype="float32"))
  # a consistent 2-class classifier loads, but is no reward model: refused, not read at column 0
  from persyn_jax.models import build_model, load_config
  cfg, _ = load_config(path)
  assert cfg.num_labels == 2
  two = build_model(cfg, classifier=True, dtype="float32", abstract=True)
  with pytest.raises(ValueError, match=r"scoring.reward_model .*score head has width 2 \(num_labels=2\)"):
    RewardScorer(two, None, ScoringConfig(dtype="float32"))


# -- prompts ---------------------------------------------------------------------------------------

def test_invalid_utf8_in_a_prompt_file_names_file_and_line(tmp_path):
  p = tmp_path / "p.jsonl"
  p.write_bytes(b'{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "caf\xe9 \xff"}\n')
  with pytest.raises(S.PromptFileError, match=r"p.jsonl:2: not UTF-8"):
    S.load_prompts(S.PromptSourceConfig(path=str(p)))
  j = tmp_path / "p.json"
  j.write_bytes(b'[{"id": "a", "prompt": "\xff"}]')
  with pytest.raises(S.PromptFileError, match=r"p.json: not UTF-8"):
    S.load_prompts(S.PromptSourceConfig(path=str(j)))


def test_a_prompt_that_is_not_unicode_text_is_a_counted_skip(tmp_path):
  """A JSON escape of a lone surrogate decodes to a str no tokenizer (and no UTF-8 file) takes."""
  p = tmp_path / "p.jsonl"
  p.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "bad \\ud800 half pair"}\n'
               '{"id": "c", "messages": [{"role": "user", "content": "\\udfff"}]}\n')
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=str(p)))
  assert [x["id"] for x in prompts] == ["a"] and stats["skipped"]["not_text"] == 1
  prompts, stats = S.load_prompts(S.PromptSourceConfig(path=str(p), messages_field="messages"))
  assert prompts == [] and stats["skipped"]["not_text"] == 1 and stats["skipped"]["empty"] == 2


def test_a_record_with_a_lone_surrogate_is_refused_naming_the_field():
  with pytest.raises(R.RecordError, match=r"record field 'prompt' = .*not valid Unicode text"):
    R.decode(b'{"schema": 1, "id": "a", "prompt": "x \\ud800"}')
  with pytest.raises(R.RecordError, match=r"record field 'response' = .*not valid Unicode"):
    R.encode({"schema": 1, "id": "a", "prompt": "p", "response": "\udc80"})


def test_bad_prompts_given_to_the_sampler_are_named_before_any_jax(model_dir):
  from persyn_jax.sampling import SamplingConfig, generate
  model, tok = from_pretrained(model_dir("llama")[0], dtype="float32")
  cfg = SamplingConfig(max_new_tokens=2)
  with pytest.raises(ValueError, match=r"prompt is not valid Unicode text \(a lone surrogate at character 4\)"):
    generate(model, tok, ["bad \ud800"], cfg)
  with pytest.raises(TypeError, match=r"a prompt is a str or a list of .* got bytes"):
    generate(model, tok, [b"\xff\xfe"], cfg)
  with pytest.raises(ValueError, match=r"message 0 content is not valid Unicode"):
    generate(model, tok, [[{"role": "user", "content": "\udfff"}]], cfg)
  assert generate(model, tok, [], cfg) == []  # nothing to do is no error


# -- datasets, teachers, meshes --------------------------------------------------------------------

def explicit_config(model_dir, tmp_path, prompts_path, **over):
  from persyn_jax.run_config import RunConfig
  path = model_dir("llama")[0]
  data = {"world": None, "run_dir": str(tmp_path / "run"),
          "teachers": [{"name": "t1", "path": path}, {"name": "t2", "path": path}],
          "student": {"name": "s", "path": path},
          "prompts": {"source": {"path": str(prompts_path)}, "probe": 1.0}}
  data.update(over)
  return C.from_dict(RunConfig, data)


@pytest.mark.parametrize("content", ["", "\n\n", '{"id": "a", "prompt": ""}\n{"id": "b", "prompt": 7}\n'])
def test_an_empty_dataset_is_a_clear_error(model_dir, tmp_path, content):
  from persyn_jax.stages import Run
  p = tmp_path / "prompts.jsonl"
  p.write_text(content)
  run = Run(explicit_config(model_dir, tmp_path, p), log=lambda m: None)
  with pytest.raises(ValueError, match=r"prompts.jsonl: no usable prompts \(skipped: .*'rows': \d"):
    run.run(["probe"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(S.PromptFileError, match="empty: no prompt files"):
    S.load_prompts(S.PromptSourceConfig(path=str(tmp_path / "empty")))  # a folder without prompts


def test_a_run_started_from_python_is_checked_before_any_work(model_dir, tmp_path):
  """Run.run() runs the CLI's preflight first: a config that would fail in eval (no held-out
  prompts) or in the router (no backbone) is refused before the probe, with every problem named."""
  from persyn_jax.stages import Run
  p = tmp_path / "prompts.jsonl"
  p.write_text("".join(f'{{"id": "p{i}", "prompt": "question {i}"}}\n' for i in range(4)))
  cfg = explicit_config(model_dir, tmp_path, p, prompts={"source": {"path": str(p)}, "eval": 0})
  with pytest.raises(C.ConfigError, match=r"(?s)5 problem.*stage router reads stage score.*"
                                          r"stage eval reads stage sft.*router.backbone is empty.*"
                                          r"prompts.eval=0.0 leaves no held-out prompts.*"
                                          r"eval.verifier=.math. needs reference answers"):
    Run(cfg, log=lambda m: None).run(["probe", "router", "eval"])
  assert not (tmp_path / "run").exists()
  Run(cfg, log=lambda m: None).run(["probe"])  # the stages it can run still run
  assert (tmp_path / "run" / "probe" / "DONE.json").exists()


RUN_YAML = "world: null\nstudent: {name: s, path: /m}\nteachers: [{name: a, path: /a}]\n"


def test_keys_the_world_would_replace_are_refused_while_world_is_set(tmp_path):
  """`world:` defaults to the toy world, whose resolution replaced a config's own teachers, student,
  prompt file and split counts without a word (a user's YAML without `world: null` ran the toy
  world), and the dry-run planned the world's prompt count while the run honoured max_prompts."""
  from persyn_jax.run_config import load_run_config
  y = tmp_path / "run.yaml"
  y.write_text(RUN_YAML.replace("world: null\n", "") + "prompts: {source: {path: p.jsonl}}\n")
  with pytest.raises(C.ConfigError, match=r"^\S*run.yaml: world is set .* so teachers, student, "
                                          r"prompts.source.path would be ignored; set `world: nul"):
    load_run_config(str(y))
  assert load_run_config(str(y), ["world=null"]).teachers[0].name == "a"
  with pytest.raises(C.ConfigError, match=r"^--set prompts.source.max_prompts=5: world is set .*"
                                          r"so prompts.source.max_prompts would be ignored"):
    load_run_config(None, ["prompts.source.max_prompts=5"])
  with pytest.raises(C.ConfigError, match=r"^--set prompts=\{eval: 3\}: .* so prompts.eval would"):
    load_run_config(None, ["prompts={eval: 3}"])
  assert load_run_config(None, ["prompts.seed=3"]).prompts.seed == 3  # the run's own under a world


def test_numbers_that_yaml_reads_as_strings_are_taken_by_numeric_fields(tmp_path):
  """PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; a float field takes it, an int
  field takes an integer string, and any other string is still an error naming the key and file."""
  import yaml
  from persyn_jax.run_config import load_run_config
  y = tmp_path / "run.yaml"
  y.write_text(RUN_YAML + "sft: {lr: 1e-3, min_lr_ratio: 5E-2, batch_size: '16'}\n"
               "router: {lr: 2.5e-5}\n")
  assert yaml.safe_load(y.read_text())["sft"]["lr"] == "1e-3"  # the YAML quirk itself
  cfg = load_run_config(str(y), ["sft.weight_decay=1e-2"])
  assert (cfg.sft.lr, cfg.sft.min_lr_ratio, cfg.sft.batch_size) == (1e-3, 5e-2, 16)
  assert (cfg.router.lr, cfg.sft.weight_decay) == (2.5e-5, 1e-2)
  assert isinstance(cfg.sft.batch_size, int)
  Stop = dataclasses.make_dataclass("Stop", [("stop", int | str | None, None)])
  assert C.from_dict(Stop, {"stop": "42"}).stop == "42"  # a union with str keeps the string
  for bad, match in [("sft: {lr: fast}", r"run.yaml.sft.lr: expected a number, got 'fast'"),
                     ("sft: {lr: 1e-3x}", r"run.yaml.sft.lr: expected a number, got '1e-3x'"),
                     ("sft: {batch_size: 1e3}", r"run.yaml.sft.batch_size: expected an integer, "
                                                r"got '1e3'")]:
    y.write_text(RUN_YAML + bad + "\n")
    with pytest.raises(C.ConfigError, match=match):
      load_run_config(str(y))


def test_duplicated_teacher_names_are_a_config_error(tmp_path):
  from persyn_jax.run_config import load_run_config
  y = tmp_path / "run.yaml"
  y.write_text("world: null\nstudent: {name: s, path: /m}\n"
               "teachers:\n  - {name: A, path: /a}\n  - {name: B, path: /b}\n  - {name: A, path: /c}\n")
  with pytest.raises(C.ConfigError, match=r"run.yaml: teachers: duplicated teacher names \['A'\]"):
    load_run_config(str(y))


def test_teacher_names_that_share_a_file_name_are_a_config_error(tmp_path):
  """'a/b' and 'a_b' both become the file-name part 'a_b': their shards would collide."""
  from persyn_jax.run_config import load_run_config
  y = tmp_path / "run.yaml"
  y.write_text("world: null\nstudent: {name: s, path: /m}\n"
               "teachers:\n  - {name: a/b, path: /a}\n  - {name: a_b, path: /b}\n")
  with pytest.raises(C.ConfigError, match=r"a/b.*a_b"):
    load_run_config(str(y))


def test_a_mesh_that_does_not_divide_the_devices_is_named(model_dir, tmp_path):
  from persyn_jax.stages import Run
  p = tmp_path / "prompts.jsonl"
  p.write_text('{"id": "a", "prompt": "hi"}\n')
  cfg = explicit_config(model_dir, tmp_path, p, mesh={"data": 3, "fsdp": -1, "tensor": 1})
  with pytest.raises(ValueError, match=r"the fixed axes \(3 devices\) do not divide the 8 devices"):
    Run(cfg, log=lambda m: None)
  cfg = explicit_config(model_dir, tmp_path, p, mesh={"data": 2, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match=r"needs 4 devices, but 8 are available"):
    Run(cfg, log=lambda m: None)


def test_the_cli_reports_a_mesh_that_does_not_fit_in_one_line(model_dir, tmp_path, capsys):
  """A real run (not only --dry-run) gives one line and exit 2, not a ValueError traceback."""
  import yaml

  from persyn_jax import train
  p = tmp_path / "prompts.jsonl"
  p.write_text('{"id": "a", "prompt": "hi"}\n')
  cfg = explicit_config(model_dir, tmp_path, p, mesh={"data": 3, "fsdp": -1, "tensor": 1})
  y = tmp_path / "run.yaml"
  y.write_text(yaml.safe_dump(C.to_dict(cfg)))
  assert train.main(["--config", str(y), "--stages", "probe"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ConfigError: mesh ") and err.count("\n") == 1, err
  assert "the fixed axes (3 devices) do not divide the 8 devices" in err


def test_a_batch_size_that_does_not_divide_the_mesh_still_gives_the_same_results(model_dir):
  """The batch axis is kept whole on the mesh axes it does not divide (less data parallelism,
  the same numbers): sampling 3 rows on 8 devices equals 1 device. (SFT and scoring place their
  batches with the same rule, sharding.batch_sharding.)"""
  from persyn_jax import sharding as shd
  from persyn_jax.sampling import SamplingConfig, generate
  path = model_dir("llama")[0]
  prompts = ["hello", "tell me a story about a cat", "2 + 2?"]
  out = []
  for mesh in (shd.make_mesh(shd.MeshConfig(1, -1, 1)),
               shd.single_device_mesh()):
    model, tok = from_pretrained(path, dtype="float32", mesh=mesh)
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, batch_size=3, seed=3)
    out.append([r.token_ids for r in generate(model, tok, prompts, cfg, mesh=mesh)])
  assert out[0] == out[1] and all(len(t) for t in out[0])
  spec = shd.batch_sharding(shd.make_mesh(shd.MeshConfig(1, -1, 1)), (3, 16)).spec
  assert "fsdp" not in str(spec[0])  # 3 rows are not split over fsdp=8


def test_an_sft_dataset_with_nothing_to_train_on_is_named(tok, tmp_path):
  """Every example longer than seq_len with overlong=skip: the pipeline names the data directory
  and the counts, not a planning detail; an empty list of batches says so too."""
  from persyn_jax.data import shards
  from persyn_jax.data.batches import epoch_batches
  from persyn_jax.sft import SFTConfig
  from persyn_jax.sft.trainer import total_steps
  recs = [R.make(f"r{i}", "a long prompt " * 20, response="an answer " * 10, teacher="t",
                 sample=0) for i in range(3)]
  shards.write_records(str(tmp_path), "data", recs, num_shards=1, host=0)
  cfg = SFTConfig(seq_len=16, batch_size=2, max_steps=0)
  with pytest.raises(ValueError, match=rf"{tmp_path}: no SFT examples to train on \(3 records; "
                                       r".*'skipped_no_response': 3"):
    epoch_batches(str(tmp_path), tok, cfg)
  with pytest.raises(ValueError, match="the SFT data has no batches"):
    total_steps(cfg, 0)


@pytest.mark.parametrize("key", ["sft.compute_dtype", "sft.param_dtype", "sft.export_dtype",
                                 "scoring.dtype", "router.dtype", "router.param_dtype",
                                 "sampling.cache_dtype", "eval.sampling.cache_dtype",
                                 "teachers", "student.dtype"])
def test_an_unknown_dtype_in_the_config_is_named_when_it_is_loaded(tmp_path, key):
  """Every dtype field is checked when the config is built: a ConfigError naming the key and the
  names it takes, not a raw `unknown dtype` ValueError from the stage that first uses it."""
  from persyn_jax.run_config import load_run_config
  y = tmp_path / "run.yaml"
  y.write_text(RUN_YAML)
  sets = (["teachers=[{name: a, path: /a, dtype: float99}]"] if key == "teachers"
          else [f"{key}=float99"])
  with pytest.raises(C.ConfigError, match=r"dtype='float99': unknown dtype; expected a floating "
                                          r"dtype such as .*bfloat16, float32"):
    load_run_config(str(y), sets)
  with pytest.raises(C.ConfigError, match="unknown dtype"):
    load_run_config(str(y), ["sft.param_dtype=int8"])  # a dtype, but not a floating one
  # the accepted spellings still load: the short forms and sampling's "auto"
  cfg = load_run_config(str(y), ["sft.compute_dtype=bf16", "router.param_dtype=fp32",
                                 "sampling.cache_dtype=auto", "sft.export_dtype=null"])
  assert (cfg.sft.compute_dtype, cfg.sft.export_dtype) == ("bf16", None)


def test_an_optional_section_reports_its_own_error(tmp_path):
  """`student: X | None` given a mapping: X's own error (the missing key, the bad value), not
  "{...} matches none of ModelRef | None"."""
  from persyn_jax.run_config import load_run_config
  y = tmp_path / "run.yaml"
  y.write_text(RUN_YAML)
  with pytest.raises(C.ConfigError, match=r"--set student=\{name: x\}: missing required key\(s\) "
                                          r"\['path'\]"):
    load_run_config(str(y), ["student={name: x}"])
  with pytest.raises(C.ConfigError, match=r"--set student.mesh.data=two: expected an integer, "
                                          r"got 'two'"):
    load_run_config(str(y), ["student.mesh.data=two"])


@pytest.mark.parametrize("key,value,match", [
    ("sft.lr", ".nan", r"^--set sft.lr=.nan: sft.lr=nan: must be a finite number > 0$"),
    ("sft.lr", ".inf", r"sft.lr=inf: must be a finite number > 0"),
    ("sft.lr", "0", r"sft.lr=0.0: must be a finite number > 0"),
    ("sft.epochs", ".inf", r"sft.epochs=inf: must be a finite number >= 0"),
    ("sft.b1", "1", r"sft.b1=1.0: must be in \[0, 1\)"),
    ("sft.b2", "-0.1", r"sft.b2=-0.1: must be in \[0, 1\)"),
    ("sft.grad_clip", "-1", r"sft.grad_clip=-1.0: must be a finite number >= 0"),
    ("sft.weight_decay", ".nan", r"sft.weight_decay=nan: must be a finite number >= 0"),
    ("sft.weight_decay", "-0.1", r"sft.weight_decay=-0.1: must be a finite number >= 0"),
    ("sft.lora.alpha", ".nan", r"--set sft.lora.alpha=.nan: lora.alpha=nan: must be a finite"),
    ("prompts.probe", ".nan", r"--set prompts.probe=.nan: prompts.probe=nan: a count"),
    ("seed", "-1", r"--set seed=-1: seed=-1: must be >= 0"),
    ("sft.seed", "-1", r"--set sft.seed=-1: sft.seed=-1: must be >= 0"),
    ("router.seed", "-1", r"--set router.seed=-1: router.seed=-1: must be >= 0"),
    ("prompts.seed", "-1", r"--set prompts.seed=-1: prompts.seed=-1: must be >= 0"),
    ("policies.seed", "-1", r"--set policies.seed=-1: policies.seed=-1: must be >= 0"),
    ("world.seed", "-1", r"--set world.seed=-1: world.seed=-1: must be >= 0"),
    ("name", "''", r"--set name='': name='': a non-empty run name"),
    ("name", "../x", r"name='../x': a non-empty run name without '/'"),
    ("sweep.policies", "[persyn, persyn]", r"sweep.policies lists a policy twice"),
    ("prompts.source.max_prompts", "0", r"max_prompts=0: must be at least 1"),
    # make(id, prompt, **kept) failed with "got multiple values for argument 'id'"
    ("prompts.source.keep_fields", "[kind, id]", r"--set prompts.source.keep_fields=\[kind, id\]: "
                                                 r"keep_fields=\['kind', 'id'\]: \['id'\] are "
                                                 r"fields of the record itself"),
    ("eval.sampling.num_samples", "4", r"--set eval.sampling.num_samples=4: eval.sampling."
                                       r"num_samples=4: eval scores one answer per prompt"),
    ("student.quantize", "int8", r"--set student.quantize=int8: student 's': quantize='int8' is for "
                                 r"teachers"),
    ("student.mesh", "{data: 2}", r"student 's': mesh is a teacher's sampling mesh; the student's "
                                  r"stages take scoring.mesh, sft.mesh and eval.sampling.mesh"),
])
def test_bad_numbers_names_and_lists_are_refused_when_the_config_is_loaded(tmp_path, key, value,
                                                                          match):
  """Values that used to pass the config and fail later (a NaN loss, numpy's RNG at the end of a
  run, the run dir becoming runs/ itself, a sweep failing after the main run) or never (an
  endless run): each is a ConfigError naming the key at load time."""
  from persyn_jax.run_config import load_run_config
  y = tmp_path / "run.yaml"
  y.write_text(RUN_YAML)
  with pytest.raises(C.ConfigError, match=match):
    load_run_config(str(y), [f"{key}={value}"])


def test_a_config_path_that_is_a_directory_or_not_utf8_is_named(tmp_path):
  """No IsADirectoryError or UnicodeDecodeError traceback: a ConfigError naming the file."""
  from persyn_jax.run_config import load_run_config
  with pytest.raises(C.ConfigError, match=r": a directory, not a config file"):
    load_run_config(str(tmp_path))
  y = tmp_path / "latin1.yaml"
  y.write_bytes("name: caf\u00e9\n".encode("latin-1"))
  with pytest.raises(C.ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 9: "):
    load_run_config(str(y))


def test_a_key_given_twice_in_a_yaml_config_is_refused(tmp_path):
  """PyYAML keeps the last of two equal keys silently (a second `sft:` block replaces the first);
  the config loader names the file, the line and the key. `<<` merge keys may still be
  overridden."""
  from persyn_jax.run_config import load_run_config
  y = tmp_path / "run.yaml"
  y.write_text(RUN_YAML + "sft:\n  lr: 1.0e-5\n  epochs: 1\nseed: 3\nsft:\n  lr: 1.0e-3\n")
  with pytest.raises(C.ConfigError, match=r"run.yaml: line 8: key 'sft' is given twice "
                                          r"\(first on line 4\)"):
    load_run_config(str(y))
  y.write_text(RUN_YAML + "sft: {lr: 1.0e-5, lr: 2.0e-5}\n")
  with pytest.raises(C.ConfigError, match=r"run.yaml: line 4: key 'lr' is given twice"):
    load_run_config(str(y))
  y.write_text(RUN_YAML + "sft:\n  <<: {lr: 1.0e-5, epochs: 1}\n  lr: 3.0e-5\n")
  assert load_run_config(str(y)).sft.lr == 3e-5  # a merged key overridden: allowed


def test_an_error_is_blamed_on_the_override_that_caused_it(tmp_path):
  """An error from a `--set` override names the override, not the file glued to the key; one from
  the file names the file and key as before, and the overrides of the section it fails in."""
  from persyn_jax.run_config import load_run_config
  y = tmp_path / "run.yaml"
  y.write_text(RUN_YAML + "sft: {batch_size: 0}\n")
  with pytest.raises(C.ConfigError, match=r"^--set sft.lr=fast: expected a number, got 'fast'$"):
    load_run_config(str(y), ["sft.lr=fast"])
  with pytest.raises(C.ConfigError, match=r"^--set sft.lorra=1: unknown key\(s\) \['lorra'\]"):
    load_run_config(str(y), ["sft.lorra=1", "seed=1"])
  with pytest.raises(C.ConfigError, match=r"^--set teachers=.*: teachers\[0\]: model 'a': "
                                          r"dtype='x': unknown dtype"):
    load_run_config(str(y), ["teachers=[{name: a, path: /a, dtype: x}]"])
  # the file's own error: the file and the key, with the section's overrides named
  with pytest.raises(C.ConfigError, match=r"run.yaml.sft \(with --set sft.lr=0.1\): "
                                          r"batch_size=0: must be >= 1"):
    load_run_config(str(y), ["sft.lr=0.1", "seed=1"])
  y.write_text(RUN_YAML + "sft: {lr: fast}\n")
  with pytest.raises(C.ConfigError, match=r"run.yaml.sft.lr: expected a number"):
    load_run_config(str(y), ["sft.epochs=1"])
