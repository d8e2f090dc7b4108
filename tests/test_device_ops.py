"""Device photometric ops against numpy/colorsys/PIL references written here; randomness checks."""

from __future__ import annotations

import colorsys
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from sslvl_jax.data import device_ops as D
from sslvl_jax.errors import ConfigError

LUMA = np.array([0.299, 0.587, 0.114])


def _images(b=4, h=5, w=6, seed=0):
  return np.random.default_rng(seed).uniform(size=(b, h, w, 3)).astype(np.float32)


# ---- numpy references, one image (h, w, 3) at a time ------------------------------------------
def ref_gray(x):
  return np.repeat((x @ LUMA)[..., None], 3, axis=-1)


def ref_per_pixel(x, fn):
  flat = x.reshape(-1, 3).astype(np.float64)
  return np.array([fn(*px) for px in flat]).reshape(x.shape)


def ref_brightness(x, v, mode):
  return np.clip(x * v if mode == "multiplicative" else x + v, 0, 1)


def ref_contrast(x, f, mode):
  mean = (x @ LUMA).mean() if mode == "gray" else x.mean(axis=(0, 1))
  return np.clip(f * x + (1 - f) * mean, 0, 1)


def ref_saturation(x, f, mode):
  if mode == "blend":
    return np.clip(f * x + (1 - f) * ref_gray(x), 0, 1)

  def px(r, g, b):
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    return colorsys.hsv_to_rgb(h, min(max(s * f, 0.0), 1.0), v)
  return ref_per_pixel(x, px)


def ref_hue(x, delta):
  def px(r, g, b):
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    return colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
  return ref_per_pixel(x, px)


def ref_blur(x, sigma, radius, pad_mode):
  t = np.arange(-radius, radius + 1)
  g = np.exp(-t ** 2 / (2 * sigma ** 2))
  kernel = np.outer(g, g) / g.sum() ** 2
  p = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode=pad_mode)
  h, w, _ = x.shape
  out = np.zeros_like(x, dtype=np.float64)
  for i in range(h):
    for j in range(w):
      out[i, j] = (p[i:i + 2 * radius + 1, j:j + 2 * radius + 1] * kernel[..., None]).sum((0, 1))
  return out


def ref_solarize(x, threshold=0.5):
  return np.where(x < threshold, x, 1 - x)


def _close(a, b, atol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


# ---- single ops ---------------------------------------------------------------------------------
def test_grayscale_is_pil_luma():
  img = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
  ours = np.asarray(D.to_grayscale(jnp.asarray(img[None] / 255.0, jnp.float32)))[0] * 255
  pil = np.asarray(Image.fromarray(img).convert("L"), np.float32)
  assert np.abs(ours - pil[..., None]).max() <= 0.51
  _close(ours / 255, ref_gray(img / 255.0))


@pytest.mark.parametrize("mode,values", [("multiplicative", [0.2, 0.9, 1.3, 1.8]),
                                         ("additive", [-0.4, -0.1, 0.2, 0.4])])
def test_brightness_both_semantics(mode, values):
  x = _images()
  out = D.adjust_brightness(jnp.asarray(x), jnp.asarray(values), mode)
  _close(out, np.stack([ref_brightness(xi, v, mode) for xi, v in zip(x, values)]))


@pytest.mark.parametrize("mode", ["gray", "channel"])
def test_contrast(mode):
  x, factors = _images(), [0.0, 0.6, 1.0, 1.4]
  out = D.adjust_contrast(jnp.asarray(x), jnp.asarray(factors), mode)
  _close(out, np.stack([ref_contrast(xi, f, mode) for xi, f in zip(x, factors)]))


@pytest.mark.parametrize("mode", ["blend", "hsv"])
def test_saturation(mode):
  x, factors = _images(), [0.0, 0.5, 1.2, 1.8]
  out = D.adjust_saturation(jnp.asarray(x), jnp.asarray(factors), mode)
  _close(out, np.stack([ref_saturation(xi, f, mode) for xi, f in zip(x, factors)]))


def test_hue_rotation_matches_colorsys():
  x, deltas = _images(b=5), [-0.5, -0.1, 0.0, 0.07, 0.5]
  x[0, 0, 0] = [0.3, 0.3, 0.3]  # gray pixel: hue undefined, must stay gray
  x[1, 0, 0] = [0.9, 0.9, 0.2]  # r == g == max tie
  out = D.adjust_hue(jnp.asarray(x), jnp.asarray(deltas))
  _close(out, np.stack([ref_hue(xi, d) for xi, d in zip(x, deltas)]), atol=5e-5)


def test_hsv_conversions_match_colorsys():
  x = _images(b=2)
  x[0, 0, :3] = [[0, 0, 0], [1, 1, 1], [0.2, 0.7, 0.7]]
  hsv = np.asarray(D.rgb_to_hsv(jnp.asarray(x)))
  _close(hsv, np.stack([ref_per_pixel(xi, colorsys.rgb_to_hsv) for xi in x]), atol=5e-6)
  _close(D.hsv_to_rgb(jnp.asarray(hsv)), x, atol=5e-6)


@pytest.mark.parametrize("pad_mode,np_mode", [("edge", "edge"), ("constant", "constant")])
def test_blur_is_a_2d_gaussian_convolution(pad_mode, np_mode):
  x, sigmas, radius = _images(b=3, h=7, w=9), [0.3, 1.0, 2.5], 3
  out = D.gaussian_blur(jnp.asarray(x), jnp.asarray(sigmas), radius, pad_mode)
  _close(out, np.stack([ref_blur(xi, s, radius, np_mode) for xi, s in zip(x, sigmas)]))


def test_sigma_blur_approximates_pil_gaussian_blur():
  small = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(small).resize((48, 48), Image.BICUBIC))
  radius = D.BLUR_KERNELS.get("sigma").radius(48, 2.0)
  for sigma in (1.0, 2.0):
    pil = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)), np.float32)
    ours = np.asarray(D.gaussian_blur(jnp.asarray(img[None] / 255.0, jnp.float32), sigma,
                                      radius, "edge"))[0] * 255
    assert np.abs(pil - ours).mean() < 1.0 < np.abs(pil - img).mean()


