"""CIE Lab colour (D65 white, sRGB gamma) on device and the quantised ab gamut of colorization.

`rgb_to_lab` / `lab_to_rgb` follow scikit-image's rgb2lab / lab2rgb (sRGB primaries, D65 2-degree
white point, CIE 1976 L*a*b*). `ab_gamut_bins` is Zhang et al.'s output space: the centres of the
10 x 10 ab cells that some sRGB colour falls in; `soft_encode` spreads a colour over its nearest
bins and `rebalance_weights` gives the class-rebalancing factor of each bin from a colour prior.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

D65 = (0.95047, 1.0, 1.08883)  # XYZ of the D65 white, 2-degree observer (scikit-image's default)
XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
EPSILON, KAPPA = 0.008856, 7.787  # CIE's f(t) switches from the cube root to a line below EPSILON


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
  """sRGB in [0, 1] (..., 3) -> Lab (..., 3): L in [0, 100], a and b roughly in [-128, 128]."""
  rgb = jnp.asarray(rgb, jnp.float32)
  linear = jnp.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  xyz = linear @ jnp.asarray(XYZ_FROM_RGB.T / np.asarray(D65)[None], jnp.float32)
  f = jnp.where(xyz > EPSILON, jnp.cbrt(jnp.maximum(xyz, EPSILON)), KAPPA * xyz + 16.0 / 116.0)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(lab: jax.Array) -> jax.Array:
  """Lab (..., 3) -> sRGB in [0, 1] (..., 3), out-of-gamut colours clipped (as scikit-image)."""
  lab = jnp.asarray(lab, jnp.float32)
  fy = (lab[..., 0] + 16.0) / 116.0
  f = jnp.stack([fy + lab[..., 1] / 500.0, fy, jnp.maximum(fy - lab[..., 2] / 200.0, 0.0)], -1)
  xyz = jnp.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / KAPPA) * jnp.asarray(D65)
  linear = xyz @ jnp.asarray(RGB_FROM_XYZ.T, jnp.float32)
  rgb = jnp.where(linear > 0.0031308,
                  1.055 * jnp.maximum(linear, 0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * linear)
  return jnp.clip(rgb, 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def ab_gamut_bins(grid: int = 10, levels: int = 64) -> np.ndarray:
  """(Q, 2) float32 centres (multiples of `grid`) of the ab cells that sRGB colours fall in.

  The `levels`^3 colours of an even sRGB grid are converted to Lab and their ab rounded to the
  nearest multiple of `grid`; the occupied cells, sorted by (a, b), are the bins. For grid 10,
  64 levels hit the same 261 cells as all 256^3 8-bit colours (tests/test_pretext.py); Zhang et
  al.'s released set (pts_in_hull) has 313, so at least 52 of its cells hold no 8-bit sRGB colour.
  """
  v = np.linspace(0.0, 1.0, levels, dtype=np.float32)
  rgb = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)
  with jax.ensure_compile_time_eval():  # concrete even when first called under a trace
    ab = np.asarray(rgb_to_lab(rgb))[:, 1:]
  return np.unique(np.round(ab / grid).astype(np.int32), axis=0).astype(np.float32) * grid


def soft_encode(ab: jax.Array, bins: jax.Array, neighbours: int = 5, sigma: float = 5.0
                ) -> jax.Array:
  """ab (..., 2) -> (..., Q) weights on the `neighbours` nearest bins, Gaussian in the distance
  (`sigma` in ab units), summing to 1."""
  d2 = jnp.sum(jnp.square(ab[..., None, :] - jnp.asarray(bins, ab.dtype)), axis=-1)
  neg_d2, idx = jax.lax.top_k(-d2, neighbours)
  w = jax.nn.softmax(neg_d2 / (2.0 * sigma ** 2), axis=-1)  # exp(-d^2 / 2 sigma^2), normalised
  return jnp.sum(jax.nn.one_hot(idx, bins.shape[0], dtype=w.dtype) * w[..., None], axis=-2)


def rebalance_weights(prior: jax.Array, bins: jax.Array, sigma: float = 5.0, mix: float = 0.5
                      ) -> jax.Array:
  """(Q,) class-rebalancing factors: the prior smoothed by a Gaussian (`sigma`) over the ab plane,
  mixed with the uniform by `mix`, inverted, normalised to expectation 1 under the smoothed
  prior."""
  bins = jnp.asarray(bins, jnp.float32)
  kernel = jnp.exp(-jnp.sum(jnp.square(bins[:, None] - bins[None]), -1) / (2.0 * sigma ** 2))
  smooth = kernel @ prior
  smooth = smooth / jnp.sum(smooth)
  w = 1.0 / ((1.0 - mix) * smooth + mix / bins.shape[0])
  return w / jnp.sum(smooth * w)
