"""A real tokenizer trained locally (byte-level BPE + a ChatML chat template).

Tests and the embedded toy world cannot download a tokenizer, so they train one here; it is a
`transformers.PreTrainedTokenizerFast`, saved and loaded like any HF tokenizer.
"""
from __future__ import annotations

from typing import Iterable

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, min_frequency: int = 1):
  """Byte-level BPE on `texts`; pad=<pad>, eos=<|im_end|> (the end of a chat turn)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                 bos_token=None, unk_token=None, chat_template=CHAT_TEMPLATE,
                                 clean_up_tokenization_spaces=False)
  fast.padding_side = "left"
  return fast
