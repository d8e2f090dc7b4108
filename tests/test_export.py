"""Export of a trained encoder, the one-call loader, and DINO attention maps."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sslvl_jax
from configs import byol_r50, dino_vits16, mocov2_r50, quickstart
from sslvl_jax import durations, export, methods, models, parallel, train
from sslvl_jax.errors import ConfigError
from sslvl_jax.data import builtin
from sslvl_jax.evals.attention import cls_attention_maps


@pytest.mark.parametrize("module,default", [(dino_vits16, "teacher"), (byol_r50, "student"),
                                            (mocov2_r50, "student"), (quickstart, "student")])
def test_one_role_rule_for_evaluation_and_export(module, default):
  """The method decides the network evaluated and exported (DINO: its teacher; BYOL, MoCo: the
  online / query network, as their papers); a role it lacks is a one-line error."""
  c = module.get_config("smoke")
  method = methods.get(c.method)(c, parallel.make_mesh(), durations.Schedule(4, 1.0, 16))
  assert method.resolve_role(None) == default
  if "teacher" not in method.ROLES:
    with pytest.raises(ConfigError, match=r"^--role=teacher: method 'clip' has no teacher network "
                                          r"\(it has: student\)$"):
      method.predict_fns("teacher")
  else:
    assert method.resolve_role("teacher") == "teacher" and method.resolve_role("student") == "student"


def _digits(n):
  return np.stack([builtin.upsample(x, 32) for x in builtin.digits("test")[0][:n]])


@pytest.mark.parametrize("module,role", [(quickstart, "student"), (dino_vits16, "teacher")])
def test_exported_encoder_reproduces_the_run(tmp_path, module, role):
  c = module.get_config("smoke")
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  train.run(c, workdir)
  export.export(c, workdir, out)
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["role"] == role and cfg["step"] == c.total_steps
  assert cfg["preprocessing"]["image_size"] == 32
  images = _digits(8)
  s = train.setup(c, workdir)
  model = s.method.network(s.method.merge(s.state.params, s.state.model_state), s.state.extras,
                           role)
  want = np.asarray(s.method.image_features(model, s.state.extras, jnp.asarray(images)))
  got = np.asarray(sslvl_jax.load_encoder(out, tower="image")(images))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if module is quickstart:
    assert os.path.exists(os.path.join(out, "tokenizer.model"))
    assert cfg["tokenizer"]["eot_id"] == 3 and cfg["tokenizer"]["context_length"] == 24


def test_export_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(KeyError, match="no checkpoint"):
    export.export(quickstart.get_config("smoke"), str(tmp_path), str(tmp_path / "x"))


def test_cls_attention_maps_are_the_last_layer_cls_rows():
  vit = models.build("vit_micro", rngs=nnx.Rngs(0), num_registers=2)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  maps = cls_attention_maps(vit, x)
  assert maps.shape == (2, 2, 32, 32)
  attn = np.asarray(vit.last_attention(x))
  # Each 8x8 block is one patch's weight; the map's mass is the CLS row minus CLS and registers.
  np.testing.assert_allclose(np.asarray(maps).sum((2, 3)) / 64.0, 1.0 - attn[:, :, 0, :3].sum(-1),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(maps)[:, :, 8, 16], attn[:, :, 0, 3 + 4 * 1 + 2], rtol=1e-6)
