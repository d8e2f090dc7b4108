"""Accuracy of a method's own classifier (semi-supervised methods) on a labelled split."""

from __future__ import annotations

from typing import Any, Callable

from ml_collections import ConfigDict

from sslvl_jax.evals import EVALUATORS, knn
from sslvl_jax.evals.tasks import Evaluator


@EVALUATORS.register("classifier")
class Classifier(Evaluator):
  """Top-1/top-5 of the class logits the method predicts (`predict`: the prediction function,
  'logits' by default, e.g. 'student_logits') on `split` (default 'test')."""

  SPLITS = {"split": "test"}
  OPTIONS = ("predict",)

  def __init__(self, cfg: ConfigDict, predict_fns: dict[str, Callable], mesh: Any,
               train_data: ConfigDict, name: str | None = None):
    self.PREDICT = (cfg.get("predict", "logits"),)  # pylint: disable=invalid-name
    self.IMAGES = self.PREDICT[0]  # pylint: disable=invalid-name
    super().__init__(cfg, predict_fns, mesh, train_data, name)

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """Top-1/top-5 of argmax logits against the labels of `cfg.split`."""
    logits, labels = self.features(params, model_state, extras, "split")
    return knn.topk_accuracy(logits, labels, ks=(1, 5))
