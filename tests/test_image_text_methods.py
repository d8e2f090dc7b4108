"""SLIP: the CLIP term plus a weighted SimCLR term on the shared image tower."""

import jax
import numpy as np
import pytest

from configs import slip_vitb16
from sslvl_jax import train
from sslvl_jax.methods import image_text
from sslvl_jax.methods.base import StepContext


def _losses(s, params, batch, rng):
  """(SLIP loss, its metrics, plain CLIP loss of the same model with the CLIP term's rng)."""
  model = s.method.merge(params, s.state.model_state)
  ctx = StepContext(rng=rng, step=s.state.step)
  slip, m, _ = s.method.loss(model, s.state.extras, batch, ctx)
  clip_ctx = StepContext(rng=jax.random.split(rng, 4)[0], step=s.state.step)
  model = s.method.merge(params, s.state.model_state)
  emb, extras = image_text.ImageText.embeddings(s.method, model, s.state.extras, batch, clip_ctx)
  clip, _, _ = image_text.Clip.embedding_loss(s.method, model, extras, emb, batch, clip_ctx)
  return slip, m, clip


@pytest.mark.slow  # ~20 s each on an idle 2-core machine, mostly compilation
@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_slip_is_clip_plus_weighted_simclr(tmp_path, weight):
  c = slip_vitb16.get_config("smoke")
  c.loss.ssl_weight = weight
  s = train.setup(c, str(tmp_path))
  batch, rng = next(s.batches), jax.random.key(3)
  slip, m, clip = _losses(s, s.state.params, batch, rng)
  assert float(m["ssl_loss"]) > 0  # the SimCLR branch ran
  np.testing.assert_allclose(float(slip), float(clip) + weight * float(m["ssl_loss"]), rtol=1e-6)
  if weight == 0.0:  # same gradients as CLIP: the SSL head gets none
    g_slip = jax.grad(lambda p: _losses(s, p, batch, rng)[0])(s.state.params)
    g_clip = jax.grad(lambda p: _losses(s, p, batch, rng)[2])(s.state.params)
    for a, b in zip(jax.tree.leaves(g_slip), jax.tree.leaves(g_clip)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_slip["ssl_head"]))
