"""Zero-shot classification: prompt-ensembled class text embeddings vs image embeddings (CLIP).

Class names, templates and class subsets are each given as a list, a shipped set or the path of a
text file (local or gs://, one entry per line, empty lines ignored). Shipped sets: the built-in
digits ones (`digits`; `digits_eval`, `digits_train`) and the files in `assets/`:
`<name>_templates.txt` (one prompt per line, `{}` marks the class name), `<name>_classnames.txt`
(one class name per line, in label order) and `<name>_class_subset.txt` (one class index per
line: the classes of the full set a dataset covers, e.g. ImageNet-R's 200 of ImageNet's 1000).
"""

from __future__ import annotations

import importlib.resources
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

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


def mean_per_class_recall(scores: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 recall of each class present in `labels`, averaged (balanced accuracy)."""
  hit = np.asarray(scores).argmax(axis=1) == labels
  return float(np.mean([hit[labels == c].mean() for c in np.unique(labels)]))


def readable(folder: str) -> str:
  """A class folder name as a class name: underscores to spaces ('ankle_boot' -> 'ankle boot')."""
  return " ".join(folder.replace("_", " ").split())


ASSETS = importlib.resources.files("sslvl_jax.evals") / "assets"
BUILTIN = {"classnames": {"digits": builtin.CLASSNAMES},
           "templates": {"digits_eval": builtin.EVAL_TEMPLATES,
                         "digits_train": builtin.TRAIN_TEMPLATES},
           "class_subset": {}}
LAYOUT = {"classnames": ("class-name", "one name per line"),
          "templates": ("template", "one prompt per line, {} marking the class name"),
          "class_subset": ("class-subset", "one class index per line")}


def known(kind: str) -> list[str]:
  """Names of the shipped `kind` sets ('classnames', 'templates', 'class_subset')."""
  return sorted([*BUILTIN[kind], *(p.name[:-len(f"_{kind}.txt")] for p in ASSETS.iterdir()
                                   if p.name.endswith(f"_{kind}.txt"))])


def _lines(value: str | Sequence[str], kind: str) -> list[str]:
  """A list as given, the shipped `kind` set `value`, or the non-empty lines of file `value`."""
  noun, layout = LAYOUT[kind]
  if not isinstance(value, str):
    lines = [str(v) for v in value]
    if not lines:
      raise ConfigError(f"the list is empty; it needs {layout.replace(' per line', '')}")
    return lines
  if value in BUILTIN[kind]:
    return list(BUILTIN[kind][value])
  path = ASSETS / f"{value}_{kind}.txt"
  if not path.is_file():
    path = epath.Path(os.path.expanduser(value))
  if not path.is_file():
    listed = ", ".join(known(kind)) or "none"
    raise ConfigError(f"no such {noun} set; known: {listed} (or a path to a text file with "
                      f"{layout})")
  lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  if not lines:
    raise ConfigError(f"{path} is empty; it needs {layout}")
  return lines


def load_templates(value: str | Sequence[str]) -> list[str]:
  """Prompt templates, each with one `{}`: a list, a shipped set (e.g. 'imagenet': CLIP's 80)
  or a file's lines."""
  templates = _lines(value, "templates")
  bad = [t for t in templates if t.count("{}") != 1]
  if bad:
    raise ConfigError(f"template {bad[0]!r} needs exactly one {{}} where the class name goes")
  return templates


def load_classnames(value: str | Sequence[str]) -> list[str]:
  """Class names in label order: a list, a shipped set (e.g. 'imagenet') or a file's lines."""
  return _lines(value, "classnames")


def load_class_subset(value: str | Sequence[int], num_classes: int) -> np.ndarray:
  """Indices into `num_classes` class names, unique and in range: a list, a shipped set
  (e.g. 'imagenet_r') or a file's lines. Label j of the dataset is class `subset[j]`."""
  lines = _lines(value, "class_subset")
  try:
    subset = np.asarray([int(x) for x in lines], np.int64)
  except ValueError as e:
    raise ConfigError(f"class indices must be integers ({e})") from e
  out = subset[(subset < 0) | (subset >= num_classes)]
  if len(out):
    raise ConfigError(f"class index {out[0]} is outside the {num_classes} class names")
  if len(np.unique(subset)) != len(subset):
    raise ConfigError(f"{len(subset) - len(np.unique(subset))} class indices repeat")
  return subset
