"""Pure loss functions, written per device with axis-aware collectives.

Every loss takes the LOCAL shard of the batch and an `axis_name`. Inside `jax.shard_map` over the
data axis it gathers what it needs (with gradient) and returns the loss of the GLOBAL batch,
identical on every device; with `axis_name=None` the same code is the single-device loss.
Embeddings are expected to be L2-normalised where the method says so; losses never normalise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sslvl_jax import parallel


def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-row softmax cross-entropy with integer labels and optional label smoothing (f32)."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
  return nll


def clip_loss(img: jax.Array, txt: jax.Array, logit_scale: jax.Array, *,
              axis_name: str | None = None, label_smoothing: float = 0.0) -> jax.Array:
  """Symmetric InfoNCE (CLIP/ALIGN) over the global batch; local x global logits per device.

  Args:
    img, txt: local (b, d) L2-normalised embeddings; row i of each is a positive pair.
    logit_scale: the multiplier applied to cosine similarities (exp of the learnable log scale).
    label_smoothing: ALIGN uses 0.1.
  """
  b = img.shape[0]
  img_all = parallel.all_gather(img, axis_name)
  txt_all = parallel.all_gather(txt, axis_name)
  labels = parallel.axis_index(axis_name) * b + jnp.arange(b)
  logits_i2t = logit_scale * img @ txt_all.T
  logits_t2i = logit_scale * txt @ img_all.T
  total = (_cross_entropy(logits_i2t, labels, label_smoothing).sum()
           + _cross_entropy(logits_t2i, labels, label_smoothing).sum())
  n = b * parallel.axis_size(axis_name)
  return parallel.psum(total, axis_name) / (2 * n)


def siglip_loss(img: jax.Array, txt: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array, *,
                axis_name: str | None = None) -> jax.Array:
  """Pairwise sigmoid loss (SigLIP), chunked around the device ring.

  Text chunks travel around the ring with `ppermute`, so each device only ever holds a (b, b)
  block of logits. Pairs on the diagonal of the device's own chunk are positives (+1), all other
  pairs of the global batch are negatives (-1). Normalised by the global batch size, as in the paper.
  """
  b = img.shape[0]
  n_dev = parallel.axis_size(axis_name)

  def block(txt_chunk, positive):
    logits = (logit_scale * img @ txt_chunk.T + logit_bias).astype(jnp.float32)
    signs = jnp.where(positive, 2.0 * jnp.eye(b) - 1.0, -1.0)
    return -jax.nn.log_sigmoid(signs * logits).sum()

  total = block(txt, True)
  chunk = txt
  for _ in range(n_dev - 1):
    chunk = parallel.ring_shift(chunk, axis_name)
    total = total + block(chunk, False)
  return parallel.psum(total, axis_name) / (b * n_dev)
