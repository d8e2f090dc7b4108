"""Projection / prediction heads of the SSL methods and the DINO head, as in their reference code.

Every head is called as `head(x, train=...)` (`train` picks batch vs running BN statistics) and
returns an array. Presets are registered in HEADS and built as `HEADS.get(name)(in_dim, rngs=rngs,
**overrides)`. BN is nnx.BatchNorm (momentum 0.9, eps 1e-5); its batch statistics are means over
the batch axis, so under jit on a 'data'-sharded batch they are global-batch (SyncBN) statistics.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sslvl_jax.models.layers import ACTIVATIONS, Dtype, trunc_normal
from sslvl_jax.models.resnet import BN_EPS, BN_MOMENTUM
from sslvl_jax.losses import l2_normalize
from sslvl_jax.registry import Registry

HEADS: Registry = Registry("head")
Initializer = Callable[..., jax.Array]
default_kernel_init = nnx.initializers.lecun_normal()  # truncated normal, var 1/fan_in (haiku's)


def batch_norm(dim: int, *, scale: bool = True, center: bool = True, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """nnx.BatchNorm with torch's defaults (momentum 0.9 in flax's convention, eps 1e-5)."""
  return nnx.BatchNorm(dim, momentum=BN_MOMENTUM, epsilon=BN_EPS, use_scale=scale, use_bias=center,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class MLPHead(nnx.Module):
  """Linear -> [BN] -> act for each hidden width, then Linear -> [BN] to `out_dim`.

  bn_hidden / bias_hidden: BN and bias on the hidden linears (a bias before BN is redundant but
  kept where the reference has it). bias_last / bn_last: bias and BN on the output linear;
  bn_last_affine=False gives BN without scale and offset, bn_last_center=False BN with scale only
  (SimCLR). A linear bias followed by a non-affine BN is cancelled exactly by the batch-mean
  subtraction, so "bias frozen, then BN(affine=False)" (SimSiam) is bias_last=False, bn_last=True,
  bn_last_affine=False: identical in training; with running averages identical once the running
  mean has converged (it carries the frozen bias with weight 1 - 0.9^steps).
  """

  def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, *,
               bn_hidden: bool = True, bias_hidden: bool = True, bias_last: bool = True,
               bn_last: bool = False, bn_last_affine: bool = True, bn_last_center: bool = True,
               act: str = "relu", kernel_init: Initializer = default_kernel_init,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if act not in ACTIVATIONS:
      raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = [in_dim, *hidden_dims, out_dim]
    biases = [bias_hidden] * len(hidden_dims) + [bias_last]
    self.act = act
    self.layers = nnx.List([nnx.Linear(d_in, d_out, use_bias=b, kernel_init=kernel_init, **kw)
                            for d_in, d_out, b in zip(dims[:-1], dims[1:], biases)])
    self.hidden_norms = nnx.List([batch_norm(d, **kw) for d in hidden_dims] if bn_hidden else [])
    center_last = bn_last_affine and bn_last_center
    self.last_norm = batch_norm(out_dim, scale=bn_last_affine, center=center_last, **kw
                                ) if bn_last else None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i, layer in enumerate(self.layers[:-1]):
      x = layer(x)
      if self.hidden_norms:
        x = self.hidden_norms[i](x, use_running_average=not train)
      x = ACTIVATIONS[self.act](x)
    x = self.layers[-1](x)
    if self.last_norm is not None:
      x = self.last_norm(x, use_running_average=not train)
    return x


def _mlp(in_dim: int, rngs: nnx.Rngs, hidden_dim: int, num_layers: int, out_dim: int,
         **kw) -> MLPHead:
  return MLPHead(in_dim, [hidden_dim] * (num_layers - 1), out_dim, rngs=rngs, **kw)


def byol_projector(in_dim: int, rngs: nnx.Rngs, *, hidden_dim: int = 4096, out_dim: int = 256,
                   **kw) -> MLPHead:
  """BYOL projector (predictor: in_dim=256): Linear+bias -> BN -> ReLU -> Linear without bias."""
  return _mlp(in_dim, rngs, hidden_dim, 2, out_dim, bias_last=False, **kw)


byol_predictor = byol_projector  # same architecture, built with in_dim=256


def simsiam_projector(in_dim: int, rngs: nnx.Rngs, *, hidden_dim: int | None = None,
                      out_dim: int = 2048, num_layers: int = 3, **kw) -> MLPHead:
  """SimSiam projector: (Linear no bias -> BN -> ReLU) x2 -> Linear -> BN(affine=False).

  Hidden width defaults to in_dim (the reference uses the backbone's feature width). The
  reference's frozen last bias is dropped: the affine-free BN after it cancels it (see MLPHead).
  """
  return _mlp(in_dim, rngs, hidden_dim or in_dim, num_layers, out_dim, bias_hidden=False,
              bias_last=False, bn_last=True, bn_last_affine=False, **kw)


def simsiam_predictor(in_dim: int, rngs: nnx.Rngs, *, hidden_dim: int = 512, out_dim: int = 2048,
                      **kw) -> MLPHead:
  """SimSiam predictor: Linear no bias -> BN -> ReLU -> Linear with bias, 2048-512-2048."""
  return _mlp(in_dim, rngs, hidden_dim, 2, out_dim, bias_hidden=False, **kw)


def simclr_projector(in_dim: int, rngs: nnx.Rngs, *, hidden_dim: int | None = None,
                     out_dim: int = 128, num_layers: int = 3, **kw) -> MLPHead:
  """SimCLR head: (Linear -> BN -> ReLU) x2 -> Linear -> BN(scale only), widths in_dim, in_dim, 128.

  As in the reference, linears followed by BN have no bias; the hidden BNs carry the offset and the
  last BN has center=False. Hidden width defaults to in_dim (the reference's choice).
  """
  return _mlp(in_dim, rngs, hidden_dim or in_dim, num_layers, out_dim, bias_hidden=False,
              bias_last=False, bn_last=True, bn_last_center=False, **kw)


def moco_v2_projector(in_dim: int, rngs: nnx.Rngs, *, hidden_dim: int | None = None,
                      out_dim: int = 128, **kw) -> MLPHead:
  """MoCo v2 MLP head: Linear(in_dim) -> ReLU -> Linear(128), both with bias, no BN."""
  return _mlp(in_dim, rngs, hidden_dim or in_dim, 2, out_dim, bn_hidden=False, **kw)


def moco_v3_projector(in_dim: int, rngs: nnx.Rngs, *, hidden_dim: int = 4096, out_dim: int = 256,
                      num_layers: int = 2, **kw) -> MLPHead:
  """MoCo v3 projector: bias-free (Linear -> BN -> ReLU) x (layers-1) -> Linear -> BN(affine=False).

  num_layers is 2 for ResNet (2048-4096-256) and 3 for ViT ('moco_v3_projector_vit').
  """
  return _mlp(in_dim, rngs, hidden_dim, num_layers, out_dim, bias_hidden=False, bias_last=False,
              bn_last=True, bn_last_affine=False, **kw)


def moco_v3_predictor(in_dim: int, rngs: nnx.Rngs, *, hidden_dim: int = 4096, out_dim: int = 256,
                      bn_last: bool = False, **kw) -> MLPHead:
  """MoCo v3 predictor 256-4096-256, bias-free; final BN(affine=False) only for ViT (bn_last)."""
  return _mlp(in_dim, rngs, hidden_dim, 2, out_dim, bias_hidden=False, bias_last=False,
              bn_last=bn_last, bn_last_affine=False, **kw)


def barlow_twins_projector(in_dim: int, rngs: nnx.Rngs, *, hidden_dim: int = 8192,
                           out_dim: int = 8192, num_layers: int = 3, **kw) -> MLPHead:
  """Barlow Twins projector 8192-8192-8192: bias-free (Linear -> BN -> ReLU) x2 -> Linear.

  The reference's final BN(affine=False) is part of the loss (losses.barlow_twins_loss).
  """
  return _mlp(in_dim, rngs, hidden_dim, num_layers, out_dim, bias_hidden=False, bias_last=False,
              **kw)


def vicreg_projector(in_dim: int, rngs: nnx.Rngs, *, hidden_dim: int = 8192, out_dim: int = 8192,
                     num_layers: int = 3, **kw) -> MLPHead:
  """VICReg projector 8192-8192-8192: (Linear with bias -> BN -> ReLU) x2 -> Linear without bias."""
  return _mlp(in_dim, rngs, hidden_dim, num_layers, out_dim, bias_last=False, **kw)


class WeightNormLinear(nnx.Module):
  """Bias-free linear with weight = g * v / ||v|| per output unit (torch weight_norm, dim 0).

  v is (in, out) with torch's default init U(+-1/sqrt(in)); g starts at 1. With `train_g=False`
  g is a plain nnx.Variable, not an nnx.Param, so optimisers never see it (unit-norm rows).
  """

  def __init__(self, in_dim: int, out_dim: int, *, train_g: bool = True,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    v_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    self.v = nnx.Param(v_init(rngs.params(), (in_dim, out_dim), param_dtype))
    g = jnp.ones((out_dim,), param_dtype)
    self.g = nnx.Param(g) if train_g else nnx.Variable(g)

  def weight(self) -> jax.Array:
    """The effective (in, out) weight matrix, f32."""
    v = self.v[...].astype(jnp.float32)
    return v * (self.g[...].astype(jnp.float32) / jnp.linalg.norm(v, axis=0))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) @ self.weight()


class DINOHead(nnx.Module):
  """DINO head: MLP (GELU, trunc_normal(0.02), zero bias) -> L2-normalise -> weight-normed linear.

  nlayers linears in_dim -> hidden x (nlayers-1) -> bottleneck (BN after hidden linears if use_bn),
  then `last_layer` (bottleneck -> out_dim, no bias) whose g is frozen when norm_last_layer.
  """

  def __init__(self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256,
               nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True, *,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.mlp = MLPHead(in_dim, [hidden] * (max(nlayers, 1) - 1), bottleneck, bn_hidden=use_bn,
                       act="gelu", kernel_init=trunc_normal, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
    self.last_layer = WeightNormLinear(bottleneck, out_dim, train_g=not norm_last_layer,
                                       param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.last_layer(l2_normalize(self.mlp(x, train=train)))


for _name, _factory in {
    "byol_projector": byol_projector,
    "byol_predictor": byol_projector,
    "simsiam_projector": simsiam_projector,
    "simsiam_predictor": simsiam_predictor,
    "simclr_projector": simclr_projector,
    "moco_v2_projector": moco_v2_projector,
    "moco_v3_projector": moco_v3_projector,
    "moco_v3_projector_vit": functools.partial(moco_v3_projector, num_layers=3),
    "moco_v3_predictor": moco_v3_predictor,
    "moco_v3_predictor_vit": functools.partial(moco_v3_predictor, bn_last=True),
    "barlow_twins_projector": barlow_twins_projector,
    "vicreg_projector": vicreg_projector,
    "dino": DINOHead,
}.items():
  HEADS.add(_name, _factory)
