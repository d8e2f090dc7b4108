"""Few-shot linear probe (big_vision's few-shot evaluator): closed-form ridge regression.

For each seed and each k in `shots`, k train examples per class are drawn (the k-shot set of a
seed is the first k of one seeded permutation per class, so the sets of a seed are nested); the
frozen features are centred on the mean of those k-shot examples, L2-normalised (SimpleShot's
CL2N: uncentred features that share one large mean direction, as a briefly trained network's
do, all normalise to nearly the same vector) and given a constant-1 bias column; the weights
solve ridge regression to -1/+1 one-hot targets, min |X w - Y|^2 + l2_reg |w without bias|^2, in
closed form (float64 normal equations); the test prediction is the argmax. Like big_vision, the
regulariser is one fixed `l2_reg` per setting (default 1.0 for unit-norm features), not tuned
on the test split. Reports the mean and std (over seeds) of top-1 for each k.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sslvl_jax.errors import ConfigError
from sslvl_jax.evals import EVALUATORS
from sslvl_jax.evals.tasks import TRAIN_TEST, Evaluator

SHOTS, SEEDS, L2_REG = (1, 5, 10, 25), 3, 1.0


def sample_shots(labels: np.ndarray, num_classes: int, k: int, seed: int) -> np.ndarray:
  """Indices of `k` examples of each class 0..num_classes-1 (the first k of a seeded permutation
  per class, so a seed's sets are nested in k), sorted by class."""
  rng = np.random.default_rng(seed)
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < k:
      raise ConfigError(f"few_shot: {k} shots need {k} train examples of class {c}, which has "
                        f"{len(idx)}; lower shots")
    out.append(rng.permutation(idx)[:k])
  return np.concatenate(out)


def augment(x: np.ndarray, center: np.ndarray) -> np.ndarray:
  """Rows of `x` minus `center`, L2-normalised, with a constant-1 bias column, float64."""
  x = np.asarray(x, np.float64) - center
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return np.concatenate([x, np.ones((len(x), 1))], 1)


def ridge(x: np.ndarray, targets: np.ndarray, l2_reg: float) -> np.ndarray:
  """argmin_w |x w - targets|^2 + l2_reg |w[:-1]|^2 (the last row, the bias, not regularised)."""
  reg = np.full(x.shape[1], float(l2_reg))
  reg[-1] = 0.0
  return np.linalg.solve(x.T @ x + np.diag(reg), x.T @ targets)


def few_shot_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, *, num_classes: int, k: int, seed: int,
                  l2_reg: float = L2_REG) -> float:
  """Test top-1 of the ridge classifier on the k-shot train set of `seed`."""
  idx = sample_shots(train_y, num_classes, k, seed)
  center = np.asarray(train_x[idx], np.float64).mean(0)
  targets = 2.0 * np.eye(num_classes)[train_y[idx]] - 1.0
  w = ridge(augment(train_x[idx], center), targets, l2_reg)
  return float(np.mean(np.argmax(augment(test_x, center) @ w, 1) == test_y))


def few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             *, num_classes: int, shots: Sequence[int] = SHOTS, seeds: int = SEEDS,
             l2_reg: float = L2_REG) -> dict[str, float]:
  """{'<k>shot_mean', '<k>shot_std'}: top-1 over seeds 0..seeds-1 for each k in `shots`."""
  out = {}
  for k in shots:
    acc = [few_shot_top1(train_x, train_y, test_x, test_y, num_classes=num_classes, k=k,
                         seed=s, l2_reg=l2_reg) for s in range(seeds)]
    out[f"{k}shot_mean"], out[f"{k}shot_std"] = float(np.mean(acc)), float(np.std(acc))
  return out


@EVALUATORS.register("few_shot")
class FewShot(Evaluator):
  """Few-shot ridge-regression probe on frozen features: shots, seeds, l2_reg (see the module)."""

  SPLITS = TRAIN_TEST
  OPTIONS = ("shots", "seeds", "l2_reg", "num_classes")

  def _check_settings(self) -> None:
    super()._check_settings()
    shots, seeds = tuple(self.cfg.get("shots", SHOTS)), self.cfg.get("seeds", SEEDS)
    if not shots or not all(isinstance(k, int) and k > 0 for k in shots):
      raise ConfigError(f"evals.{self.name}.shots={shots!r}: give positive integers, e.g. "
                        f"{SHOTS}")
    if not (isinstance(seeds, int) and seeds > 0):
      raise ConfigError(f"evals.{self.name}.seeds={seeds!r}: give a positive integer")
    if not self.cfg.get("l2_reg", L2_REG) > 0:
      raise ConfigError(f"evals.{self.name}.l2_reg={self.cfg.get('l2_reg')!r}: give a number > 0")

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """Mean / std over seeds of the k-shot top-1 on `cfg.test_split`, for each k in `cfg.shots`."""
    train_f, train_l, test_f, test_l, num_classes = self.train_test(params, model_state, extras)
    return few_shot(train_f, train_l, test_f, test_l, num_classes=num_classes,
                    shots=tuple(self.cfg.get("shots", SHOTS)),
                    seeds=self.cfg.get("seeds", SEEDS), l2_reg=self.cfg.get("l2_reg", L2_REG))
