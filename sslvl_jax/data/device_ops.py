"""Device-side photometric augmentations: batched, jittable JAX ops on float images in [0, 1].

Images are (b, h, w, 3) float arrays; every random op draws its parameters per example from a JAX
PRNG key and is deterministic given it. `photometric(images, key, spec)` runs the pipeline of the
references (torchvision / BYOL order): colour jitter (random op order per example) with
p_jitter, grayscale with p_gray, Gaussian blur with p_blur, solarize with p_solarize, then
per-channel normalisation. `PHOTOMETRIC` holds the papers' presets, as their code applies them.

Semantics switches: brightness 'multiplicative' (torchvision, SimCLR v2: x * U(1-s, 1+s)) or
'additive' (TF, BYOL: x + U(-s, s)); contrast around the image's mean 'gray' level (torchvision)
or each 'channel' mean (TF); saturation as a 'blend' with grayscale (torchvision) or by scaling S
in 'hsv' (TF); blur kernel radius from 'sigma' (ceil(3 sigma_max), edge padding, like PIL's
GaussianBlur) or a 'fraction' of the image (kernel = height / 10, zero padding: BYOL, SimCLR).
Every jitter op clips to [0, 1], as torchvision and BYOL do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from sslvl_jax.errors import ConfigError
from sslvl_jax.registry import Registry

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert('L')

NORMALIZATIONS: Registry = Registry("normalisation")
NORMALIZATIONS.add("imagenet", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
NORMALIZATIONS.add("clip", ((0.48145466, 0.4578275, 0.40821073),
                            (0.26862954, 0.26130258, 0.27577711)))
NORMALIZATIONS.add("cifar10", ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))  # solo-learn
NORMALIZATIONS.add("cifar100", ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))  # solo-learn


def _per_image(value: jax.Array | float) -> jax.Array:
  """Per-example scalars (...,) -> (..., 1, 1, 1), broadcastable against (..., h, w, 3)."""
  return jnp.asarray(value, jnp.float32)[..., None, None, None]


def _factor_range(strength: float) -> tuple[float, float]:
  return (max(0.0, 1.0 - strength), 1.0 + strength)


def luma(images: jax.Array) -> jax.Array:
  """Grayscale level (..., h, w, 1) with PIL's ITU-R 601-2 weights."""
  return jnp.sum(images * jnp.asarray(LUMA, images.dtype), axis=-1, keepdims=True)


def to_grayscale(images: jax.Array) -> jax.Array:
  """Three-channel grayscale (R = G = B = luma)."""
  return jnp.broadcast_to(luma(images), images.shape)


def rgb_to_hsv(images: jax.Array) -> jax.Array:
  """RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn), colorsys conventions."""
  r, g, b = images[..., 0], images[..., 1], images[..., 2]
  v = jnp.max(images, axis=-1)
  c = v - jnp.min(images, axis=-1)
  s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
  safe_c = jnp.where(c > 0, c, 1.0)
  h = jnp.where(v == r, (g - b) / safe_c,
                jnp.where(v == g, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c))
  h = jnp.where(c > 0, (h / 6.0) % 1.0, 0.0)
  return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """HSV in [0, 1] -> RGB in [0, 1] (inverse of rgb_to_hsv)."""
  h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
  k = (jnp.asarray([5.0, 3.0, 1.0], hsv.dtype) + 6.0 * h) % 6.0
  return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


BRIGHTNESS_MODES: Registry = Registry("brightness mode")  # name -> (apply, parameter range)
BRIGHTNESS_MODES.add("multiplicative", (lambda x, f: x * f, _factor_range))
BRIGHTNESS_MODES.add("additive", (lambda x, d: x + d, lambda s: (-s, s)))

CONTRAST_MODES: Registry = Registry("contrast mode")  # name -> the level contrast scales around
CONTRAST_MODES.add("gray", lambda x: jnp.mean(luma(x), axis=(-3, -2, -1), keepdims=True))
CONTRAST_MODES.add("channel", lambda x: jnp.mean(x, axis=(-3, -2), keepdims=True))


def _saturate_hsv(x: jax.Array, f: jax.Array) -> jax.Array:
  hsv = rgb_to_hsv(x)
  s = jnp.clip(hsv[..., 1:2] * f, 0.0, 1.0)
  return hsv_to_rgb(jnp.concatenate([hsv[..., :1], s, hsv[..., 2:]], axis=-1))


