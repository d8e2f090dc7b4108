"""Dense decoders of the pretext-task methods: backbone feature maps -> per-pixel outputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sslvl_jax.models.heads import batch_norm
from sslvl_jax.models.layers import Dtype
from sslvl_jax.models.resnet import conv


def feature_map(out: dict[str, jax.Array], image_hw: tuple[int, int]) -> jax.Array:
  """The spatial features (b, h', w', c) of a backbone's output dict: a ResNet's last map
  ('features') or a ViT's patch tokens ('patch_tokens') laid out on the patch grid of `image_hw`."""
  if "features" in out:
    return out["features"]
  tokens = out["patch_tokens"]
  b, n, c = tokens.shape
  gh = round(math.sqrt(n * image_hw[0] / image_hw[1]))
  return tokens.reshape(b, gh, n // gh, c)


class ConvDecoder(nnx.Module):
  """1x1 conv -> BN -> relu, bilinear resize to the output size, `num_layers` x (3x3 conv -> BN ->
  relu), then a 1x1 conv with bias to `out_dim` channels (logits or pixels)."""

  def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 256, num_layers: int = 2,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.convs = nnx.List([conv(in_dim, hidden_dim, 1, 1, **kw)] +
                          [conv(hidden_dim, hidden_dim, 3, 1, **kw) for _ in range(num_layers)])
    self.norms = nnx.List([batch_norm(hidden_dim, **kw) for _ in range(num_layers + 1)])
    self.out = nnx.Conv(hidden_dim, out_dim, (1, 1), **kw)

  def __call__(self, x: jax.Array, size: tuple[int, int], *, train: bool) -> jax.Array:
    """(b, h', w', in_dim) features -> (b, *size, out_dim) float32."""
    for i, (layer, norm) in enumerate(zip(self.convs, self.norms)):
      x = jax.nn.relu(norm(layer(x), use_running_average=not train))
      if i == 0:
        x = jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear")
    return self.out(x).astype(jnp.float32)
