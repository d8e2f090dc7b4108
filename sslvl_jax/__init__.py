"""sslvl_jax: self-supervised and vision-language pretraining in JAX/Flax."""

__version__ = "0.1.0"