def test_blur_kernel_radii():
  assert D.BLUR_KERNELS.get("fraction").radius(224, 2.0) == 11  # BYOL: 224 / 10 -> radius 11
  assert D.BLUR_KERNELS.get("fraction").radius(96, 2.0) == 4
  assert D.BLUR_KERNELS.get("sigma").radius(224, 2.0) == 6


def test_solarize_threshold_matches_pil_128():
  img = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
  ours = np.asarray(D.solarize(jnp.asarray(img / 255.0, jnp.float32))) * 255
  pil = np.asarray(ImageOps.solarize(Image.fromarray(img[0]), threshold=128))
  np.testing.assert_array_equal(np.round(ours[0]).astype(np.uint8), pil)
  x = _images()
  _close(D.solarize(jnp.asarray(x), 0.3), ref_solarize(x, 0.3))


def test_normalize():
  x = _images()
  mean, std = D.NORMALIZATIONS.get("clip")
  _close(D.normalize(jnp.asarray(x), mean, std), (x - np.array(mean)) / np.array(std), 1e-5)


# ---- colour jitter: order, ranges, semantics ------------------------------------------------------
OPS = ("brightness", "contrast", "saturation", "hue")


def ref_jitter(x, order, values, spec):
  for idx in order:
    v = values[idx]
    if idx == 0:
      x = ref_brightness(x, v, spec.brightness_mode)
    elif idx == 1:
      x = ref_contrast(x, v, spec.contrast_mode)
    elif idx == 2:
      x = ref_saturation(x, v, spec.saturation_mode)
    else:
      x = ref_hue(x, v)
  return x


@pytest.mark.parametrize("preset", ["dino_global1", "byol_view1"])
def test_apply_jitter_follows_each_examples_order(preset):
  spec = D.PHOTOMETRIC.get(preset)
  x = _images(b=4)
  orders = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]], np.int32)
  values = np.array([[1.3, 0.7, 1.2, 0.08], [0.7, 1.3, 0.8, -0.1],
                     [1.1, 1.4, 0.9, 0.05], [0.8, 0.6, 1.1, -0.03]], np.float32)
  if spec.brightness_mode == "additive":
    values[:, 0] -= 1.0
  params = D.JitterParams(jnp.asarray(orders), *jnp.asarray(values.T))
  out = D.apply_jitter(jnp.asarray(x), params, spec)
  ref = np.stack([ref_jitter(xi, o, v, spec) for xi, o, v in zip(x, orders, values)])
  _close(out, ref, atol=5e-5)
  swapped = params._replace(order=jnp.asarray(orders[::-1].copy()))  # same values, other orders
  assert np.abs(np.asarray(D.apply_jitter(jnp.asarray(x), swapped, spec)) - ref).max() > 1e-3


def test_sampled_jitter_orders_and_ranges():
  spec = D.PHOTOMETRIC.get("dino_global1")  # torchvision (0.4, 0.4, 0.2, 0.1)
  p = jax.tree.map(np.asarray, D.sample_jitter(jax.random.key(0), 4800, spec))
  counts = {perm: 0 for perm in itertools.permutations(range(4))}
  for row in p.order:
    counts[tuple(row)] += 1
  assert len(counts) == 24 and min(counts.values()) > 120  # expect 200 each
  assert 0.6 <= p.brightness.min() and p.brightness.max() <= 1.4
  assert 0.6 <= p.contrast.min() and p.contrast.max() <= 1.4
  assert 0.8 <= p.saturation.min() and p.saturation.max() <= 1.2
  assert -0.1 <= p.hue.min() and p.hue.max() <= 0.1 and abs(p.hue.mean()) < 0.005
  additive = D.sample_jitter(jax.random.key(0), 4800, D.PHOTOMETRIC.get("byol_view1")).brightness
  assert -0.4 <= float(additive.min()) < -0.39 and 0.39 < float(additive.max()) <= 0.4
  simclr = D.sample_jitter(jax.random.key(1), 4800, D.PHOTOMETRIC.get("simclr")).brightness
  assert 0.2 <= float(simclr.min()) < 0.21 and 1.79 < float(simclr.max()) <= 1.8


