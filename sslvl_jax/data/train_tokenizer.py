"""Train a SentencePiece tokenizer on captions.

  python -m sslvl_jax.data.train_tokenizer --captions=caps.txt [--captions=more.tsv:caption] \
      --out=tok --vocab_size=32000
  python -m sslvl_jax.data.train_tokenizer --builtin=digits --out=sslvl_jax/data/assets/digits_sp

`--captions` takes plain text files (one caption per line, local or gs://) or CSV/TSV files with
`:COLUMN`; the delimiter is --delimiter, else a tab for .tsv, else sniffed from the header line.
"""

from __future__ import annotations

import os

from absl import flags
from etils import epath

from sslvl_jax import cli
from sslvl_jax.errors import ConfigError
from sslvl_jax.data import builtin, sources
from sslvl_jax.data.tokenizer import train_sentencepiece

FLAGS = flags.FLAGS
BUILTIN_VOCAB = 128
TABLES = (".csv", ".tsv", ".tab")


def read_captions(spec: str, delimiter: str | None = None) -> list[str]:
  """Captions from 'file.txt' (one per line) or 'file.csv:column' / 'file.tsv:column'."""
  head, _, column = spec.rpartition(":")
  path, column = (head, column) if head.lower().endswith(TABLES) else (spec, "")
  path = os.path.expanduser(path)
  if not column:
    if path.lower().endswith(TABLES):
      raise ConfigError(f"--captions={spec}: name the caption column, --captions={spec}:COLUMN "
                        f"(columns: {sources.read_table(path, delimiter)[0]})")
    try:
      lines = epath.Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"--captions={spec}: cannot read {path}: "
                        f"{getattr(e, 'strerror', None) or e}") from e
    return [line.strip() for line in lines if line.strip()]
  columns, rows = sources.read_table(path, delimiter)
  sources.require_columns(path, columns, (column,), f"give --captions={path}:COLUMN with one of "
                          "them, or --delimiter if the columns ran together")
  return [(row[column] or "").strip() for row in rows if (row[column] or "").strip()]


def define_flags() -> None:
  """The CLI flags (defined only when run as a program: importing this module, as the data-source
  registry does, defines none)."""
  flags.DEFINE_multi_string("captions", [], "caption files (txt, or csv/tsv:COLUMN)")
  flags.DEFINE_string("delimiter", None, "CSV/TSV delimiter (default: sniffed)")
  flags.DEFINE_enum("builtin", None, ["digits"], "train on a built-in caption set")
  flags.DEFINE_string("out", None, "output prefix (writes PREFIX.model and PREFIX.vocab)")
  flags.DEFINE_integer("vocab_size", 32000, "vocabulary size (a maximum on small corpora)")
  flags.DEFINE_enum("model_type", "bpe", ["unigram", "bpe"], "SentencePiece algorithm")


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.out:
    raise ConfigError("--out is required (see --help)")
  if FLAGS.builtin:
    texts, vocab = [t.lower() for t in builtin.tokenizer_corpus()], BUILTIN_VOCAB
  else:
    texts = [t.lower() for spec in FLAGS.captions for t in read_captions(spec, FLAGS.delimiter)]
    vocab = FLAGS.vocab_size
  if not texts:
    raise ConfigError("no captions: pass --captions=FILE or --builtin=digits")
  print(train_sentencepiece(texts, FLAGS.out, vocab, FLAGS.model_type))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
