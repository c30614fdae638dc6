"""SFT batches: loss mask vs tokenizer offsets, packing keeps every token, packed == unpacked
targets, determinism and resume, host split, device placement."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from persyn_jax.data import batches as P, chat, records as R, shards

SEQ = 128


def make_records(n=48):
  out = []
  for i in range(n):
    prompt = f"{i} apples, {i % 7} eaten?"
    response = f"{i - i % 7} left. " * (1 + i % 4)
    messages = None
    if i % 5 == 0:
      messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]
    out.append(R.make(f"r{i}", prompt, messages=messages, teacher="t0", response=response))
  return out


RECS = make_records()


def segments(batches):
  """(input ids, targets, loss mask) of every packed segment, as tuples."""
  out = []
  for b in batches:
    for r in range(b["input_ids"].shape[0]):
      seg = b["segment_ids"][r]
      for s in range(1, seg.max() + 1):
        sel = seg == s
        assert (b["positions"][r][sel] == np.arange(sel.sum())).all()
        out.append((tuple(b["input_ids"][r][sel]), tuple(b["targets"][r][sel]),
                    tuple(b["loss_mask"][r][sel])))
  return out


def expected(tok, recs):
  """The same triples computed straight from the tokenizer, one example at a time."""
  out = []
  for rec in recs:
    ids, mask = chat.pair_ids(tok, rec.get("messages") or rec["prompt"], rec["response"])
    ids, mask = ids[:SEQ], mask[:SEQ]
    out.append((tuple(ids), tuple(ids[1:]) + (0,), tuple(float(m) for m in mask[1:]) + (0.0,)))
  return out


def batches(tok, **kw):
  args = dict(seq_len=SEQ, batch_size=4, seed=0)
  args.update(kw)
  it = P.sft_batches(RECS if "data" not in args else args.pop("data"), tok, **args)
  return list(it), it.stats


def test_loss_mask_is_exactly_the_response_tokens(tok):
  """Response tokens from the tokenizer's character offsets: those starting at or after the end
  of the generation prompt in the chat-templated text."""
  for rec in RECS[:10]:
    prompt = rec.get("messages") or rec["prompt"]
    msgs = chat.to_messages(prompt) + [{"role": "assistant", "content": rec["response"]}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    cut = len(chat.prompt_text(tok, prompt))
    assert full[:cut] == chat.prompt_text(tok, prompt)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    want = [int(start >= cut) for start, _ in enc["offset_mapping"]]
    ids, mask = chat.pair_ids(tok, prompt, rec["response"])
    assert ids == list(enc["input_ids"]) and mask == want
    assert tok.decode([t for t, m in zip(ids, mask) if m]).startswith(rec["response"])
  (b,), _ = batches(tok, data=RECS[:1], batch_size=1)
  ids, mask = chat.pair_ids(tok, RECS[0]["messages"], RECS[0]["response"])
  n = len(ids)
  np.testing.assert_array_equal(b["loss_mask"][0, :n - 1], mask[1:])
  assert b["loss_mask"][0, n - 1:].sum() == 0


def test_packing_keeps_every_token_and_mask(tok):
  got, stats = batches(tok, packing=True, shuffle=False)
  assert sorted(segments(got)) == sorted(expected(tok, RECS))
  assert stats["examples"] == len(RECS)
  assert stats["tokens"] == sum(len(e[0]) for e in expected(tok, RECS))


def test_packed_and_unpacked_give_the_same_per_token_targets(tok):
  packed, ps = batches(tok, packing=True)
  padded, us = batches(tok, packing=False)
  assert sorted(segments(packed)) == sorted(segments(padded))
  assert all((b["segment_ids"] <= 1).all() for b in padded)
  assert len(packed) < len(padded) == -(-len(RECS) // 4)
  assert ps["loss_tokens"] == us["loss_tokens"] and ps["padding"] < us["padding"]


def test_deterministic_and_exact_resume(tok):
  full, _ = batches(tok, seed=1, epoch=0)
  again, _ = batches(tok, seed=1, epoch=0)
  resumed, _ = batches(tok, seed=1, epoch=0, start_step=3)
  other, _ = batches(tok, seed=1, epoch=1)
  eq = lambda a, b: len(a) == len(b) and all(
      all((x[k] == y[k]).all() for k in P.KEYS) for x, y in zip(a, b))
  assert eq(full, again) and eq(full[3:], resumed) and not eq(full, other)


def test_a_resume_in_any_epoch_continues_the_uninterrupted_stream(tok):
  """epoch_batches(start): each epoch is reshuffled and packed, so epochs differ in batch count
  (here 8, then 9); a resumed position is walked through each epoch's own count."""
  import itertools
  import types
  c = types.SimpleNamespace(seq_len=SEQ, batch_size=3, seed=0, unfinished="keep")
  fn, per_epoch = P.epoch_batches(RECS, tok, c)
  tk = P.TokenizedRecords(RECS, tok, seq_len=SEQ)
  counts = [sum(1 for _ in P.sft_batches(RECS, tok, seq_len=SEQ, batch_size=3, seed=0, epoch=e,
                                         tokenized=tk)) for e in range(3)]
  assert per_epoch == counts[0] and len(set(counts)) > 1, counts  # not vacuous
  n = sum(counts)
  full = list(itertools.islice(fn(0), n + 2))
  same = lambda a, b: all((a[k] == b[k]).all() for k in P.KEYS)
  for p in range(n):
    got = list(itertools.islice(fn(p), 3))
    assert all(same(a, b) for a, b in zip(got, full[p:p + 3])), p


