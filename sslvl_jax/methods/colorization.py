"""Colorization (Zhang, Isola, Efros 2016): predict the quantised ab colours of a Lab image from L.

The network sees the L channel ((L - 50) / 50, repeated to three channels, so any backbone and its
export take it), the decoder gives logits over the in-gamut ab bins (sslvl_jax.data.color) at
1/`loss.downsample` resolution, and the loss is the cross-entropy against the soft-encoded ab
(nearest `loss.neighbours` bins, Gaussian `loss.sigma`) of the subsampled target pixels, each pixel
weighted by the class-rebalancing factor of its nearest bin. The colour prior behind the factors
is estimated from the training data as it streams: extras['ab_prior'] is the running mean of the
batches' ab histograms (step 0: the first batch's), smoothed by `loss.prior_sigma` and mixed with
the uniform by `loss.prior_mix` in `color.rebalance_weights`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sslvl_jax.data import color
from sslvl_jax.methods import METHODS
from sslvl_jax.methods.base import StepContext
from sslvl_jax.methods.pretext import DecoderMethod


def lightness_input(lab: jax.Array) -> jax.Array:
  """Lab (b, h, w, 3) -> the network input: (L - 50) / 50 repeated to 3 channels."""
  return jnp.broadcast_to((lab[..., :1] - 50.0) / 50.0, lab.shape)


def colorization_loss(logits: jax.Array, targets: jax.Array, prior: jax.Array, bins: np.ndarray, *,
                      prior_sigma: float = 5.0, prior_mix: float = 0.5
                      ) -> tuple[jax.Array, jax.Array]:
  """(rebalanced cross-entropy, unweighted cross-entropy), means over every pixel, of logits
  (..., Q) against soft-encoded targets (..., Q); each pixel is weighted by the rebalancing factor
  (from `prior` (Q,)) of its nearest bin, the target's largest entry."""
  ce = -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), -1), -1)
  weights = color.rebalance_weights(prior, bins, prior_sigma, prior_mix)
  pixel_weight = jax.lax.stop_gradient(weights[jnp.argmax(targets, -1)])
  return jnp.mean(pixel_weight * ce), jnp.mean(ce)


def nearest_bin_histogram(targets: jax.Array) -> jax.Array:
  """(Q,) fraction of the pixels of soft-encoded targets (..., Q) whose nearest bin is each bin."""
  q = targets.shape[-1]
  return jnp.mean(jax.nn.one_hot(jnp.argmax(targets, -1), q).reshape(-1, q), axis=0)


@METHODS.register("colorization")
class Colorization(DecoderMethod):
  """Zhang et al.'s colorization. config.loss: downsample (output stride, 4), neighbours (5),
  sigma (5), prior_sigma (5), prior_mix (0.5), grid (ab bin size, 10)."""

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self.bins = color.ab_gamut_bins(self.config.loss.get("grid", 10))  # (Q, 2) ab centres

  def decoder_out_dim(self) -> int:
    return len(self.bins)

  def init_extras(self, params: Any, model_state: Any, rng: jax.Array) -> Any:
    del params, model_state, rng
    return {"ab_prior": jnp.zeros((len(self.bins),), jnp.float32)}

  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 RGB -> the L-channel input the network is trained on."""
    return lightness_input(color.rgb_to_lab(images.astype(jnp.float32) / 255.0))

  def image_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(0.5, 0.5): `normalize` is L / 100 on three channels normalised by these."""
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

  def image_preprocessing(self) -> dict:
    """The export's preprocessing: the input is CIE L* / 100 on all 3 channels, then mean/std."""
    return {**super().image_preprocessing(),
            "input": "sRGB 0-1 -> CIE L* (D65) / 100 on all three channels, then mean/std"}

  def loss(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext):
    cfg = self.config.loss
    lab = color.rgb_to_lab(self.images(batch))
    f = cfg.get("downsample", 4)
    ab = lab[:, ::f, ::f, 1:]  # the reference's stride-f subsampled targets
    logits = self.decode(model, lightness_input(lab), ab.shape[1:3])
    targets = color.soft_encode(ab, self.bins, cfg.get("neighbours", 5), cfg.get("sigma", 5.0))
    seen = extras["ab_prior"]  # running mean of the batch histograms, this batch's included
    prior = seen + (nearest_bin_histogram(targets) - seen) / (ctx.step.astype(jnp.float32) + 1.0)
    loss, ce = colorization_loss(logits, targets, prior, self.bins,
                                 prior_sigma=cfg.get("prior_sigma", 5.0),
                                 prior_mix=cfg.get("prior_mix", 0.5))
    return loss, {"ce_unweighted": ce}, {**extras, "ab_prior": prior}
