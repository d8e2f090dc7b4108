"""Image-text retrieval recall@k with several captions per image (COCO / Flickr30k layout)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslvl_jax.evals.common import similarity
from sslvl_jax.losses import l2_normalize


def retrieval_recalls(image_embeds: jax.Array, text_embeds: jax.Array, text_to_image: jax.Array,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k both ways by cosine similarity; `text_to_image[j]` is the image of caption j.

  image->text: an image counts when any of its captions is among its k nearest texts;
  text->image: a caption counts when its image is among its k nearest images. Keys
  'image_to_text_r{k}' and 'text_to_image_r{k}', values are fractions; ties go to the lower index.
  """
  sim = similarity(l2_normalize(image_embeds), l2_normalize(text_embeds))  # (images, texts)
  owner = jnp.asarray(text_to_image)
  _, i2t = jax.lax.top_k(sim, min(max(ks), sim.shape[1]))
  _, t2i = jax.lax.top_k(sim.T, min(max(ks), sim.shape[0]))
  i2t_hit = np.asarray(owner[i2t] == jnp.arange(sim.shape[0])[:, None])
  t2i_hit = np.asarray(t2i == owner[:, None])
  out = {}
  for k in ks:
    out[f"image_to_text_r{k}"] = float(i2t_hit[:, :k].any(axis=1).mean())
    out[f"text_to_image_r{k}"] = float(t2i_hit[:, :k].any(axis=1).mean())
  return out
