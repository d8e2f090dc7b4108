"""Linear probe on frozen, precomputed features: a small lr x weight-decay sweep, then a retrain.

The classifier is multinomial logistic regression, logits = x W + b with zero init, trained on
device by Adam (no decoupled decay) on the mean softmax cross-entropy + wd / 2 * |W|^2 (bias not
decayed), with a cosine learning-rate decay to 0 over `steps`; one `lax.scan` over the steps.
`batch_size=None` is full-batch; otherwise each step draws `batch_size` rows uniformly with
replacement. Features are standardised per dimension with the mean/std of the rows being fit.
The sweep trains on the train features minus a held-out `val_fraction` (a seeded permutation),
picks the best held-out top-1 (first in lrs-major grid order on ties) and retrains on all of train.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslvl_jax.evals.knn import topk_accuracy


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "batch_size"))
def _fit(x: jax.Array, y: jax.Array, lr: jax.Array, wd: jax.Array, key: jax.Array, *,
         num_classes: int, steps: int, batch_size: int | None) -> dict[str, jax.Array]:
  """Trained {'w', 'b', 'mean', 'std'} of the classifier on features x (n, d), labels y (n,)."""
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
  x = (x - mean) / std
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  cosine = lambda t: -lr * 0.5 * (1 + jnp.cos(math.pi * t / steps))
  opt = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(cosine))

  def loss_fn(p, xb, yb):
    ce = optax.softmax_cross_entropy_with_integer_labels(xb @ p["w"] + p["b"], yb).mean()
    return ce + 0.5 * wd * jnp.sum(p["w"] ** 2)

  def step(carry, t):
    p, opt_state = carry
    if batch_size is None:
      xb, yb = x, y
    else:
      idx = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, x.shape[0])
      xb, yb = x[idx], y[idx]
    updates, opt_state = opt.update(jax.grad(loss_fn)(p, xb, yb), opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
  return {**params, "mean": mean, "std": std}


def _logits(clf: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """Classifier logits of raw features x."""
  return ((x - clf["mean"]) / clf["std"]) @ clf["w"] + clf["b"]


def linear_probe(train_feats: jax.Array, train_labels: jax.Array, test_feats: jax.Array,
                 test_labels: jax.Array, *, num_classes: int,
                 lrs: Sequence[float] = (1e-3, 1e-2, 1e-1),
                 wds: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2), steps: int = 1000,
                 batch_size: int | None = None, seed: int = 0, val_fraction: float = 0.1) -> dict:
  """Sweep (lr, wd) on a held-out part of train, retrain on all of train, report test top-1/top-5.

  Returns {'top1', 'top5', 'lr', 'weight_decay', 'val_top1', 'sweep': [{'lr', 'weight_decay',
  'val_top1'}, ...]}; accuracies are fractions.
  """
  x = jnp.asarray(train_feats, jnp.float32)
  y = jnp.asarray(train_labels, jnp.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_val = max(1, round(val_fraction * len(x)))
  val, fit = jnp.asarray(perm[:n_val]), jnp.asarray(perm[n_val:])
  key = jax.random.key(seed)
  train = functools.partial(_fit, key=key, num_classes=num_classes, steps=steps,
                            batch_size=batch_size)
  sweep = []
  for lr in lrs:
    for wd in wds:
      clf = train(x[fit], y[fit], jnp.float32(lr), jnp.float32(wd))
      val_top1 = topk_accuracy(_logits(clf, x[val]), y[val], ks=(1,))["top1"]
      sweep.append({"lr": float(lr), "weight_decay": float(wd), "val_top1": val_top1})
  best = max(sweep, key=lambda r: r["val_top1"])  # first maximum wins ties
  clf = train(x, y, jnp.float32(best["lr"]), jnp.float32(best["weight_decay"]))
  test = topk_accuracy(_logits(clf, jnp.asarray(test_feats, jnp.float32)), test_labels, ks=(1, 5))
  return {**test, **best, "sweep": sweep}