def test_responses_cut_by_max_new_tokens_are_left_out_unless_kept(tok):
  """A response whose teacher hit max_new_tokens (finish_reason "length") would be trained with
  the template's end-of-turn token, teaching the student to stop mid-answer: unfinished="drop"
  gives exactly the batches of the records without them; "keep" (the default) those of all."""
  recs = [dict(r, finish_reason="length" if i % 3 == 0 else "stop") for i, r in enumerate(RECS)]
  cut = sum(r["finish_reason"] == "length" for r in recs)
  finished = [r for r in recs if r["finish_reason"] == "stop"]
  same = lambda a, b: len(a) == len(b) and all(
      all((x[k] == y[k]).all() for k in P.KEYS) for x, y in zip(a, b))
  dropped, stats = batches(tok, data=recs, shuffle=False, unfinished="drop")
  assert stats["skipped_unfinished"] == cut > 0 and stats["examples"] == len(finished)
  assert same(dropped, batches(tok, data=finished, shuffle=False)[0])
  kept, stats = batches(tok, data=recs, shuffle=False)
  assert stats["examples"] == len(recs) and not stats["skipped_unfinished"]
  assert same(kept, batches(tok, shuffle=False)[0]) and not same(kept, dropped)
  tk = P.TokenizedRecords(recs, tok, seq_len=SEQ, unfinished="drop")  # tokenized once: the same
  assert same(dropped, list(P.sft_batches(recs, tok, seq_len=SEQ, batch_size=4, shuffle=False,
                                          tokenized=tk, unfinished="drop")))
  with pytest.raises(ValueError, match="unfinished"):
    P.sft_batches(recs, tok, seq_len=SEQ, batch_size=4, tokenized=tk)
  with pytest.raises(ValueError, match="unfinished='cut'"):
    P.sft_batches(recs, tok, seq_len=SEQ, batch_size=4, unfinished="cut")
  import types  # every response cut: the error says what to change
  c = types.SimpleNamespace(seq_len=SEQ, batch_size=3, seed=0, unfinished="drop")
  with pytest.raises(ValueError, match=r"every response was cut by max_new_tokens \(sft.unfinished:"
                                       r" drop\): raise sampling.max_new_tokens or set sft"):
    P.epoch_batches([dict(r, finish_reason="length") for r in RECS], tok, c)


def test_shard_directory_gives_the_same_batches_as_the_records(tok, tmp_path):
  shards.write_records(str(tmp_path), "data", RECS, num_shards=3, host=0)
  from_dir, _ = batches(tok, data=str(tmp_path), seed=5)
  from_list, _ = batches(tok, seed=5)
  assert len(from_dir) == len(from_list)
  assert all((a[k] == b[k]).all() for a, b in zip(from_dir, from_list) for k in P.KEYS)


