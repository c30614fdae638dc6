"""The tensorflow-text SentencePiece backend gives the same ids as the HF tokenizer (extra `tf`)."""
import os

import pytest

pytestmark = pytest.mark.tf
tf_text = pytest.importorskip("tensorflow_text")
spm = pytest.importorskip("sentencepiece")

from persyn_jax.data.tf_tokenizer import TFSentencePieceTokenizer  # noqa: E402

TEXTS = ["The answer is 42.", "hello world, how are you today?", "Tom has 12 apples. 12 - 5 = 7.",
         "  leading spaces and\nnewlines", "ünïcödé and emoji 🙂"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  d = tmp_path_factory.mktemp("spm")
  corpus = os.path.join(d, "corpus.txt")
  with open(corpus, "w") as f:
    f.write("\n".join(TEXTS * 20))
  spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(d, "tokenizer"),
                                 vocab_size=400, model_type="bpe", byte_fallback=True,
                                 character_coverage=1.0)
  return str(d)


def test_same_ids_as_hf_tokenizer(sp_model):
  import transformers

  # transformers 5 builds its (fast) LlamaTokenizer from the directory's tokenizer.model
  hf = transformers.LlamaTokenizer.from_pretrained(sp_model, add_bos_token=False,
                                                   add_eos_token=False, legacy=True)
  sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_model, "tokenizer.model"))
  tft = TFSentencePieceTokenizer(sp_model)
  for text in TEXTS:
    assert tft.encode(text) == sp.encode(text)  # the SentencePiece model itself, exactly
  # transformers' Llama tokenizer adds its own handling of leading spaces and newlines, so the
  # HF comparison covers plain sentences (the ids a chat template's text mostly yields)
  for text in TEXTS[:3]:
    assert tft.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
  assert tft.encode_batch(TEXTS) == [sp.encode(t) for t in TEXTS]
  assert tft.decode(tft.encode(TEXTS[0])) == TEXTS[0]
