"""ResNet-18/34/50/101/152 image encoders (torchvision v1.5 layout) in Flax NNX, NHWC.

Batch statistics are plain means over the batch axis, so under `jax.jit` with the batch sharded
over the 'data' mesh axis GSPMD reduces them over the GLOBAL batch (SyncBN, what BYOL, SimSiam,
SimCLR, MoCo v3, Barlow Twins and VICReg use). `bn_groups=k` at call time instead normalises each
run of b/k consecutive examples on its own (ghost BN): with k = number of devices that is MoCo v2's
per-device ("shuffle BN") statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sslvl_jax.models.layers import Dtype, check_remat, run_block

# depth -> (blocks per stage, bottleneck blocks?)
RESNET_STAGES: dict[int, tuple[tuple[int, ...], bool]] = {
    18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True), 152: ((3, 8, 36, 3), True),
}
BN_MOMENTUM, BN_EPS = 0.9, 1e-5  # flax momentum 0.9 == torch momentum 0.1
# kaiming_normal_(mode="fan_out", nonlinearity="relu"), as torchvision
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(in_dim: int, out_dim: int, kernel: int, stride: int, pad: int | None = None, **kw
         ) -> nnx.Conv:
  """Bias-free conv, torch-style symmetric padding (default kernel // 2), kaiming fan-out init."""
  pad = kernel // 2 if pad is None else pad
  return nnx.Conv(in_dim, out_dim, (kernel, kernel), strides=stride,
                  padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=conv_init, **kw)


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm (same Params and BatchStats) with a `train` flag and ghost-batch groups.

  In training, statistics are f32 means over every axis but the channel axis, computed per group of
  b/groups consecutive examples (groups=1: the whole, global, batch); running statistics move
  towards the average of the group means / biased group variances (as MoCo's SplitBatchNorm).
  """

  def __init__(self, num_features: int, *, zero_scale: bool = False, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.zeros_init() if zero_scale else nnx.initializers.ones_init()
    super().__init__(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPS, scale_init=init,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, groups: int = 1) -> jax.Array:
    if train:
      if x.shape[0] % groups:
        raise ValueError(f"batch size {x.shape[0]} is not divisible by bn_groups={groups}")
      xg = x.astype(jnp.float32).reshape(groups, x.shape[0] // groups, *x.shape[1:])
      axes = tuple(range(1, xg.ndim - 1))
      mean = xg.mean(axes, keepdims=True)
      var = jnp.square(xg - mean).mean(axes, keepdims=True)
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean.mean(0).ravel())
      self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var.mean(0).ravel())
    else:
      xg, mean, var = x[None], self.mean[...], self.var[...]
    mul = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    y = (xg - mean) * mul + self.bias[...]
    return y.reshape(x.shape).astype(self.dtype)


class Block(nnx.Module):
  """Residual block, post-activation: basic (3x3, 3x3) or bottleneck (1x1, strided 3x3, 1x1 x4).

  Submodules are named as torchvision's (conv1, bn1, ..., downsample = [conv, bn]).
  `zero_init_residual` sets the last BN's gamma to 0, making the block relu(shortcut) at init.
  """

  def __init__(self, in_dim: int, planes: int, stride: int, *, bottleneck: bool,
               zero_init_residual: bool = False, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    specs = ([(1, 1, planes), (3, stride, planes), (1, 1, 4 * planes)] if bottleneck
             else [(3, stride, planes), (3, 1, planes)])  # (kernel, stride, out channels)
    self.num_layers = len(specs)
    self.out_dim = specs[-1][2]
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dim = in_dim
    for i, (k, s, out) in enumerate(specs, start=1):
      setattr(self, f"conv{i}", conv(dim, out, k, s, **kw))
      zero_scale = zero_init_residual and i == len(specs)
      setattr(self, f"bn{i}", BatchNorm(out, zero_scale=zero_scale, **kw))
      dim = out
    self.downsample = nnx.List([conv(in_dim, self.out_dim, 1, stride, **kw),
                                BatchNorm(self.out_dim, **kw)]
                               ) if stride != 1 or in_dim != self.out_dim else None

  def shortcut(self, x: jax.Array, *, train: bool, bn_groups: int = 1) -> jax.Array:
    """Identity, or the strided 1x1 projection + BN when the shape changes."""
    if self.downsample is None:
      return x
    return self.downsample[1](self.downsample[0](x), train=train, groups=bn_groups)

  def __call__(self, x: jax.Array, *, train: bool, bn_groups: int = 1) -> jax.Array:
    y = x
    for i in range(1, self.num_layers + 1):
      y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y), train=train, groups=bn_groups)
      if i < self.num_layers:
        y = jax.nn.relu(y)
    return jax.nn.relu(y + self.shortcut(x, train=train, bn_groups=bn_groups))


class ResNet(nnx.Module):
  """ResNet encoder without classifier; `num_features` = 512 (basic) or 2048 (bottleneck) x width.

  `cifar_stem` replaces the 7x7/2 conv + max pool by solo-learn's CIFAR stem: a 3x3 stride-1 conv
  with padding 2 (32 px -> 34 px maps) and no max pool. `width_multiplier` scales every channel
  count (SimCLR's ResNet-50 (2x)); it may be below 1 for tests. `remat` ('none', 'block' or a named
  checkpoint policy, see layers.REMAT_POLICIES; 'dots_saveable' keeps the conv outputs) recomputes
  each residual block in the backward pass; BatchNorm statistics update as without it.
  """

  def __init__(self, *, depth: int = 50, width_multiplier: float = 1.0,
               zero_init_residual: bool = False, cifar_stem: bool = False, in_channels: int = 3,
               remat: str = "none", dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    if depth not in RESNET_STAGES:
      raise ValueError(f"unknown ResNet depth {depth}; known: {sorted(RESNET_STAGES)}")
    stages, bottleneck = RESNET_STAGES[depth]
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    stem = max(1, int(64 * width_multiplier))
    self.cifar_stem = cifar_stem
    self.remat = check_remat(remat)
    self.conv1 = conv(in_channels, stem, 3, 1, pad=2, **kw) if cifar_stem else conv(
        in_channels, stem, 7, 2, **kw)
    self.bn1 = BatchNorm(stem, **kw)
    dim = stem
    for s, n_blocks in enumerate(stages):
      planes = max(1, int(64 * width_multiplier * 2 ** s))
      blocks = []
      for b in range(n_blocks):
        blocks.append(Block(dim, planes, 2 if (s > 0 and b == 0) else 1, bottleneck=bottleneck,
                            zero_init_residual=zero_init_residual, **kw))
        dim = blocks[-1].out_dim
      setattr(self, f"layer{s + 1}", nnx.List(blocks))
    self.num_stages = len(stages)
    self.num_features = dim
    self.dtype = dtype

  def stem(self, x: jax.Array, *, train: bool, bn_groups: int = 1) -> jax.Array:
    """conv1 + bn1 + relu (+ 3x3/2 max pool unless cifar_stem)."""
    x = jax.nn.relu(self.bn1(self.conv1(x.astype(self.dtype)), train=train, groups=bn_groups))
    if self.cifar_stem:
      return x
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  def __call__(self, x: jax.Array, *, train: bool, rng: jax.Array | None = None,
               bn_groups: int = 1) -> dict[str, jax.Array]:
    """(b, h, w, c) images -> {'pooled': (b, num_features) f32 average pool, 'features': last map}.

    train: batch statistics (and running-average updates) vs running averages. bn_groups: ghost-BN
    groups in training. rng: unused (no stochastic layers); accepted for a common encoder signature.
    """
    del rng
    if x.ndim != 4:
      raise ValueError(
          f"ResNet expects images of shape (batch, height, width, channels), got {x.shape}")
    x = self.stem(x, train=train, bn_groups=bn_groups)
    for s in range(1, self.num_stages + 1):
      for block in getattr(self, f"layer{s}"):
        x = run_block(block, self.remat, x, static=dict(train=train, bn_groups=bn_groups))
    return {"pooled": x.astype(jnp.float32).mean(axis=(1, 2)), "features": x}