def test_overlong_examples_truncated_or_skipped(tok):
  lengths = [len(chat.pair_ids(tok, r.get("messages") or r["prompt"], r["response"])[0])
             for r in RECS]
  seq = 50
  over = sum(n > seq for n in lengths)
  assert 0 < over < len(RECS)
  _, skip = batches(tok, seq_len=seq, overlong="skip")
  assert skip["skipped_overlong"] == over and skip["examples"] == len(RECS) - over
  got, trunc = batches(tok, seq_len=seq, overlong="truncate", shuffle=False)
  assert trunc["truncated"] + trunc["skipped_no_response"] == over
  assert trunc["examples"] == len(RECS) - trunc["skipped_no_response"]
  assert max(len(s[0]) for s in segments(got)) == seq


def test_num_batches_pads_the_epoch_with_empty_batches(tok):
  """Every example once, in the batches of the unpadded stream; then all-padding batches up to
  num_batches (those the trainer sees as zero-loss steps)."""
  plain, _ = batches(tok, batch_size=8)
  padded, stats = batches(tok, batch_size=8, num_batches=len(plain) + 3)
  assert len(padded) == len(plain) + 3 and stats["empty_batches"] == 3
  assert all((a[k] == b[k]).all() for a, b in zip(plain, padded) for k in P.KEYS)
  assert all(not b["segment_ids"].any() and not b["loss_mask"].any() for b in padded[len(plain):])
  assert sorted(segments(padded)) == sorted(expected(tok, RECS))
  assert stats["examples"] == len(RECS)


def test_record_without_response_is_an_error(tok):
  with pytest.raises(R.RecordError, match="'r0': no 'response'"):
    batches(tok, data=[R.make("r0", "p")])


def test_device_batches_over_the_mesh(tok):
  import jax

  from persyn_jax.sharding import MeshConfig, make_mesh

  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  (b, *_), _ = batches(tok, batch_size=8)
  d = P.to_device(b, mesh)
  for k in P.KEYS:
    assert d[k].shape == (8, SEQ) and d[k].dtype == b[k].dtype
    assert d[k].sharding.spec[0] == ("data", "fsdp")
    assert len(d[k].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(d[k]), b[k])
  assert isinstance(d["input_ids"], jax.Array)


examples = st.lists(st.integers(2, 20).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 999), min_size=n, max_size=n),
    st.lists(st.integers(0, 1), min_size=n, max_size=n))), max_size=30)


@settings(max_examples=200, deadline=None)
@given(examples, st.integers(1, 4), st.integers(20, 48))
def test_first_fit_packing_properties(exs, rows, seq_len):
  exs = [(np.asarray(i, np.int32), np.asarray(m, np.int8)) for i, m in exs]
  groups = list(P.first_fit(list(enumerate(exs)), rows, seq_len, size=lambda e: len(e[1][0])))
  placed = [i for g in groups for row in g for i, _ in row]
  assert sorted(placed) == list(range(len(exs)))  # every example exactly once
  for g in groups[:-1]:
    assert all(g)  # a batch is emitted only when full: no empty row before the last batch
  for g in groups:
    assert len(g) == rows
    for row in g:
      assert sum(len(e[0]) for _, e in row) <= seq_len
      assert [i for i, _ in row] == sorted(i for i, _ in row)  # stream order within a row
    b = P.build_batch([[e for _, e in row] for row in g], seq_len)
    for r, row in enumerate(g):
      off = 0
      for s, (_, (ids, mask)) in enumerate(row, 1):
        n = len(ids)
        assert (b["segment_ids"][r, off:off + n] == s).all()
        assert (b["positions"][r, off:off + n] == np.arange(n)).all()
        assert (b["targets"][r, off:off + n - 1] == ids[1:]).all() and b["targets"][r, off + n - 1] == 0
        assert (b["loss_mask"][r, off:off + n - 1] == mask[1:]).all()
        assert b["loss_mask"][r, off + n - 1] == 0
        off += n
      assert (b["segment_ids"][r, off:] == 0).all() and (b["targets"][r, off:] == 0).all()
      assert (b["loss_mask"][r, off:] == 0).all() and (b["input_ids"][r, off:] == 0).all()


def test_batched_tokenization_equals_pair_ids(tok):
  import copy

  base = copy.deepcopy(tok)
  base.chat_template = None  # a base model: prompt + response + EOS
  for t in (tok, base):
    for system in (None, "Be brief."):
      prompts = [r.get("messages") or r["prompt"] for r in RECS[:12]]
      responses = [r["response"] for r in RECS[:12]]
      assert chat.pair_ids_batch(t, prompts, responses, system) == [
          chat.pair_ids(t, p, r, system) for p, r in zip(prompts, responses)]