SATURATION_MODES: Registry = Registry("saturation mode")
SATURATION_MODES.add("blend", lambda x, f: f * x + (1.0 - f) * luma(x))
SATURATION_MODES.add("hsv", _saturate_hsv)


def adjust_brightness(images: jax.Array, value: jax.Array | float,
                      mode: str = "multiplicative") -> jax.Array:
  """Brightness by a per-example factor (multiplicative) or delta (additive), clipped."""
  apply, _ = BRIGHTNESS_MODES.get(mode)
  return jnp.clip(apply(images, _per_image(value)), 0.0, 1.0)


def adjust_contrast(images: jax.Array, factor: jax.Array | float, mode: str = "gray") -> jax.Array:
  """f * x + (1 - f) * mean, mean of the grayscale image ('gray') or per channel; clipped."""
  mean, f = CONTRAST_MODES.get(mode)(images), _per_image(factor)
  return jnp.clip(f * images + (1.0 - f) * mean, 0.0, 1.0)


def adjust_saturation(images: jax.Array, factor: jax.Array | float,
                      mode: str = "blend") -> jax.Array:
  """Blend with grayscale by a per-example factor ('blend'), or scale HSV saturation; clipped."""
  return jnp.clip(SATURATION_MODES.get(mode)(images, _per_image(factor)), 0.0, 1.0)


def adjust_hue(images: jax.Array, delta: jax.Array | float) -> jax.Array:
  """Rotate hue by a per-example delta (fraction of a turn, in [-0.5, 0.5]) in HSV space."""
  hsv = rgb_to_hsv(images)
  h = (hsv[..., :1] + _per_image(delta)) % 1.0
  return jnp.clip(hsv_to_rgb(jnp.concatenate([h, hsv[..., 1:]], axis=-1)), 0.0, 1.0)


def solarize(images: jax.Array, threshold: float = 0.5) -> jax.Array:
  """x if x < threshold else 1 - x (PIL's ImageOps.solarize at 128 for threshold 0.5)."""
  return jnp.where(images < threshold, images, 1.0 - images)


def augment_views(crops: jax.Array, rng: jax.Array, presets: tuple[str, ...], group: int = 0
                  ) -> list[jax.Array]:
  """The views (b, n, h, w, 3) of crop group `group` through their photometric presets (view i
  uses presets[i mod len]), each with its own key; a list of n (b, h, w, 3) float32 arrays."""
  return [photometric(crops[:, i], jax.random.fold_in(rng, 97 * group + i),
                      presets[i % len(presets)]) for i in range(crops.shape[1])]


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
  """Per-channel (x - mean) / std."""
  return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def _blur_axis(x: jax.Array, weights: jax.Array, axis: int, pad_mode: str) -> jax.Array:
  radius = (weights.shape[-1] - 1) // 2
  pad = [(0, 0)] * x.ndim
  pad[axis] = (radius, radius)
  xp = jnp.pad(x, pad, mode=pad_mode)
  n = x.shape[axis]
  return sum(_per_image(weights[..., k]) * jax.lax.slice_in_dim(xp, k, k + n, axis=axis)
             for k in range(weights.shape[-1]))


def gaussian_blur(images: jax.Array, sigma: jax.Array | float, radius: int,
                  pad_mode: str = "edge") -> jax.Array:
  """Separable Gaussian blur, per-example sigma, kernel taps -radius..radius normalised to 1.

  pad_mode 'edge' repeats border pixels (PIL); 'constant' pads with zeros (TF 'SAME' conv).
  """
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)[..., None]
  weights = jnp.exp(-taps ** 2 / (2.0 * sigma ** 2))
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return _blur_axis(_blur_axis(images, weights, images.ndim - 3, pad_mode), weights,
                    images.ndim - 2, pad_mode)


class BlurKernel(NamedTuple):
  """How a blur mode picks its static kernel radius and its border padding."""

  radius: Callable[[int, float], int]  # (image height, largest sigma) -> radius
  pad_mode: str


BLUR_KERNELS: Registry = Registry("blur kernel mode")
BLUR_KERNELS.add("sigma", BlurKernel(lambda height, sigma_max: math.ceil(3 * sigma_max), "edge"))
BLUR_KERNELS.add("fraction", BlurKernel(lambda height, sigma_max: int(height / 10 / 2),
                                        "constant"))


