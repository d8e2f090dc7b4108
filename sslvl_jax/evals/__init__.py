"""Evaluation math as pure functions over feature arrays: k-NN, linear probe, zero-shot, retrieval.

`EVALUATORS` maps config names to evaluator classes; the in-loop evaluators (which extract
features from a model over the mesh) register themselves there. The probe is
`evals.linear_probe.linear_probe`: re-exporting the function here would hide its module.
"""

from __future__ import annotations

from sslvl_jax.evals import linear_probe
from sslvl_jax.evals.knn import knn_predict, topk_accuracy
from sslvl_jax.evals.retrieval import retrieval_recalls
from sslvl_jax.evals.zero_shot import (class_text_embeddings, load_classnames, load_templates,
                                       zero_shot_scores)
from sslvl_jax.registry import Registry

EVALUATORS: Registry = Registry("evaluator", package=__name__)

__all__ = ["EVALUATORS", "class_text_embeddings", "knn_predict", "linear_probe", "load_classnames",
           "load_templates", "retrieval_recalls", "topk_accuracy", "zero_shot_scores"]
