"""Chat formatting and tokenization shared by the sampler, scoring and SFT.

Each model tokenizes text itself, with its own chat template (the paper's Eq. 1): the response span
of a (prompt, response) pair is what the template adds after the generation prompt.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

Messages = list[dict[str, str]]
Prompt = str | Sequence[dict[str, Any]]


def to_messages(prompt: Prompt, system: str | None = None) -> Messages:
  """A prompt string becomes one user turn; a message list is copied. `system` is prepended unless
  the messages already start with a system turn."""
  if isinstance(prompt, str):
    msgs = [{"role": "user", "content": _text(prompt, "prompt")}]
  elif isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
    raise TypeError(f"a prompt is a str or a list of {{'role', 'content'}} messages, got "
                    f"{type(prompt).__name__}: {prompt!r:.80}")
  else:
    msgs = [dict(m) if isinstance(m, dict) else m for m in prompt]
    for i, m in enumerate(msgs):
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"message {i} of a prompt must be a dict with 'role' and 'content': {m!r}")
      _text(m["content"], f"message {i} content")
  if system and not (msgs and msgs[0]["role"] == "system"):
    msgs.insert(0, {"role": "system", "content": system})
  return msgs


def _text(text: Any, what: str) -> str:
  """`text` if it is valid Unicode text; a lone surrogate (no UTF-8 form) is named here rather
  than failing deep inside the tokenizer."""
  if not isinstance(text, str):
    raise TypeError(f"{what} must be a str, got {type(text).__name__}: {text!r:.80}")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{what} is not valid Unicode text (a lone surrogate at character "
                     f"{e.start}): {text[max(0, e.start - 30):e.start + 30]!r}") from None
  return text


class ChatTemplateError(ValueError):
  """A chat template that fails to render; the message names the model directory and the
  template (its chat_template.jinja, or tokenizer_config.json's chat_template)."""


def has_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def template_source(tokenizer) -> str:
  """Where the tokenizer's chat template was read from (transformers prefers the .jinja file)."""
  where = getattr(tokenizer, "name_or_path", "") or ""
  jinja = os.path.join(where, "chat_template.jinja")
  if where and os.path.isfile(jinja):
    return jinja
  if where and os.path.isdir(where):
    return f"{os.path.join(where, 'tokenizer_config.json')} (its chat_template)"
  return f"the chat template of tokenizer {where or type(tokenizer).__name__!r}"


# Llama 3.1-3.3's templates put "Today Date: <date_string>" in the system header and, given no
# date_string, take today's date (transformers' strftime_now): the ids of every prompt would then
# depend on the day a stage runs (a resume after midnight would pack other SFT batches, scoring
# and SFT on different days would see other prompts). Every template is rendered with this fixed
# date instead: the one those templates fall back to when the renderer has no clock.
TEMPLATE_DATE = "26 Jul 2024"


def apply_template(tokenizer, messages: Messages, *, add_generation_prompt: bool = False) -> str:
  """The tokenizer's chat template rendered on `messages` (text, not ids), with `date_string`
  fixed to TEMPLATE_DATE for the templates that read it."""
  try:
    return tokenizer.apply_chat_template(messages, tokenize=False, date_string=TEMPLATE_DATE,
                                         add_generation_prompt=add_generation_prompt)
  except Exception as e:  # jinja2.TemplateError (raise_exception, syntax), or any error in it
    model = getattr(tokenizer, "name_or_path", "") or "?"
    raise ChatTemplateError(f"{template_source(tokenizer)}: the chat template of model {model} "
                            f"fails ({type(e).__name__}: {e})") from None


def prompt_text(tokenizer, prompt: Prompt, system: str | None = None) -> str:
  """The text the model sees before it answers (the chat template's generation prompt)."""
  if has_chat_template(tokenizer):
    return apply_template(tokenizer, to_messages(prompt, system), add_generation_prompt=True)
  if not isinstance(prompt, str):  # a base model: plain concatenation of the turns
    prompt = "\n".join(m["content"] for m in to_messages(prompt, system))
  elif system:
    prompt = system + "\n" + prompt
  return prompt


def encode(tokenizer, text: str) -> list[int]:
  """Token ids of `text` as-is (chat templates carry their own BOS)."""
  add = not has_chat_template(tokenizer)  # base models: the tokenizer's own BOS
  return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def prompt_ids(tokenizer, prompt: Prompt, system: str | None = None) -> list[int]:
  return encode(tokenizer, prompt_text(tokenizer, prompt, system))


def eos_id(tokenizer) -> int | None:
  return tokenizer.eos_token_id


def pair_ids(tokenizer, prompt: Prompt, response: str, system: str | None = None
             ) -> tuple[list[int], list[int]]:
  """(ids, response_mask) of a prompt and its response, as the model's chat template lays them out.

  With a chat template: the full conversation (prompt turns + an assistant turn) is tokenized, and
  the tokens after the generation prompt are the response (they include the template's
  end-of-turn token). If the template's full conversation does not extend its generation prompt
  token-for-token (a response starting with a newline merges with the one ending the generation
  prompt), the response is the text the template adds after the generation prompt, tokenized
  apart and appended to the prompt ids (its end-of-turn tokens too, as in the main case). If the
  template's full conversation does not even start with the generation prompt's text, and for
  base models: prompt ids + response ids + EOS.
  """
  p_ids = prompt_ids(tokenizer, prompt, system)
  if has_chat_template(tokenizer):
    msgs = to_messages(prompt, system) + [{"role": "assistant", "content": response}]
    text = apply_template(tokenizer, msgs)
    full = encode(tokenizer, text)
    if len(full) > len(p_ids) and full[:len(p_ids)] == p_ids:
      return full, [0] * len(p_ids) + [1] * (len(full) - len(p_ids))
    r_ids = _template_suffix(tokenizer, prompt_text(tokenizer, prompt, system), text)
    if r_ids:
      return p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids)
  r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
  eos = eos_id(tokenizer)
  if eos is not None:
    r_ids.append(eos)
  return p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids)


