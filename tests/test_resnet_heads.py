"""ResNet (global / ghost BN under sharding, zero-init residual, parameter counts) and SSL heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy.special import erf

from sslvl_jax import models, parallel
from sslvl_jax.models import heads
from sslvl_jax.models.resnet import ResNet

B = 16  # global batch: 2 examples on each of the 8 CPU devices


def _init(fn):
  # Partitionable threefry compiles every new init shape for seconds on CPU; values do not matter.
  with jax.threefry_partitionable(False):
    return fn()


@pytest.fixture(scope="module")
def tiny_r18():
  return _init(lambda: ResNet(depth=18, width_multiplier=1 / 16, cifar_stem=True, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def images():
  x = np.random.default_rng(0).normal(size=(B, 32, 32, 3)).astype(np.float32)
  # Shift each device's shard differently: per-device variances then differ from the global one.
  return x + np.repeat(np.arange(8, dtype=np.float32), B // 8)[:, None, None, None]


def _train_forward(model, groups=1):
  """jit(state, x) -> (outputs, updated BatchStats) of a train-mode forward pass."""
  graphdef, state = nnx.split(model)

  def fwd(state, x):
    m = nnx.merge(graphdef, state)
    return m(x, train=True, bn_groups=groups), nnx.state(m, nnx.BatchStat)
  return jax.jit(fwd), state


def _close(a, b, rtol=2e-4, atol=2e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                                                       atol=atol), a, b)


def test_sharded_batch_norm_uses_global_batch_statistics(tiny_r18, images):
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  fwd, state = _train_forward(tiny_r18)
  dev0 = jax.devices()[0]
  ref_out, ref_stats = fwd(jax.device_put(state, dev0), jax.device_put(images, dev0))
  x_sharded = jax.device_put(images, NamedSharding(mesh, P(parallel.BATCH_AXES)))
  out, stats = fwd(jax.device_put(state, NamedSharding(mesh, P())), x_sharded)
  assert out["pooled"].sharding.is_equivalent_to(x_sharded.sharding, 2)  # really ran data-parallel
  assert out["pooled"].shape == (B, tiny_r18.num_features)
  _close(out, ref_out)
  _close(stats, ref_stats)

  # Hand-written BN on the stem: global-batch mean / biased variance over (b, h, w).
  c = np.asarray(tiny_r18.conv1(jnp.asarray(images)), np.float64)
  mean, var = c.mean((0, 1, 2)), c.var((0, 1, 2))
  np.testing.assert_allclose(stats["bn1"]["mean"][...], 0.1 * mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["bn1"]["var"][...], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-5)
  per_device_var = c.reshape(8, -1, c.shape[-1]).var(1).mean(0)
  assert not np.allclose(0.9 + 0.1 * per_device_var, stats["bn1"]["var"][...], rtol=1e-2)
  stem = jax.jit(lambda s, x: nnx.merge(*nnx.split(tiny_r18)[:1], s).stem(x, train=True))(
      jax.device_put(state, NamedSharding(mesh, P())), x_sharded)
  np.testing.assert_allclose(stem, np.maximum((c - mean) / np.sqrt(var + 1e-5), 0), rtol=1e-4,
                             atol=1e-4)


def test_bn_groups_equal_separate_runs_per_group(tiny_r18, images):
  mesh = parallel.make_mesh()
  fwd8, state = _train_forward(tiny_r18, groups=8)
  out, stats = fwd8(jax.device_put(state, NamedSharding(mesh, P())),
                    jax.device_put(images, NamedSharding(mesh, P(parallel.BATCH_AXES))))
  fwd1, _ = _train_forward(tiny_r18)
  runs = [fwd1(state, jnp.asarray(g)) for g in np.split(images, 8)]
  ref_out = jax.tree.map(lambda *a: np.concatenate(a), *[r[0] for r in runs])
  # Running averages move towards the mean of the group statistics = mean of the separate updates.
  ref_stats = jax.tree.map(lambda *a: np.mean(a, 0), *[r[1] for r in runs])
  _close(out, ref_out)
  _close(stats, ref_stats)
  # ... and differ from global statistics.
  global_out, _ = fwd1(state, jnp.asarray(images))
  assert not np.allclose(out["pooled"], global_out["pooled"], atol=1e-3)
  with pytest.raises(ValueError, match="bn_groups"):
    _train_forward(tiny_r18, groups=3)[0](state, jnp.asarray(images))


@pytest.mark.parametrize("depth", [18, 50])
def test_zero_init_residual_blocks_are_relu_of_shortcut(depth):
  m = _init(lambda: ResNet(depth=depth, width_multiplier=1 / 16, zero_init_residual=True,
                           rngs=nnx.Rngs(1)))
  plain = _init(lambda: ResNet(depth=depth, width_multiplier=1 / 16, rngs=nnx.Rngs(1)))
  rng = np.random.default_rng(depth)
  for zero_block, block in [(m.layer1[0], plain.layer1[0]), (m.layer2[0], plain.layer2[0])]:
    last_bn = getattr(zero_block, f"bn{zero_block.num_layers}")
    np.testing.assert_array_equal(last_bn.scale[...], 0.0)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, zero_block.conv1.in_features)), jnp.float32)
    for train in (True, False):
      want = jax.nn.relu(zero_block.shortcut(x, train=train))
      np.testing.assert_allclose(zero_block(x, train=train), want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(block(x, train=False), jax.nn.relu(block.shortcut(x, train=False)),
                           atol=1e-3)
  assert m.layer2[0].downsample is not None  # the strided block's shortcut is conv + BN


@pytest.mark.parametrize("depth,torchvision_total", [
    (18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160), (152, 60_192_808)])
def test_parameter_counts_match_torchvision_without_fc(depth, torchvision_total):
  m = nnx.eval_shape(lambda: models.build(f"resnet{depth}", rngs=nnx.Rngs(0)))
  fc = m.num_features * 1000 + 1000
  n = sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert n == torchvision_total - fc
  if depth == 50:
    assert n == 23_508_032 and m.num_features == 2048


def test_imagenet_stem_shapes():
  m = _init(lambda: models.build("resnet18", width_multiplier=1 / 16, rngs=nnx.Rngs(0)))
  out = m(jnp.ones((2, 64, 64, 3)), train=False)
  # 64 -> conv/2 32 -> maxpool/2 16 -> stages 16, 8, 4, 2
  assert out["features"].shape == (2, 2, 2, 32) and m.num_features == 32
  np.testing.assert_allclose(out["pooled"], out["features"].mean((1, 2)), rtol=1e-6)


# ---- heads ---------------------------------------------------------------------------------


def _gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _np(v):
  return np.asarray(v[...], np.float64)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_matches_numpy_weight_norm(norm_last_layer):
  head = _init(lambda: heads.HEADS.get("dino")(16, out_dim=64, hidden=32, bottleneck=8,
                                               norm_last_layer=norm_last_layer, rngs=nnx.Rngs(0)))
  params = nnx.state(head, nnx.Param)
  has_g = "g" in params["last_layer"]
  assert has_g == (not norm_last_layer)
  assert "v" in params["last_layer"]
  if not norm_last_layer:  # a trained g: rows get norm g
    head.last_layer.g[...] = jnp.linspace(0.5, 2.0, 64)
  else:
    np.testing.assert_allclose(np.linalg.norm(head.last_layer.weight(), axis=0), 1.0, rtol=1e-6)
  lin = head.mlp.layers
  assert len(lin) == 3 and all(np.all(np.abs(_np(layer.kernel)) <= 0.04 + 1e-7) for layer in lin)
  assert 0.012 < np.std(_np(lin[1].kernel)) < 0.02  # trunc_normal(0.02) truncated at 2 std

  x = np.random.default_rng(0).normal(size=(5, 16))
  h = x
  for i, layer in enumerate(lin):
    h = h @ _np(layer.kernel) + _np(layer.bias)
    h = _gelu(h) if i < 2 else h
  h = h / np.linalg.norm(h, axis=1, keepdims=True)
  v, g = _np(head.last_layer.v), _np(head.last_layer.g)
  want = h @ (v / np.linalg.norm(v, axis=0) * g)
  np.testing.assert_allclose(head(jnp.asarray(x, jnp.float32), train=True), want, rtol=1e-5,
                             atol=1e-6)


def test_byol_projector_matches_numpy_and_shards_globally():
  head = _init(lambda: heads.byol_projector(12, nnx.Rngs(0), hidden_dim=24, out_dim=6))
  x = np.random.default_rng(1).normal(size=(B, 12)) + np.repeat(np.arange(8), B // 8)[:, None]
  l0, l1 = head.layers
  h = x @ _np(l0.kernel) + _np(l0.bias)
  mean, var = h.mean(0), h.var(0)
  bn = head.hidden_norms[0]
  h = np.maximum((h - mean) / np.sqrt(var + 1e-5) * _np(bn.scale) + _np(bn.bias), 0)
  assert l1.bias is None
  want = h @ _np(l1.kernel)

  graphdef, state = nnx.split(head)

  def fwd(state, x):
    m = nnx.merge(graphdef, state)
    return m(x, train=True), nnx.state(m, nnx.BatchStat)
  mesh = parallel.make_mesh()
  out, stats = jax.jit(fwd)(jax.device_put(state, NamedSharding(mesh, P())),
                            jax.device_put(x.astype(np.float32), NamedSharding(mesh, P("data"))))
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats["hidden_norms"][0]["var"][...], 0.9 + 0.1 * var, rtol=1e-4)


# (hidden widths, out, bias per linear, BN (scale, bias) per hidden layer or None, last BN or None)
PRESETS = {
    "byol_projector": ([4096], 256, [True, False], (True, True), None),
    "simsiam_projector": ([64, 64], 2048, [False, False, False], (True, True), (False, False)),
    "simsiam_predictor": ([512], 2048, [False, True], (True, True), None),
    "simclr_projector": ([64, 64], 128, [False, False, False], (True, True), (True, False)),
    "moco_v2_projector": ([64], 128, [True, True], None, None),
    "moco_v3_projector": ([4096], 256, [False, False], (True, True), (False, False)),
    "moco_v3_projector_vit": ([4096, 4096], 256, [False] * 3, (True, True), (False, False)),
    "moco_v3_predictor": ([4096], 256, [False, False], (True, True), None),
    "moco_v3_predictor_vit": ([4096], 256, [False, False], (True, True), (False, False)),
    "barlow_twins_projector": ([8192, 8192], 8192, [False] * 3, (True, True), None),
    "vicreg_projector": ([8192, 8192], 8192, [True, True, False], (True, True), None),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_head_presets_follow_recipes(name):
  hidden, out_dim, biases, hidden_bn, last_bn = PRESETS[name]
  head = nnx.eval_shape(lambda: heads.HEADS.get(name)(64, rngs=nnx.Rngs(0)))
  dims = [64, *hidden, out_dim]
  assert [tuple(layer.kernel.shape) for layer in head.layers] == list(zip(dims[:-1], dims[1:]))
  assert [layer.bias is not None for layer in head.layers] == biases

  def flags(bn):
    return None if bn is None else (bn.scale is not None, bn.bias is not None)
  assert [flags(bn) for bn in head.hidden_norms] == ([hidden_bn] * len(hidden) if hidden_bn else [])
  assert flags(head.last_norm) == last_bn


def test_simsiam_frozen_bias_before_affine_free_bn_is_a_no_op():
  ours = _init(lambda: heads.simsiam_projector(16, nnx.Rngs(0), out_dim=8))
  # The reference layout: the last linear keeps a (frozen, nonzero) bias.
  biased = _init(lambda: heads.MLPHead(16, [16, 16], 8, bias_hidden=False, bias_last=True,
                                       bn_last=True, bn_last_affine=False, rngs=nnx.Rngs(1)))
  for src, dst in zip(ours.layers, biased.layers):
    dst.kernel[...] = src.kernel[...]
  bias = np.linspace(-3.0, 3.0, 8)
  biased.layers[-1].bias[...] = jnp.asarray(bias, jnp.float32)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(10, 16)), jnp.float32)
  for _ in range(3):
    np.testing.assert_allclose(ours(x, train=True), biased(x, train=True), rtol=1e-5, atol=1e-5)
  # The running mean carries the bias with weight 1 - 0.9^t: eval outputs agree once converged.
  np.testing.assert_allclose(biased.last_norm.mean[...] - ours.last_norm.mean[...],
                             bias * (1 - 0.9 ** 3), rtol=1e-5, atol=1e-6)
