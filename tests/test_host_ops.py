"""Host image ops: decoding (modes, corrupt data, draft), crop statistics, eval resize, multi-crop."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from sslvl_jax.data import host_ops as H
from sslvl_jax.errors import ConfigError


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _noise(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h, w, seed=0):
  """A smooth RGB image (JPEG-friendly)."""
  return np.asarray(Image.fromarray(_noise(6, 8, seed)).resize((w, h), Image.BICUBIC))


# ---- decoding -----------------------------------------------------------------------------------
def test_decode_converts_every_mode_to_rgb():
  rgb = _smooth(20, 30)
  gray = Image.fromarray(rgb).convert("L")
  rgba = Image.fromarray(np.dstack([rgb, np.full((20, 30), 7, np.uint8)]), "RGBA")
  pal = Image.fromarray(rgb).quantize(16)
  pal_t = pal.copy()
  pal_t.info["transparency"] = 0
  cases = {
      "L png": (_encode(gray, "PNG"), np.repeat(np.asarray(gray)[..., None], 3, -1)),
      "RGBA png": (_encode(rgba, "PNG"), rgb),
      "P png": (_encode(pal, "PNG"), np.asarray(pal.getpalette(), np.uint8).reshape(-1, 3)[
          np.asarray(pal)]),
      "P png transparency": (_encode(pal_t, "PNG", transparency=0), None),
      "P gif": (_encode(pal, "GIF"), None),
      "L jpeg": (_encode(gray, "JPEG"), None),
      "CMYK jpeg": (_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), None),
      "LA png": (_encode(gray.convert("LA"), "PNG"), np.repeat(np.asarray(gray)[..., None], 3, -1)),
  }
  for name, (data, expected) in cases.items():
    out = H.decode_image(data, name)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8, name
    if expected is not None:
      np.testing.assert_array_equal(out, expected, err_msg=name)
  gray_jpeg = H.decode_image(cases["L jpeg"][0])
  assert (gray_jpeg[..., 0] == gray_jpeg[..., 2]).all()
  cmyk = H.decode_image(cases["CMYK jpeg"][0]).astype(int)
  assert np.abs(cmyk - rgb).mean() < 12  # lossy, but the colours survive the CMYK round trip


def test_corrupt_data_raises_bad_image_error_naming_the_key():
  jpeg = _encode(Image.fromarray(_noise(64, 64)), "JPEG", quality=95)
  for data in (jpeg[:len(jpeg) // 2], b"not an image at all", b""):
    with pytest.raises(H.BadImageError) as info:
      H.decode_image(data, "shard-3/img-17")
    assert info.value.key == "shard-3/img-17" and "shard-3/img-17" in str(info.value)
    assert info.value.reason
  assert isinstance(info.value, ValueError)


def test_draft_mode_decodes_at_least_the_requested_size():
  data = _encode(Image.fromarray(_smooth(600, 800)), "JPEG")
  assert H.decode_image(data).shape == (600, 800, 3)
  for min_size in (150, 256, 299):
    out = H.decode_image(data, min_size=min_size)
    assert min(out.shape[:2]) >= min_size and out.shape[0] < 600  # reduced, never below request
    assert out.shape[0] * 800 == out.shape[1] * 600  # aspect kept
  assert H.decode_image(data, min_size=400).shape == (600, 800, 3)  # no 2x reduction fits
  png = _encode(Image.fromarray(_smooth(600, 800)), "PNG")
  assert H.decode_image(png, min_size=100).shape == (600, 800, 3)


# ---- random-resized crop sampling ------------------------------------------------------------------
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.05, 0.4), (0.4, 1.0)])
def test_crop_area_and_ratio_statistics(scale):
  height, width, ratio, n = 300, 400, (3 / 4, 4 / 3), 3000
  rng = np.random.default_rng(0)
  boxes = np.array([H.sample_crop(height, width, scale, ratio, rng) for _ in range(n)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area, aspect = h * w / (height * width), w / h
  fallback = (h == height) & (w == width)  # torchvision's fallback here is the whole image
  assert fallback.mean() < 0.02
  area, aspect = area[~fallback], aspect[~fallback]
  # rounding w, h to integers moves area and aspect by < 2% at these sizes
  assert scale[0] * 0.98 <= area.min() and area.max() <= scale[1] * 1.02
  assert ratio[0] * 0.98 <= aspect.min() and aspect.max() <= ratio[1] * 1.02
  if scale == (0.05, 0.4):  # every draw fits: area ~ U(scale), log-aspect ~ U(log ratio)
    assert abs(area.mean() - 0.225) < 0.01 and abs(np.quantile(area, 0.25) - 0.1375) < 0.015
    assert abs(np.log(aspect).mean()) < 0.01
    assert abs(np.quantile(np.log(aspect), 0.75) - math.log(4 / 3) / 2) < 0.02


def test_center_crop_fallback_like_torchvision():
  rng = np.random.default_rng(0)
  tall = H.sample_crop(200, 4, (0.08, 1.0), (3 / 4, 4 / 3), rng)  # no attempt can fit
  wide = H.sample_crop(4, 200, (0.08, 1.0), (3 / 4, 4 / 3), rng)
  assert tall == ((200 - 5) // 2, 0, 5, 4)  # w = 4, h = round(4 / (3/4))
  assert wide == (0, (200 - 5) // 2, 4, 5)  # h = 4, w = round(4 * 4/3)


def test_byol_single_attempt_clamps_sides():
  rng = np.random.default_rng(1)
  boxes = np.array([H.sample_crop(300, 300, (0.08, 1.0), (3 / 4, 4 / 3), rng, attempts=1,
                                  fallback="clamp") for _ in range(2000)])
  top, left, h, w = boxes.T
  assert (top + h <= 300).all() and (left + w <= 300).all() and (h > 0).all() and (w > 0).all()
  clamped = (h == 300) ^ (w == 300)  # one side clamped, the other kept
  assert 0.01 < clamped.mean() < 0.3
  tall = H.sample_crop(200, 4, (0.08, 1.0), (3 / 4, 4 / 3), rng, attempts=1, fallback="clamp")
  assert tall[3] == 4 and tall[0] + tall[2] <= 200


def test_crop_sampling_is_deterministic_given_the_seed():
  img = _noise(50, 60)
  spec = H.CROPS.get("byol")
  a, b, c = (H.multi_crop(img, spec, s) for s in (3, 3, 4))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  rng1, rng2 = np.random.default_rng(9), np.random.default_rng(9)
  assert np.array_equal(H.multi_crop(img, spec, rng1)[1], H.multi_crop(img, spec, rng2)[1])


# ---- crop + resize, flip, eval transform -----------------------------------------------------------
def test_crop_resize_and_flip():
  img = np.zeros((40, 60, 3), np.uint8)
  img[:20, :30], img[:20, 30:], img[20:, :30], img[20:, 30:] = 10, 80, 160, 240
  for interp in ("nearest", "bilinear", "bicubic"):
    out = H.crop_resize(img, (20, 30, 20, 30), 17, interp)  # bottom-right quadrant only
    assert out.shape == (17, 17, 3) and (out == 240).all()
  np.testing.assert_array_equal(H.hflip(img), img[:, ::-1])
  full = H.CropSpec(size=24, scale=(1.0, 1.0), ratio=(1.5, 1.5), interpolation="bilinear")
  ref = np.asarray(Image.fromarray(img).resize((24, 24), Image.BILINEAR))
  rng = np.random.default_rng(0)
  flipped = H.random_resized_crop(img, H.CropSpec(**{**vars(full), "flip": 1.0}), rng)
  np.testing.assert_array_equal(flipped, ref[:, ::-1])
  np.testing.assert_array_equal(H.random_resized_crop(img, H.CropSpec(**{**vars(full),
                                                                          "flip": 0.0}), rng), ref)


def test_resize_center_crop_matches_torchvision_arithmetic():
  img = _noise(300, 400)
  out = H.resize_center_crop(img, 224)  # Resize(256) + CenterCrop(224), bicubic
  resized = np.asarray(Image.fromarray(img).resize((341, 256), Image.BICUBIC))  # int(256*4/3)
  np.testing.assert_array_equal(out, resized[16:240, 58:282])  # offsets round(32/2), round(58.5)
  same = _noise(224, 300)
  np.testing.assert_array_equal(H.resize_center_crop(same, 224, resize_ratio=1.0),
                                same[:, 38:262])  # CLIP: no resize, centre crop only
  assert H.resize_center_crop(_noise(50, 30), 224).shape == (224, 224, 3)  # small: upscaled


# ---- specs and multi-crop --------------------------------------------------------------------------
def test_dino_multicrop_shapes_and_counts():
  spec = H.CROPS.get("dino")
  assert spec == H.dino_multicrop(num_local=10)
  crops = H.multi_crop(_noise(80, 120), spec, 0)  # smaller than 224: upscaled, not an error
  assert len(crops) == 12
  assert all(c.shape == (224, 224, 3) for c in crops[:2])
  assert all(c.shape == (96, 96, 3) for c in crops[2:])
  assert all(c.dtype == np.uint8 for c in crops)
  (g, n_g), (l, n_l) = spec.groups
  assert (g.scale, l.scale, n_g, g.interpolation) == ((0.4, 1.0), (0.05, 0.4), 2, "bicubic")
  assert len(H.multi_crop(_noise(80, 120), H.dino_multicrop(num_local=8), 0)) == 10


def test_crop_presets_and_validation():
  assert H.CROPS.get("mocov2").groups[0][0].scale == (0.2, 1.0)
  byol = H.CROPS.get("byol").groups[0][0]
  assert (byol.attempts, byol.fallback, byol.interpolation) == (1, "clamp", "bicubic")
  assert [c.size for c in H.CROPS.get("simclr").crops()] == [224, 224]
  with pytest.raises(ConfigError):
    H.CropSpec(224, interpolation="cubic-ish")
  with pytest.raises(ConfigError):
    H.CropSpec(224, fallback="whole")
  with pytest.raises(ConfigError):
    H.CropSpec(224, scale=(1.0, 0.5))
