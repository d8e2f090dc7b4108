"""Optimisers, learning-rate schedules, weight-decay masks and the teacher EMA transform."""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from sslvl_jax import durations
from sslvl_jax.errors import ConfigError
from sslvl_jax.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")


def path_str(path: tuple) -> str:
  """'image/blocks/0/attn/qkv/kernel' for a pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def rule_mask(params: Any, rules: Sequence[tuple[str, Any]], default: Any) -> Any:
  """Per-leaf value from the first `(regex, value)` rule whose regex matches the leaf's path."""
  compiled = [(re.compile(r), v) for r, v in rules]

  def pick(path, _):
    name = path_str(path)
    for rx, v in compiled:
      if rx.search(name):
        return v
    return default
  return jax.tree_util.tree_map_with_path(pick, params)


def decay_mask(params: Any, no_decay_rules: Sequence[str] = ()) -> Any:
  """True for leaves that get weight decay: matrices/kernels, not biases, norms or scalars."""
  rules = [(r, False) for r in no_decay_rules]
  by_rule = rule_mask(params, rules, True)
  return jax.tree.map(lambda p, keep: bool(keep and p.ndim >= 2), params, by_rule)


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int, end_lr: float = 0.0,
                  warmup_init_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup from `warmup_init_lr` to `base_lr`, then cosine to `end_lr` at `total_steps`."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=warmup_init_lr, peak_value=base_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=end_lr)


def cosine_ramp(start: float, end: float, total_steps: int) -> optax.Schedule:
  """start -> end along a half cosine over `total_steps` (EMA momentum 0.996 -> 1, DINO wd 0.04 -> 0.4)."""
  def fn(step):
    t = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
    return end - (end - start) * (jnp.cos(jnp.pi * t) + 1.0) / 2.0
  return fn


def base_lr(cfg: ConfigDict, global_batch_size: int) -> float:
  """Learning rate from `lr` or `lr_per_256` (linear scaling) or `lr_sqrt` (x sqrt(batch))."""
  given = [k for k in ("lr", "lr_per_256", "lr_sqrt") if cfg.get(k) is not None]
  if len(given) != 1:
    raise ConfigError(f"optim: set exactly one of lr, lr_per_256, lr_sqrt (got {given or 'none'})")
  if given[0] == "lr":
    return float(cfg.lr)
  if given[0] == "lr_per_256":
    return float(cfg.lr_per_256) * global_batch_size / 256
  return float(cfg.lr_sqrt) * global_batch_size ** 0.5


Schedule = Callable[[jax.Array], jax.Array]


@OPTIMIZERS.register("adamw")
def _adamw(cfg: ConfigDict, lr: Schedule, wd: Schedule, mask: Any) -> optax.GradientTransformation:
  # Decoupled weight decay (torch/optax AdamW): p -= lr * (adam(g) + wd * p).
  return optax.chain(optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                                         eps=cfg.get("eps", 1e-8)),
                     optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(lr))


@OPTIMIZERS.register("sgd")
def _sgd(cfg: ConfigDict, lr: Schedule, wd: Schedule, mask: Any) -> optax.GradientTransformation:
  # torch SGD: weight decay added to the gradient before momentum.
  return optax.chain(optax.add_decayed_weights(wd, mask),
                     optax.sgd(lr, momentum=cfg.get("momentum", 0.9),
                               nesterov=cfg.get("nesterov", False)))


@OPTIMIZERS.register("lars")
def _lars(cfg: ConfigDict, lr: Schedule, wd: Schedule, mask: Any) -> optax.GradientTransformation:
  # BYOL/SimCLR LARS: decay added to the gradient, trust ratio eta*|p|/|g|, momentum after it;
  # biases and norms are excluded from both decay and adaptation (the same mask).
  return optax.lars(lr, weight_decay=wd, weight_decay_mask=mask,
                    trust_coefficient=cfg.get("trust_coefficient", 1e-3), eps=0.0,
                    trust_ratio_mask=mask, momentum=cfg.get("momentum", 0.9),
                    nesterov=cfg.get("nesterov", False))


@OPTIMIZERS.register("lamb")
def _lamb(cfg: ConfigDict, lr: Schedule, wd: Schedule, mask: Any) -> optax.GradientTransformation:
  # ALIGN's optimiser: Adam moments, decoupled decay, layer-wise trust ratio.
  return optax.chain(optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                                         eps=cfg.get("eps", 1e-6)),
                     optax.add_decayed_weights(wd, mask), optax.scale_by_trust_ratio(),
                     optax.scale_by_learning_rate(lr))


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """Clip each gradient tensor's norm separately (DINO's `clip_gradients`, not a global norm)."""
  def update(updates, state, params=None):
    del params
    def clip(g):
      norm = jnp.linalg.norm(g.astype(jnp.float32))
      return (g * jnp.minimum(1.0, max_norm / (norm + 1e-6))).astype(g.dtype)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


class FrozenState(NamedTuple):
  count: jax.Array
  inner: Any


