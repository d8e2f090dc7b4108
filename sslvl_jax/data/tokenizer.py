"""SentencePiece tokenizer with CLIP-style framing: BOS, pieces, EOT, padding to the context length."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

PAD_ID, UNK_ID, BOS_ID, EOT_ID = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """Everything needed to reproduce the token ids of a text, exported with every text encoder."""

  model_path: str
  context_length: int
  lowercase: bool = True
  pad_id: int = PAD_ID
  bos_id: int = BOS_ID
  eot_id: int = EOT_ID


class Tokenizer:
  """Encodes texts to (n, context_length) int32: [BOS] pieces [EOT] [PAD]...; EOT kept on truncation."""

  def __init__(self, spec: TokenizerSpec):
    if not epath.Path(spec.model_path).is_file():  # local or gs://
      raise FileNotFoundError(
          f"tokenizer model {spec.model_path!r} not found; set --config.data.tokenizer to a "
          "SentencePiece .model file or train one with `python -m sslvl_jax.data.train_tokenizer`")
    self.spec = spec
    self.sp = spm.SentencePieceProcessor(model_proto=epath.Path(spec.model_path).read_bytes())
    for name in ("pad_id", "bos_id", "eot_id"):
      sp_id = {"pad_id": self.sp.pad_id(), "bos_id": self.sp.bos_id(), "eot_id": self.sp.eos_id()}[name]
      if sp_id != getattr(spec, name):
        raise ValueError(f"tokenizer {spec.model_path}: {name} is {sp_id} in the model, "
                         f"{getattr(spec, name)} in the spec")

  @property
  def vocab_size(self) -> int:
    """Number of ids (embedding table size)."""
    return self.sp.get_piece_size()

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Token ids for each text, framed and padded, (len(texts), context_length) int32."""
    s = self.spec
    if s.context_length < 2:
      raise ValueError(f"context_length must be >= 2 (BOS and EOT), got {s.context_length}")
    texts = [t.lower() if s.lowercase else t for t in texts]
    out = np.full((len(texts), s.context_length), s.pad_id, np.int32)
    for i, ids in enumerate(self.sp.encode(list(texts))):
      ids = [s.bos_id] + ids[: s.context_length - 2] + [s.eot_id]
      out[i, : len(ids)] = ids
    return out


def train_sentencepiece(texts: Sequence[str], model_prefix: str, vocab_size: int,
                        model_type: str = "bpe") -> str:
  """Train a SentencePiece model deterministically on `texts`; returns the .model path."""
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_prefix=model_prefix, vocab_size=vocab_size,
      model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOT_ID,
      character_coverage=1.0, hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False,
      minloglevel=2, normalization_rule_name="identity", max_sentence_length=4096)
  return model_prefix + ".model"
