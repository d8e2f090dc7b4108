"""Zero-shot classification: prompt-ensembled class text embeddings vs image embeddings (CLIP).

Class-name and template sets: the built-in digits ones (`digits`; `digits_eval`, `digits_train`),
the data files in `assets/`, `<name>_templates.txt` (one prompt per line, `{}` marks the class
name) and `<name>_classnames.txt` (one class name per line, in label order), or a text file in
the same layout given by its path.
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslvl_jax.data import builtin
from sslvl_jax.errors import ConfigError
from sslvl_jax.evals.common import similarity
from sslvl_jax.losses import l2_normalize


def class_text_embeddings(encode_text_fn: Callable[[np.ndarray], jax.Array],
                          tokenize_fn: Callable[[Sequence[str]], np.ndarray],
                          classnames: Sequence[str], templates: Sequence[str]) -> jax.Array:
  """(C, d) class embeddings: embed each prompt of a class, L2-normalise, average, renormalise."""
  rows = []
  for name in classnames:
    emb = l2_normalize(encode_text_fn(tokenize_fn([t.format(name) for t in templates])))
    rows.append(l2_normalize(emb.mean(axis=0)))
  return jnp.stack(rows)


def zero_shot_scores(image_embeds: jax.Array, class_embeds: jax.Array) -> jax.Array:
  """(n, C) cosine similarities of the (L2-normalised) image embeddings to the class embeddings."""
  return similarity(l2_normalize(image_embeds), l2_normalize(class_embeds))


ASSETS = importlib.resources.files("sslvl_jax.evals") / "assets"
BUILTIN = {"classnames": {"digits": builtin.CLASSNAMES},
           "templates": {"digits_eval": builtin.EVAL_TEMPLATES,
                         "digits_train": builtin.TRAIN_TEMPLATES}}
LAYOUT = {"classnames": ("class-name", "one name per line"),
          "templates": ("template", "one prompt per line, {} marking the class name")}


def known(kind: str) -> list[str]:
  """Names of the shipped `kind` ('classnames' or 'templates') sets: built-in and assets."""
  return sorted([*BUILTIN[kind], *(p.name[:-len(f"_{kind}.txt")] for p in ASSETS.iterdir()
                                   if p.name.endswith(f"_{kind}.txt"))])


def _lines(name: str, kind: str) -> list[str]:
  """The shipped `kind` set `name`, or the non-empty lines of the text file at path `name`."""
  if name in BUILTIN[kind]:
    return list(BUILTIN[kind][name])
  path = ASSETS / f"{name}_{kind}.txt"
  if not path.is_file():
    path = pathlib.Path(os.path.expanduser(name))
  noun, layout = LAYOUT[kind]
  if not path.is_file():
    raise ConfigError(f"no such {noun} set; known: {', '.join(known(kind))} (or a path to a "
                      f"text file with {layout})")
  lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  if not lines:
    raise ConfigError(f"{path} is empty; it needs {layout}")
  return lines


def load_templates(name: str) -> list[str]:
  """Prompt templates: a shipped set (e.g. 'imagenet': CLIP's 80) or a file's lines."""
  return _lines(name, "templates")


def load_classnames(name: str) -> list[str]:
  """Class names in label order: a shipped set (e.g. 'imagenet') or a file's lines."""
  return _lines(name, "classnames")