def test_color_jitter_factors_are_per_example():
  spec = D.PhotometricSpec(brightness=0.4, p_jitter=1.0)
  x = np.full((64, 2, 2, 3), 0.5, np.float32)
  out = np.asarray(D.color_jitter(jnp.asarray(x), jax.random.key(3), spec))
  factors = out[:, 0, 0, 0] / 0.5
  np.testing.assert_allclose(out / 0.5, np.broadcast_to(factors[:, None, None, None], out.shape),
                             atol=1e-6)
  assert factors.min() >= 0.6 and factors.max() <= 1.4 and len(np.unique(factors)) == 64


# ---- probabilities, determinism, the pipeline -----------------------------------------------------
def _changed(a, b):
  return np.abs(np.asarray(a) - np.asarray(b)).reshape(len(b), -1).max(axis=1) > 1e-6


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_probabilities_are_respected(p):
  n = 400
  x = jnp.asarray(_images(b=n, h=4, w=4, seed=5))
  key = jax.random.key(int(p * 10))
  jitter_spec = D.PhotometricSpec(0.4, 0.4, 0.2, 0.1, p_jitter=p)
  outs = {"solarize": D.random_solarize(x, key, p),
          "gray": D.random_grayscale(x, key, p),
          "blur": D.random_blur(x, key, p, sigma=(1.0, 2.0)),  # sigma 0.1 is a no-op
          "jitter": D.color_jitter(x, key, jitter_spec)}
  tol = 4 * np.sqrt(p * (1 - p) / n)
  for name, out in outs.items():
    frac = _changed(out, x).mean()
    assert abs(frac - p) <= tol, (name, frac, p)


def test_photometric_deterministic_given_key_and_varies_with_key():
  fn = jax.jit(D.photometric, static_argnums=2)
  x = jnp.asarray(_images(b=8, h=8, w=8))
  a = fn(x, jax.random.key(0), "byol_view2")
  b = fn(x, jax.random.key(0), "byol_view2")
  c = fn(x, jax.random.key(1), "byol_view2")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
  assert a.dtype == jnp.float32 and a.shape == x.shape


def test_photometric_composition_against_reference():
  spec = D.PhotometricSpec(p_gray=1.0, p_solarize=1.0, solarize_threshold=0.4, normalize="clip")
  img = np.random.default_rng(7).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
  out = D.photometric(jnp.asarray(img), jax.random.key(0), spec)
  mean, std = D.NORMALIZATIONS.get("clip")
  ref = (ref_solarize(np.stack([ref_gray(i / 255.0) for i in img]), 0.4) - mean) / np.array(std)
  _close(out, ref, 1e-5)


def test_presets_carry_the_papers_numbers():
  get = D.PHOTOMETRIC.get
  assert {"simclr", "byol_view1", "byol_view2", "dino_global1", "dino_global2", "dino_local",
          "mocov2", "simsiam", "mocov3_view1", "mocov3_view2", "clip"} <= set(D.PHOTOMETRIC.names())
  dino2 = get("dino_global2")
  assert (dino2.brightness, dino2.contrast, dino2.saturation, dino2.hue) == (0.4, 0.4, 0.2, 0.1)
  assert (get("dino_global1").p_blur, dino2.p_blur, get("dino_local").p_blur) == (1.0, 0.1, 0.5)
  assert (dino2.p_solarize, dino2.p_jitter, dino2.p_gray, dino2.blur_sigma) == (0.2, 0.8, 0.2,
                                                                                 (0.1, 2.0))
  byol1, byol2 = get("byol_view1"), get("byol_view2")
  assert byol1.brightness_mode == "additive" and byol1.blur_kernel_mode == "fraction"
  assert (byol1.p_blur, byol1.p_solarize, byol2.p_blur, byol2.p_solarize) == (1.0, 0.0, 0.1, 0.2)
  simclr = get("simclr")
  assert (simclr.brightness, simclr.hue, simclr.p_blur, simclr.p_solarize) == (0.8, 0.2, 0.5, 0)
  assert simclr.brightness_mode == "multiplicative" and simclr.normalize is None
  assert get("mocov2").saturation == 0.4 and get("mocov2") == get("simsiam")
  assert (get("mocov3_view2").p_blur, get("mocov3_view2").p_solarize) == (0.1, 0.2)
  assert get("clip") == D.PhotometricSpec(normalize="clip")
  assert D.NORMALIZATIONS.get("clip")[1] == (0.26862954, 0.26130258, 0.27577711)
  with pytest.raises(ConfigError):
    dataclasses.replace(dino2, brightness_mode="tf")