@pytest.mark.parametrize("packing,overlong", [(True, "truncate"), (False, "skip")])
def test_tokenized_once_gives_the_same_batches_every_epoch(tok, tmp_path, packing, overlong):
  """TokenizedRecords (what the pipeline's SFT stage uses: the chat template runs once per record,
  not once per epoch) gives the batches and stats of tokenizing every epoch, for several epochs;
  it refuses batches of another seq_len."""
  shards.write_records(str(tmp_path), "data", RECS, num_shards=3, host=0)
  seq = 50  # some examples overlong: their outcome (cut, skipped) must be replayed too
  cached = P.TokenizedRecords(str(tmp_path), tok, seq_len=seq, overlong=overlong)
  assert len(cached) == len(RECS)
  for epoch in range(3):
    want, ws = batches(tok, data=str(tmp_path), seq_len=seq, seed=7, epoch=epoch,
                       packing=packing, overlong=overlong)
    got, gs = batches(tok, data=None, tokenized=cached, seq_len=seq, seed=7, epoch=epoch,
                      packing=packing, overlong=overlong)
    assert len(got) == len(want) > 1
    assert all((a[k] == b[k]).all() for a, b in zip(got, want) for k in P.KEYS), epoch
    assert gs == ws and (ws["truncated"] or ws["skipped_overlong"])
  with pytest.raises(ValueError, match=r"seq_len, overlong, system, unfinished\) = \(50"):
    batches(tok, data=None, tokenized=cached, seq_len=64, overlong=overlong)


# Chat templates of the model families, as their tokenizer_config.json files have them (Qwen2.5's
# without its tool branches).
FAMILY_TEMPLATES = {
    # family: (template, bos, eos, other special tokens, the tokenizer itself adds bos)
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content "
               "= '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content']"
               " | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + "
               "content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
               "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
               "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"], True),
    "qwen2.5": ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]"
                "['content'] + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, "
                "created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
                "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == "
                "'system' and not loop.first) or (message.role == 'assistant') %}{{- '<|im_start|>' +"
                " message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- "
                "endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}",
                None, "<|im_end|>", [], False),
    "gemma2": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System "
               "role not supported') }}{% endif %}{% for message in messages %}{% if (message['role']"
               " == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
               "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] =="
               " 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{%"
               " endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
               "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>"
               "model\n'}}{% endif %}", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], True),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
                "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
                "user and assistant roles are supported!') }}{% endif %}{% endfor %}",
                "<s>", "</s>", [], True),
    # v0.3: the system prompt goes into the last user turn, so appending the answer moves it
    "mistral-v0.3": ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]"
                     "['content'] %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set "
                     "loop_messages = messages %}{%- endif %}{{- bos_token }}{%- for message in "
                     "loop_messages %}{%- if message['role'] == 'user' %}{%- if loop.last and "
                     "system_message is defined %}{{- '[INST] ' + system_message + '\n\n' + "
                     "message['content'] + '[/INST]' }}{%- else %}{{- '[INST] ' + message['content']"
                     " + '[/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}{{- ' ' "
                     "+ message['content']|trim + eos_token}}{%- endif %}{%- endfor %}",
                     "<s>", "</s>", ["[INST]", "[/INST]"], True),
    "phi3": ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
             "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
             "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{"
             "'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if "
             "add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
             "<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], False),
}


# templates without a system turn, and how they refuse one
NO_SYSTEM = {"gemma2": "System role not supported", "mistral": "Conversation roles must alternate"}


def family_tokenizer(tok, family, path):
  """The test tokenizer with a family's special tokens and chat template, saved and reloaded; a
  family whose tokenizer adds BOS itself gets that post-processor too."""
  import copy

  from tokenizers import processors
  from transformers import AutoTokenizer
  template, bos, eos, extra, adds_bos = FAMILY_TEMPLATES[family]
  t = copy.deepcopy(tok)
  t.add_special_tokens({"additional_special_tokens": [s for s in (bos, eos, *extra) if s]})
  if bos:
    t.bos_token = bos
  t.eos_token, t.chat_template = eos, template
  if adds_bos:
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, t.convert_tokens_to_ids(bos))])
  t.save_pretrained(str(path))
  return AutoTokenizer.from_pretrained(str(path))


