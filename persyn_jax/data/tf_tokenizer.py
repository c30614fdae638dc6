"""Optional tensorflow-text SentencePiece backend (the `tf` extra: `pip install persyn-jax[tf]`).

For users whose input pipelines are tf.data: tokenizes inside a TF graph with the same
SentencePiece model file (`tokenizer.model`) as the HF tokenizer of a SentencePiece model
(Llama 2, Mistral, Gemma), giving the same ids. Chat templates stay on the HF side
(chat.prompt_text renders the text; this backend only maps text to ids).
"""
from __future__ import annotations

import os
from typing import Sequence


def find_model_file(path: str) -> str:
  """`path` itself, or `<path>/tokenizer.model` for an HF model directory."""
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.model")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no SentencePiece model (tokenizer.model) here")
  return path


class TFSentencePieceTokenizer:
  """tensorflow_text.SentencepieceTokenizer with HF-like encode/decode."""

  def __init__(self, model: str | bytes, *, add_bos: bool = False, add_eos: bool = False):
    import tensorflow as tf
    import tensorflow_text as tf_text

    proto = model if isinstance(model, bytes) else open(find_model_file(model), "rb").read()
    self._tf = tf
    self.sp = tf_text.SentencepieceTokenizer(model=proto, out_type=tf.int32, add_bos=add_bos,
                                             add_eos=add_eos)

  @property
  def vocab_size(self) -> int:
    return int(self.sp.vocab_size())

  def tokenize(self, texts):
    """A tf string tensor [N] -> RaggedTensor [N, None] of ids (usable inside tf.data.map)."""
    return self.sp.tokenize(texts)

  def encode(self, text: str) -> list[int]:
    return self.sp.tokenize(self._tf.constant([text]))[0].numpy().tolist()

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.sp.tokenize(self._tf.constant(list(texts))).to_list()

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.detokenize(self._tf.constant([list(ids)], self._tf.int32))[0].numpy().decode()
