"""ViT and text-tower behaviour."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sslvl_jax import models
from sslvl_jax.models import layers
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
  with pytest.raises(ValueError, match=r"NHWC images \(batch, height, width, 3\)"):
    m(jnp.ones((32, 32, 3)))


def test_unknown_model_lists_known_names():
  with pytest.raises(KeyError, match="vit_b16"):  # ConfigError is a KeyError
    models.build("vit_huge99", rngs=nnx.Rngs(0))


def _qkv(t: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Random (2, t, 2 heads, 16) query, key and value."""
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (2, t, 2, 16)) for k in keys)


@pytest.mark.parametrize("t", [197, 77])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_attention_matches_unpadded(t: int, causal: bool):
  q, k, v = _qkv(t)
  mask = jax.random.bernoulli(jax.random.key(1), 0.7, (2, 1, 1, t)).at[:, :, :, 0].set(True)
  w = jax.random.normal(jax.random.key(2), q.shape)

  @jax.jit
  def run(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> list[jax.Array]:
    """Unpadded and padded outputs (without and with a mask), and their q/k/v gradients."""
    plain = lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=causal,
                                                            implementation="xla")
    padded = lambda q, k, v, m: layers.attend(q, k, v, mask=m, is_causal=causal,
                                              implementation="xla", pad_to=8)
    outs = [fn(q, k, v, m) for m in (None, mask) for fn in (plain, padded)]
    grads = [jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v, None)), argnums=(0, 1, 2))(q, k, v)
             for fn in (plain, padded)]
    return outs + [g for gs in grads for g in gs]

  res = run(q, k, v, mask)
  for a, b in zip(res[0:4:2], res[1:4:2]):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  # a 2-d (t, t) mask is padded as well
  m2 = jnp.tril(jnp.ones((t, t), bool))
  np.testing.assert_allclose(
      layers.attend(q, k, v, mask=m2, implementation="xla", pad_to=8),
      jax.nn.dot_product_attention(q, k, v, mask=m2), rtol=1e-6, atol=1e-6)
  # the padded tokens get no gradient either: same gradients w.r.t. the real q, k, v
  for a, b in zip(res[4:7], res[7:10]):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_float32_cudnn_request_off_gpu_warns_once_and_uses_xla(monkeypatch, caplog):
  monkeypatch.setattr(layers, "_warned", set())
  attn = layers.Attention(32, 2, implementation="cudnn", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 197, 32))
  with caplog.at_level(logging.WARNING):
    y1, y2 = attn(x), attn(x[:, :77], is_causal=True)
  warnings = [r.getMessage() for r in caplog.records
              if "cuDNN attention unavailable" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert f"backend is {jax.default_backend()}" in warnings[0]
  attn.implementation = "xla"
  np.testing.assert_array_equal(y1, attn(x))
  np.testing.assert_array_equal(y2, attn(x[:, :77], is_causal=True))


def test_cudnn_unavailable_names_each_reason():
  assert layers.cudnn_unavailable("tpu", jnp.bfloat16, 64) == "backend is tpu"
  assert "float32" in layers.cudnn_unavailable("gpu", jnp.float32, 64, "9.0")
  assert layers.cudnn_unavailable("gpu", jnp.bfloat16, 64, "8.0") is None
  assert layers.cudnn_unavailable("gpu", jnp.float16, 128, "8.6") is None
  assert "head dim 68" in layers.cudnn_unavailable("gpu", jnp.bfloat16, 68, "9.0")
  assert "at most 128" in layers.cudnn_unavailable("gpu", jnp.bfloat16, 192, "8.0")
  assert layers.cudnn_unavailable("gpu", jnp.bfloat16, 192, "9.0") is None
  assert "compute capability" in layers.cudnn_unavailable("gpu", jnp.bfloat16, 64, None)
  with pytest.raises(ValueError, match="'flash'"):
    layers.resolve_attention_impl("flash", dtype=jnp.bfloat16, head_dim=64)


def test_attention_weights_reproduce_the_attention_output():
  attn = layers.Attention(32, 2, implementation="cudnn", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 197, 32))
  w = attn.weights(x)
  assert w.shape == (2, 2, 197, 197)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  _, _, v = attn._qkv(x)
  y = attn.out(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(x.shape))
  np.testing.assert_allclose(y, attn(x), rtol=1e-5, atol=1e-6)