@dataclasses.dataclass(frozen=True)
class PhotometricSpec:
  """A photometric pipeline: jitter strengths/semantics and per-op probabilities (hashable)."""

  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  hue: float = 0.0
  p_jitter: float = 0.0
  brightness_mode: str = "multiplicative"
  contrast_mode: str = "gray"
  saturation_mode: str = "blend"
  p_gray: float = 0.0
  p_blur: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  blur_kernel_mode: str = "sigma"
  p_solarize: float = 0.0
  solarize_threshold: float = 0.5
  normalize: str | None = "imagenet"

  def __post_init__(self):
    object.__setattr__(self, "blur_sigma", tuple(float(s) for s in self.blur_sigma))
    BRIGHTNESS_MODES.get(self.brightness_mode)
    CONTRAST_MODES.get(self.contrast_mode)
    SATURATION_MODES.get(self.saturation_mode)
    BLUR_KERNELS.get(self.blur_kernel_mode)
    if self.normalize is not None:
      NORMALIZATIONS.get(self.normalize)
    if not 0 <= self.hue <= 0.5:
      raise ConfigError(f"hue jitter {self.hue} must be in [0, 0.5]")


class JitterParams(NamedTuple):
  """Per-example colour-jitter draws; order[i] is a permutation of (bright, contrast, sat, hue)."""

  order: jax.Array
  brightness: jax.Array
  contrast: jax.Array
  saturation: jax.Array
  hue: jax.Array


def sample_jitter(key: jax.Array, batch: int, spec: PhotometricSpec) -> JitterParams:
  """Draw a random op order and the four parameters for each of `batch` examples."""
  keys = jax.random.split(key, 5)
  order = jnp.argsort(jax.random.uniform(keys[0], (batch, 4)), axis=-1).astype(jnp.int32)
  ranges = (BRIGHTNESS_MODES.get(spec.brightness_mode)[1](spec.brightness),
            _factor_range(spec.contrast), _factor_range(spec.saturation), (-spec.hue, spec.hue))
  values = [jax.random.uniform(k, (batch,), minval=lo, maxval=hi)
            for k, (lo, hi) in zip(keys[1:], ranges)]
  return JitterParams(order, *values)


def apply_jitter(images: jax.Array, params: JitterParams, spec: PhotometricSpec) -> jax.Array:
  """Apply the four jitter ops to each example in its own order (lax.switch per step)."""
  branches = (lambda x, p: adjust_brightness(x, p.brightness, spec.brightness_mode),
              lambda x, p: adjust_contrast(x, p.contrast, spec.contrast_mode),
              lambda x, p: adjust_saturation(x, p.saturation, spec.saturation_mode),
              lambda x, p: adjust_hue(x, p.hue))

  def one(image: jax.Array, p: JitterParams) -> jax.Array:
    for step in range(4):
      image = jax.lax.switch(p.order[step], branches, image, p)
    return image

  return jax.vmap(one)(images, params)


def _with_probability(key: jax.Array, p: float, images: jax.Array, out: jax.Array) -> jax.Array:
  """Per example: `out` with probability p, else `images`."""
  apply = jax.random.uniform(key, (images.shape[0],)) < p
  return jnp.where(apply[:, None, None, None], out, images)


def color_jitter(images: jax.Array, key: jax.Array, spec: PhotometricSpec) -> jax.Array:
  """torchvision RandomApply(ColorJitter, p_jitter): all four ops in random order, or none."""
  k_apply, k_params = jax.random.split(key)
  params = sample_jitter(k_params, images.shape[0], spec)
  return _with_probability(k_apply, spec.p_jitter, images, apply_jitter(images, params, spec))


def random_grayscale(images: jax.Array, key: jax.Array, p: float) -> jax.Array:
  """Grayscale each example with probability p."""
  return _with_probability(key, p, images, to_grayscale(images))


def random_blur(images: jax.Array, key: jax.Array, p: float,
                sigma: tuple[float, float] = (0.1, 2.0), kernel_mode: str = "sigma") -> jax.Array:
  """Gaussian-blur each example with probability p, sigma ~ U(sigma) per example."""
  k_apply, k_sigma = jax.random.split(key)
  kernel = BLUR_KERNELS.get(kernel_mode)
  sigmas = jax.random.uniform(k_sigma, (images.shape[0],), minval=sigma[0], maxval=sigma[1])
  blurred = gaussian_blur(images, sigmas, kernel.radius(images.shape[-3], sigma[1]),
                          kernel.pad_mode)
  return _with_probability(k_apply, p, images, blurred)


