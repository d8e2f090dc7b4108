"""Zero-shot classification: prompt-ensembled class text embeddings vs image embeddings (CLIP).

Data files live in `assets/`: `<name>_templates.txt` (one prompt per line, `{}` marks the class
name) and `<name>_classnames.txt` (one class name per line, in label order).
"""

from __future__ import annotations

import importlib.resources
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslvl_jax.errors import ConfigError
from sslvl_jax.evals.common import l2_normalize, similarity


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


def _asset_lines(name: str, kind: str) -> list[str]:
  """Non-empty lines of assets/<name>_<kind>.txt."""
  assets = importlib.resources.files("sslvl_jax.evals") / "assets"
  path = assets / f"{name}_{kind}.txt"
  if not path.is_file():
    known = sorted(p.name[:-len(f"_{kind}.txt")] for p in assets.iterdir()
                   if p.name.endswith(f"_{kind}.txt"))
    raise ConfigError(f"unknown {kind} {name!r}; known: {', '.join(known)}")
  return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_templates(name: str) -> list[str]:
  """Prompt templates shipped as assets/<name>_templates.txt (e.g. 'imagenet': CLIP's 80)."""
  return _asset_lines(name, "templates")


def load_classnames(name: str) -> list[str]:
  """Class names shipped as assets/<name>_classnames.txt, in label order (e.g. 'imagenet')."""
  return _asset_lines(name, "classnames")