def _template_suffix(tokenizer, ptext: str, text: str) -> list[int] | None:
  """Ids of what the full conversation's text `text` adds after the generation prompt's text
  `ptext`, tokenized on its own; None if `text` does not extend `ptext`."""
  if not (text.startswith(ptext) and len(text) > len(ptext)):
    return None
  return list(tokenizer(text[len(ptext):], add_special_tokens=False)["input_ids"]) or None


def conversation_ids(tokenizer, prompt: Prompt, response: str, system: str | None = None
                     ) -> tuple[list[int], list[int]]:
  """(ids, response_mask) of the full conversation tokenized as one text, as a reward model reads
  it (transformers: `apply_chat_template(..., tokenize=True)`); the mask is 1 after the longest
  prefix shared with the generation prompt's ids. Equals `pair_ids` unless the response's first
  tokens merge with the prompt's; without a chat template it is `pair_ids`."""
  if not has_chat_template(tokenizer):
    return pair_ids(tokenizer, prompt, response, system)
  p_ids = prompt_ids(tokenizer, prompt, system)
  msgs = to_messages(prompt, system) + [{"role": "assistant", "content": response}]
  full = encode(tokenizer, apply_template(tokenizer, msgs))
  n = 0
  while n < min(len(full), len(p_ids)) and full[n] == p_ids[n]:
    n += 1
  return full, [0] * n + [1] * (len(full) - n)


def pair_ids_batch(tokenizer, prompts: Sequence[Prompt], responses: Sequence[str],
                   system: str | None = None) -> list[tuple[list[int], list[int]]]:
  """[pair_ids(tokenizer, p, r, system) for p, r in zip(prompts, responses)], with one batched
  tokenizer call per kind of text (the Rust tokenizer encodes a batch in parallel)."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  if not prompts:
    return []
  p_texts = [prompt_text(tokenizer, p, system) for p in prompts]
  p_all = tokenizer(p_texts, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
  out: list = [None] * len(prompts)
  if has_chat_template(tokenizer):
    turns = [to_messages(p, system) + [{"role": "assistant", "content": r}]
             for p, r in zip(prompts, responses)]
    fulls = [apply_template(tokenizer, m) for m in turns]
    for i, (p_ids, full) in enumerate(zip(p_all, tokenizer(fulls, add_special_tokens=False)["input_ids"])):
      if len(full) > len(p_ids) and full[:len(p_ids)] == p_ids:
        out[i] = (list(full), [0] * len(p_ids) + [1] * (len(full) - len(p_ids)))
    for i in [i for i, o in enumerate(out) if o is None]:  # rare: one call each
      r_ids = _template_suffix(tokenizer, p_texts[i], fulls[i])
      if r_ids:
        out[i] = (list(p_all[i]) + r_ids, [0] * len(p_all[i]) + [1] * len(r_ids))
  rest = [i for i, o in enumerate(out) if o is None]
  if rest:
    eos = eos_id(tokenizer)
    r_all = tokenizer([responses[i] for i in rest], add_special_tokens=False)["input_ids"]
    for i, r_ids in zip(rest, r_all):
      r_ids = list(r_ids) + ([eos] if eos is not None else [])
      out[i] = (list(p_all[i]) + r_ids, [0] * len(p_all[i]) + [1] * len(r_ids))
  return out
