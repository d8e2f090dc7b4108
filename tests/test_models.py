"""ViT and text-tower behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sslvl_jax import models
from sslvl_jax.models.text import pool_positions
from sslvl_jax.models.vit import sincos_2d


def test_text_pool_positions_are_explicit():
  eot, pad = 3, 0
  tokens = jnp.array([[2, 7, 9, 3, 0, 0], [2, 3, 0, 0, 0, 0], [2, 9, 9, 9, 9, 3]])
  np.testing.assert_array_equal(pool_positions(tokens, "first_eot", eot, pad), [3, 1, 5])
  np.testing.assert_array_equal(pool_positions(tokens, "last_nonpad", eot, pad), [3, 1, 5])
  # argmax of ids picks the 9, not the EOT: the reason it is not our default.
  assert int(pool_positions(tokens, "argmax", eot, pad)[0]) == 2


def test_causal_text_tower_ignores_tokens_after_eot():
  t = models.build("text_micro", rngs=nnx.Rngs(0), vocab_size=20, context_length=8)
  a = jnp.array([[2, 5, 6, 3, 0, 0, 0, 0]])
  b = jnp.array([[2, 5, 6, 3, 9, 9, 9, 9]])
  np.testing.assert_allclose(t(a)["pooled"], t(b)["pooled"], rtol=1e-6, atol=1e-6)
  c = jnp.array([[2, 5, 7, 3, 0, 0, 0, 0]])
  assert not np.allclose(t(a)["pooled"], t(c)["pooled"], atol=1e-4)


def test_vit_registers_and_mean_pool():
  m = models.build("vit_micro", rngs=nnx.Rngs(0), num_registers=3, pool="mean")
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  out = m(x)
  assert out["tokens"].shape == (2, 1 + 3 + 16, 64)
  np.testing.assert_allclose(out["pooled"], out["tokens"][:, 4:].mean(1), rtol=1e-5, atol=1e-6)


def test_vit_interpolates_position_embedding_for_small_crops():
  m = models.build("vit_micro", rngs=nnx.Rngs(0))
  out = m(jnp.ones((1, 16, 16, 3)))
  assert out["patch_tokens"].shape == (1, 4, 64)
  # Same resolution as init: interpolation is the identity.
  np.testing.assert_allclose(m._pos_embed(4, 4), m.pos_embed[...], rtol=0, atol=0)


def test_sincos_embedding_matches_formula():
  pe = sincos_2d(2, 8)
  omega = 1.0 / 10000 ** (np.arange(2) / 2)
  # token 3 is (y=1, x=1)
  np.testing.assert_allclose(pe[3], np.concatenate([np.sin(omega), np.cos(omega)] * 2), rtol=1e-6)


def test_bad_image_shape_is_named():
  m = models.build("vit_micro", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="batch, height, width, channels"):
    m(jnp.ones((32, 32, 3)))


def test_unknown_model_lists_known_names():
  with pytest.raises(KeyError, match="vit_b16"):  # ConfigError is a KeyError
    models.build("vit_huge99", rngs=nnx.Rngs(0))