def random_solarize(images: jax.Array, key: jax.Array, p: float,
                    threshold: float = 0.5) -> jax.Array:
  """Solarize each example with probability p."""
  return _with_probability(key, p, images, solarize(images, threshold))


def photometric(images: jax.Array, key: jax.Array, spec: PhotometricSpec | str) -> jax.Array:
  """The full device-side pipeline; uint8 input is scaled to [0, 1] first. Jit with spec static."""
  if isinstance(spec, str):
    spec = PHOTOMETRIC.get(spec)
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = images.astype(jnp.float32) / 255.0
  else:
    x = images.astype(jnp.float32)
  k_jitter, k_gray, k_blur, k_solarize = jax.random.split(key, 4)
  if spec.p_jitter > 0:
    x = color_jitter(x, k_jitter, spec)
  if spec.p_gray > 0:
    x = random_grayscale(x, k_gray, spec.p_gray)
  if spec.p_blur > 0:
    x = random_blur(x, k_blur, spec.p_blur, spec.blur_sigma, spec.blur_kernel_mode)
  if spec.p_solarize > 0:
    x = random_solarize(x, k_solarize, spec.p_solarize, spec.solarize_threshold)
  if spec.normalize is not None:
    x = normalize(x, *NORMALIZATIONS.get(spec.normalize))
  return x


# Presets, as the reference code applies them. Crops and flips are host-side: see host_ops.CROPS.
PHOTOMETRIC: Registry = Registry("photometric preset")
_TORCHVISION_WEAK = PhotometricSpec(0.4, 0.4, 0.2, 0.1, p_jitter=0.8, p_gray=0.2)  # DINO, MoCo v3
_MOCOV2 = PhotometricSpec(0.4, 0.4, 0.4, 0.1, p_jitter=0.8, p_gray=0.2, p_blur=0.5)  # aug+
_BYOL = dataclasses.replace(_TORCHVISION_WEAK, brightness_mode="additive", contrast_mode="channel",
                            saturation_mode="hsv", blur_kernel_mode="fraction")
_SOLO = dataclasses.replace(_TORCHVISION_WEAK, normalize="cifar10")  # solo-learn CIFAR-10
PHOTOMETRIC.add("simclr", PhotometricSpec(  # v2: multiplicative brightness, TF contrast/saturation
    0.8, 0.8, 0.8, 0.2, p_jitter=0.8, contrast_mode="channel", saturation_mode="hsv", p_gray=0.2,
    p_blur=0.5, blur_kernel_mode="fraction", normalize=None))  # SimCLR feeds [0, 1] images
PHOTOMETRIC.add("byol_view1", dataclasses.replace(_BYOL, p_blur=1.0))
PHOTOMETRIC.add("byol_view2", dataclasses.replace(_BYOL, p_blur=0.1, p_solarize=0.2))
PHOTOMETRIC.add("dino_global1", dataclasses.replace(_TORCHVISION_WEAK, p_blur=1.0))
PHOTOMETRIC.add("dino_global2", dataclasses.replace(_TORCHVISION_WEAK, p_blur=0.1, p_solarize=0.2))
PHOTOMETRIC.add("dino_local", dataclasses.replace(_TORCHVISION_WEAK, p_blur=0.5))
PHOTOMETRIC.add("mocov2", _MOCOV2)
PHOTOMETRIC.add("simsiam", _MOCOV2)
PHOTOMETRIC.add("mocov3_view1", dataclasses.replace(_TORCHVISION_WEAK, p_blur=1.0))
PHOTOMETRIC.add("mocov3_view2", dataclasses.replace(_TORCHVISION_WEAK, p_blur=0.1, p_solarize=0.2))
PHOTOMETRIC.add("clip", PhotometricSpec(normalize="clip"))
PHOTOMETRIC.add("solo_asym_view1", _SOLO)
PHOTOMETRIC.add("solo_asym_view2", dataclasses.replace(_SOLO, p_solarize=0.2))
PHOTOMETRIC.add("solo_sym_strong", PhotometricSpec(0.8, 0.8, 0.8, 0.2, p_jitter=0.8, p_gray=0.2,
                                                   p_blur=0.5, normalize="cifar10"))
PHOTOMETRIC.add("solo_sym_weak", dataclasses.replace(_MOCOV2, normalize="cifar10"))
PHOTOMETRIC.add("mean_teacher", PhotometricSpec(0.4, 0.4, 0.4, 0.1, p_jitter=1.0))  # jitter only
