"""sslvl_jax: self-supervised and vision-language pretraining in JAX/Flax."""

__version__ = "0.1.0"


def load_encoder(path: str, *, tower: str | None = None, normalize: bool = True):
  """A jitted function uint8 NHWC images (or token ids) -> embeddings, from an exported encoder dir.

  See `sslvl_jax.interop.load_encoder`: NCHW input is refused with a one-line error; two-tower
  embeddings are L2-normalised unless `normalize=False`.
  """
  from sslvl_jax.interop import load_encoder as _load  # pylint: disable=g-import-not-at-top
  return _load(path, tower=tower, normalize=normalize)
