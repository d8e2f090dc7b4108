"""Train a SentencePiece tokenizer on captions.

  python -m sslvl_jax.data.train_tokenizer --captions=caps.txt [--captions=more.tsv:caption] \
      --out=tok --vocab_size=32000
  python -m sslvl_jax.data.train_tokenizer --builtin=digits --out=sslvl_jax/data/assets/digits_sp

`--captions` takes plain text files (one caption per line) or CSV/TSV files with `:COLUMN`.
"""

from __future__ import annotations

import csv

from absl import flags

from sslvl_jax import cli
from sslvl_jax.errors import ConfigError
from sslvl_jax.data import builtin
from sslvl_jax.data.tokenizer import train_sentencepiece

_CAPTIONS = flags.DEFINE_multi_string("captions", [], "caption files (txt, or csv/tsv:COLUMN)")
_BUILTIN = flags.DEFINE_enum("builtin", None, ["digits"], "train on a built-in caption set")
_OUT = flags.DEFINE_string("out", None, "output prefix (writes PREFIX.model and PREFIX.vocab)")
_VOCAB = flags.DEFINE_integer("vocab_size", 32000, "vocabulary size (a maximum on small corpora)")
_TYPE = flags.DEFINE_enum("model_type", "bpe", ["unigram", "bpe"], "SentencePiece algorithm")
BUILTIN_VOCAB = 128


def read_captions(spec: str) -> list[str]:
  """Captions from 'file.txt' (one per line) or 'file.csv:column' / 'file.tsv:column'."""
  path, _, column = spec.partition(":")
  if not column:
    with open(path, encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
    if column not in (reader.fieldnames or []):
      raise KeyError(f"{path} has no column {column!r}; columns: {reader.fieldnames}")
    return [row[column].strip() for row in reader if row[column].strip()]


def main(argv: list[str]) -> None:
  del argv
  if not _OUT.value:
    raise ConfigError("--out is required (see --help)")
  if _BUILTIN.value:
    texts, vocab = [t.lower() for t in builtin.tokenizer_corpus()], BUILTIN_VOCAB
  else:
    texts = [t.lower() for spec in _CAPTIONS.value for t in read_captions(spec)]
    vocab = _VOCAB.value
  if not texts:
    raise ConfigError("no captions: pass --captions=FILE or --builtin=digits")
  print(train_sentencepiece(texts, _OUT.value, vocab, _TYPE.value))


if __name__ == "__main__":
  cli.run(main)