def frozen_for(inner: optax.GradientTransformation, n_steps: int) -> optax.GradientTransformation:
  """Zero updates for the first `n_steps` and leave `inner`'s state (moments, counts) untouched.

  As torch does for a parameter whose grad is None: no update, no weight decay, no moment update.
  Wrap an optimiser whose schedules are shifted by `n_steps` so they stay on the global step.
  """
  def init(params):
    return FrozenState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    frozen = state.count < n_steps
    new_updates = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
    new_inner = jax.tree.map(lambda old, new: jnp.where(frozen, old, new), state.inner, new_inner)
    return new_updates, FrozenState(state.count + 1, new_inner)
  return optax.GradientTransformation(init, update)


def build(cfg: ConfigDict, params: Any, schedule: durations.Schedule
          ) -> tuple[optax.GradientTransformation, Schedule]:
  """The optimiser of a config: clipping, the named optimiser, schedules, masks and param groups.

  cfg fields: name, lr | lr_per_256 | lr_sqrt, warmup_steps, end_lr, weight_decay,
  weight_decay_end (cosine wd schedule, DINO), no_decay_rules (regexes), clip_grad_norm (global)
  or clip_grad_per_tensor, constant_lr_rules (regexes of params kept at the base lr, SimSiam's
  predictor), freeze_rules ((regex, epochs), ...): params whose update is zero for that long
  (DINO's last layer in epoch 1), lr_multiplier_rules ((regex, factor), ...): params trained at
  factor x the scheduled lr (Barlow Twins' biases and BN at 0.0048 / 0.2), lock_rules (regexes):
  params never updated and given no optimiser state (LiT's locked tower). A param follows the
  first matching rule, in the order lock, constant, freeze, multiplier. Step counts (total, warm-up,
  per epoch) come from the run's `schedule`.
  """
  total_steps, steps_per_epoch = schedule.total_steps, schedule.steps_per_epoch
  peak = base_lr(cfg, schedule.global_batch_size)
  lr = warmup_cosine(peak, total_steps, schedule.warmup_steps, end_lr=cfg.get("end_lr", 0.0))
  wd0 = cfg.get("weight_decay", 0.0)
  wd_end = cfg.get("weight_decay_end")
  wd = cosine_ramp(wd0, wd_end, total_steps) if wd_end is not None else (lambda _: wd0)
  mask = decay_mask(params, cfg.get("no_decay_rules", ()))
  make = OPTIMIZERS.get(cfg.name)

  def shifted(fn: Schedule, n: int) -> Schedule:
    return lambda c: fn(c + n)

  groups = {"default": make(cfg, lr, wd, mask)}
  rules = []
  for rx in cfg.get("constant_lr_rules", ()):
    groups[f"constant:{rx}"] = make(cfg, lambda _: peak, wd, mask)
    rules.append((rx, f"constant:{rx}"))
  for rx, epochs in cfg.get("freeze_rules", ()):
    n = int(round(epochs * steps_per_epoch))
    groups[f"frozen:{rx}"] = frozen_for(make(cfg, shifted(lr, n), shifted(wd, n), mask), n)
    rules.append((rx, f"frozen:{rx}"))
  for rx, factor in cfg.get("lr_multiplier_rules", ()):
    groups[f"lr_x{factor}:{rx}"] = make(cfg, lambda c, f=float(factor): f * lr(c), wd, mask)
    rules.append((rx, f"lr_x{factor}:{rx}"))
  if cfg.get("lock_rules"):  # no update, no weight decay and no optimiser state, ever
    groups["locked"] = optax.set_to_zero()
    rules[:0] = [(rx, "locked") for rx in cfg.lock_rules]
  tx = groups["default"] if not rules else optax.multi_transform(
      groups, rule_mask(params, rules, "default"))
  parts = []
  if cfg.get("clip_grad_norm"):
    parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
  if cfg.get("clip_grad_per_tensor"):
    parts.append(clip_per_tensor(cfg.clip_grad_per_tensor))
  return optax.chain(*parts, tx), lr


def teacher_ema(momentum: optax.Schedule | float) -> optax.GradientTransformation:
  """EMA of the student as an optax transformation; its state IS the teacher.

  `update(student_params, state)` moves `state.ema` towards the student with the (scheduled)
  momentum. Call `seed_teacher` to start the state at the student (optax.ema starts at zeros).
  """
  return optax.inject_hyperparams(optax.ema, static_args=("debias",))(decay=momentum, debias=False)


def seed_teacher(tx: optax.GradientTransformation, params: Any) -> Any:
  """EMA state whose teacher params equal `params` (a copy)."""
  return set_teacher_params(tx.init(params), jax.tree.map(jnp.array, params))


def set_teacher_params(ema_state: Any, params: Any) -> Any:
  """The EMA state with its teacher params replaced."""
  return ema_state._replace(inner_state=ema_state.inner_state._replace(ema=params))


def teacher_params(ema_state: Any) -> Any:
  """The teacher params held in an EMA state made by `teacher_ema`."""
  return ema_state.inner_state.ema