def hf_ids(tok, messages, **kw):
  """transformers' own token ids of a chat (apply_chat_template(tokenize=True))."""
  return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


# the part of Llama 3.1-3.3's template that dates the system header (today's date unless given)
DATED_TEMPLATE = (
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}"
    "{%- set date_string = '26 Jul 2024' %}{%- endif %}{%- endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}<|eot_id|>"
    "{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}")


def test_a_dated_template_gives_the_same_ids_on_any_day(tok):
  """A template that dates its system header (Llama 3.1-3.3) is rendered with a fixed date, not
  today's: the ids of a prompt (so SFT packing, learnability, a resume) do not depend on the day.
  They equal transformers' ids given that date_string."""
  import copy
  import datetime
  t = copy.deepcopy(tok)
  t.chat_template = DATED_TEMPLATE
  msgs = [{"role": "user", "content": "2 + 3?"}]
  text = chat.prompt_text(t, msgs)
  assert "Today Date: 26 Jul 2024" in text, text
  assert datetime.date.today().strftime("%d %b %Y") not in text
  ids, mask = chat.pair_ids(t, msgs, "5")
  want = list(t.apply_chat_template(msgs + [{"role": "assistant", "content": "5"}],
                                    tokenize=True, return_dict=False, date_string="26 Jul 2024"))
  assert list(ids) == want and sum(mask) > 0


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_family_chat_templates_give_transformers_ids_and_mask_the_answer(tok, tmp_path, family):
  """Each family's template: the example's ids are transformers' apply_chat_template ids of the
  whole conversation (one BOS, whether or not the tokenizer adds one itself), and the loss mask
  is 1 exactly after the ids of its generation prompt (the answer and the end of the turn), as
  TRL masks a prompt-completion pair; also through sft_batches, cut at seq_len. Gemma's and
  Mistral v0.1's templates refuse a system turn; Mistral v0.3's moves the system prompt when the answer is appended, so
  the example is the generation prompt's ids, then the answer's, then EOS (chat.pair_ids)."""
  t = family_tokenizer(tok, family, tmp_path)
  assert t("x")["input_ids"][0] == t.bos_token_id or not FAMILY_TEMPLATES[family][4]
  prompts = ["2+2?", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]]
  responses = ["The answer is 4.", "  spaced  ", "\nleading newline"]
  recs = []
  for i, prompt in enumerate(prompts):
    msgs = chat.to_messages(prompt)
    for response in responses:
      if family in NO_SYSTEM and msgs[0]["role"] == "system":
        with pytest.raises(chat.ChatTemplateError, match=NO_SYSTEM[family]):
          chat.pair_ids(t, prompt, response)
        continue
      p = hf_ids(t, msgs, add_generation_prompt=True)
      full = hf_ids(t, msgs + [{"role": "assistant", "content": response}])
      ids, mask = chat.pair_ids(t, prompt, response)
      assert chat.pair_ids_batch(t, [prompt], [response]) == [(ids, mask)]
      if "bos_token" in t.chat_template:  # the template's BOS, once (not the tokenizer's too)
        assert ids[0] == t.bos_token_id and ids.count(t.bos_token_id) == 1
      if family == "mistral-v0.3" and msgs[0]["role"] == "system":
        assert full[:len(p)] != p
        r = t(response, add_special_tokens=False)["input_ids"] + [t.eos_token_id]
        assert (ids, mask) == (p + r, [0] * len(p) + [1] * len(r))
        continue
      assert full[:len(p)] == p
      assert (ids, mask) == (full, [0] * len(p) + [1] * (len(full) - len(p)))
      recs.append(R.make(f"{i}-{len(recs)}", "x", messages=msgs, response=response))
  pairs = [chat.pair_ids(t, r["messages"], r["response"]) for r in recs]
  seq = sorted(len(ids) for ids, _ in pairs)[len(pairs) // 2]  # about half the examples are cut
  want = []
  for ids, mask in pairs:
    ids, mask = ids[:seq], mask[:seq]
    if any(mask[1:]):
      want.append((tuple(ids), tuple(ids[1:]) + (0,), tuple(float(m) for m in mask[1:]) + (0.0,)))
  it = P.sft_batches(recs, t, seq_len=seq, batch_size=2)
  assert sorted(segments(it)) == sorted(want)
  assert it.stats["truncated"] > 0
