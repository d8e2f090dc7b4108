"""sslvl_jax: self-supervised and vision-language pretraining in JAX/Flax."""

__version__ = "0.1.0"


def load_encoder(path: str, *, tower: str | None = None):
  """A jitted function uint8 images (or token ids) -> embeddings, from an exported encoder dir."""
  from sslvl_jax.interop import load_encoder as _load  # pylint: disable=g-import-not-at-top
  return _load(path, tower=tower)
