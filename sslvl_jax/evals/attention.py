"""DINO self-attention maps: last-layer [CLS] attention per head, upsampled to the image."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sslvl_jax.models.vit import ViT


def cls_attention_maps(vit: ViT, images: jax.Array) -> jax.Array:
  """(b, heads, H, W) maps: each head's [CLS] -> patch attention, nearest-upsampled by the patch size.

  `images` are float (b, H, W, 3) as the ViT expects (normalised). Register tokens and the [CLS]
  token itself are left out, so a map sums to the head's attention mass on patches (x patch area).
  """
  attn = vit.last_attention(images)  # (b, heads, t, t)
  b, heads = attn.shape[:2]
  p = vit.patch_size
  gh, gw = images.shape[1] // p, images.shape[2] // p
  cls_to_patches = attn[:, :, 0, 1 + vit.num_registers:].reshape(b, heads, gh, gw)
  return jnp.repeat(jnp.repeat(cls_to_patches, p, axis=2), p, axis=3)
