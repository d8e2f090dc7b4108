"""In-loop and standalone evaluators: feature extraction over the mesh + the eval math.

Each evaluator is configured by a dict in `config.evals` (name -> {type, every_steps, ...}) and
runs on its own schedule, like big_vision's evaluators. Every setting it uses is logged with it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from sslvl_jax import data, parallel
from sslvl_jax.data import builtin
from sslvl_jax.data.examples import tokenizer
from sslvl_jax.evals import EVALUATORS, knn, linear_probe, retrieval_recalls, zero_shot

CLASSNAMES = {"digits": builtin.CLASSNAMES}
TEMPLATES = {"digits_eval": builtin.EVAL_TEMPLATES, "digits_train": builtin.TRAIN_TEMPLATES}


def _classnames(name: str) -> tuple[str, ...]:
  return CLASSNAMES[name] if name in CLASSNAMES else tuple(zero_shot.load_classnames(name))


def _templates(name: str) -> tuple[str, ...]:
  return TEMPLATES[name] if name in TEMPLATES else tuple(zero_shot.load_templates(name))


class Evaluator:
  """Base: schedule, data config, and sharded feature extraction of a split."""

  def __init__(self, cfg: ConfigDict, method: Any, mesh: Any):
    self.cfg, self.method, self.mesh = cfg, method, mesh
    self.data_cfg = ConfigDict(method.config.data.to_dict())
    self.data_cfg.update(cfg.get("data", {}))
    self.batch_size = cfg.get("batch_size", 256)
    n = mesh.devices.size
    self.batch_size = -(-self.batch_size // n) * n
    self._features = jax.jit(self._features_fn)

  def due(self, step: int, total_steps: int) -> bool:
    """Run every `every_steps` and at the last step."""
    every = self.cfg.get("every_steps")
    return step == total_steps or bool(every and step % every == 0)

  def _features_fn(self, params, model_state, extras, images):
    model = nnx.merge(self.method.graphdef, params, model_state)
    return self.method.image_features(model, extras, images).astype(jnp.float32)

  def features(self, model: nnx.Module, extras: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of every example of `split`, batched and sharded over the mesh.

    Every process runs the same number of batches (zero-padded, with a validity mask), so the
    collectives line up on multi-host; rows come back grouped by process.
    """
    source = data.source(self.data_cfg, split)
    transform = data.example_transform(self.data_cfg, "image_label", train=False)
    nproc = jax.process_count()
    local_bs = self.batch_size // nproc
    n_batches = -(-(-(-len(source) // nproc)) // local_bs)
    it = iter(data.make_dataset(source, transform, local_batch_size=local_bs, seed=0, train=False))
    blank = transform(source[0], np.random.default_rng(0))["image"]
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    feats, labels = [], []
    for _ in range(n_batches):
      local = next(it, {"image": blank[None][:0], "label": np.zeros((0,), np.int32)})
      n = len(local["label"])
      images = np.zeros((local_bs,) + blank.shape, blank.dtype)
      images[:n] = local["image"]
      lab = np.full((local_bs,), -1, np.int64)
      lab[:n] = local["label"]
      g = parallel.host_to_global(self.mesh, {"image": images})
      f = gather(self._features(params, model_state, extras, g["image"]))
      valid = gather(np.arange(local_bs) < n)
      feats.append(f[valid])
      labels.append(gather(lab)[valid])
    return np.concatenate(feats), np.concatenate(labels)

  def train_test(self, model: nnx.Module, extras: Any) -> tuple:
    """(train feats, train labels, test feats, test labels, number of classes) for probes."""
    train_f, train_l = self.features(model, extras, self.cfg.get("train_split", "train"))
    test_f, test_l = self.features(model, extras, self.cfg.get("test_split", "test"))
    return train_f, train_l, test_f, test_l, int(self.cfg.get("num_classes", int(train_l.max()) + 1))

  def settings(self) -> dict:
    """Every setting of this evaluator, logged with its results."""
    return {"type": self.cfg.type, **{k: v for k, v in self.cfg.items() if k != "data"},
            "data": self.data_cfg.to_dict()}


def gather(x: Any) -> np.ndarray:
  """A global jax.Array, or each process's numpy array concatenated in process order, on every host."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  if isinstance(x, jax.Array) or jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@EVALUATORS.register("zero_shot")
class ZeroShot(Evaluator):
  """Zero-shot classification: prompt-ensembled class embeddings vs image embeddings."""

  def run(self, model: nnx.Module, extras: Any) -> dict[str, float]:
    """Top-1/top-5 on `cfg.split` with `cfg.classnames` x `cfg.templates`."""
    tok = tokenizer(data.tokenizer_spec(self.data_cfg))
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    encode = jax.jit(lambda t: self.method.text_features(
        nnx.merge(self.method.graphdef, params, model_state), extras, t))
    class_emb = zero_shot.class_text_embeddings(
        lambda t: np.asarray(encode(jnp.asarray(t))), tok.encode,
        _classnames(self.cfg.classnames), _templates(self.cfg.templates))
    feats, labels = self.features(model, extras, self.cfg.get("split", "test"))
    scores = zero_shot.zero_shot_scores(feats, class_emb)
    return knn.topk_accuracy(scores, labels, ks=(1, 5))


@EVALUATORS.register("knn")
class Knn(Evaluator):
  """DINO k-NN: cosine similarity, top-k, votes weighted by exp(sim / T)."""

  def run(self, model: nnx.Module, extras: Any) -> dict[str, float]:
    """Top-1/top-5 of `cfg.test_split` against the `cfg.train_split` feature bank."""
    train_f, train_l, test_f, test_l, num_classes = self.train_test(model, extras)
    scores = knn.knn_predict(train_f, train_l, test_f, num_classes=num_classes,
                             k=self.cfg.get("k", 20), temperature=self.cfg.get("temperature", 0.07),
                             mesh=self.mesh)
    return knn.topk_accuracy(scores, test_l, ks=(1, 5))


@EVALUATORS.register("linear_probe")
class LinearProbe(Evaluator):
  """Linear classifier on frozen features with a small lr/wd sweep on a held-out split."""

  def run(self, model: nnx.Module, extras: Any) -> dict[str, float]:
    """Top-1/top-5 on `cfg.test_split` after training on `cfg.train_split`."""
    train_f, train_l, test_f, test_l, num_classes = self.train_test(model, extras)
    res = linear_probe.linear_probe(train_f, train_l, test_f, test_l, num_classes=num_classes,
                                    **self.cfg.get("probe", {}))
    return {k: float(v) for k, v in res.items() if np.ndim(v) == 0 and not isinstance(v, str)}


def build_all(cfg: ConfigDict, method: Any, mesh: Any) -> dict[str, Evaluator]:
  """Evaluators of `config.evals` by name."""
  return {name: EVALUATORS.get(c.type)(c, method, mesh) for name, c in cfg.items()}


def save_result(workdir: str, name: str, step: int, result: dict, settings: dict) -> None:
  """WORKDIR/evals/<name>_<step>.json with the results and every setting used (process 0)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.join(workdir, "evals"), exist_ok=True)
  with open(os.path.join(workdir, "evals", f"{name}_{step}.json"), "w", encoding="utf-8") as f:
    json.dump({"step": step, "results": {k: float(v) for k, v in result.items()},
               "settings": settings}, f, indent=1, default=str)


@EVALUATORS.register("retrieval")
class Retrieval(Evaluator):
  """Image-text retrieval R@1/5/10 on `cfg.split` of an image-text source.

  Rows may repeat an image with another caption (COCO/Flickr30k layout: one row per caption);
  identical decoded images are one gallery entry, so an image counts as found when any of its
  captions is retrieved.
  """

  def run(self, model: nnx.Module, extras: Any) -> dict[str, float]:
    """Image->text and text->image recall at `cfg.ks` (default 1, 5, 10)."""
    source = data.source(self.data_cfg, self.cfg.get("split", "test"))
    transform = data.example_transform(self.data_cfg, "image_text", train=False)
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    text_fn = jax.jit(lambda t: self.method.text_features(
        nnx.merge(self.method.graphdef, params, model_state), extras, t))
    examples = [transform(source[i], np.random.default_rng(0)) for i in range(len(source))]
    index: dict[bytes, int] = {}
    text_to_image = np.asarray([index.setdefault(e["image"].tobytes(), len(index))
                                for e in examples])
    first = {v: k for k, v in reversed(list(enumerate(text_to_image)))}
    images = np.stack([examples[first[j]]["image"] for j in range(len(index))])
    tokens = np.stack([e["tokens"] for e in examples])
    img = np.concatenate([np.asarray(self._features(params, model_state, extras,
                                                    jnp.asarray(images[i:i + self.batch_size])))
                          for i in range(0, len(images), self.batch_size)])
    txt = np.concatenate([np.asarray(text_fn(jnp.asarray(tokens[i:i + self.batch_size])))
                          for i in range(0, len(tokens), self.batch_size)])
    return retrieval_recalls(img, txt, text_to_image, ks=tuple(self.cfg.get("ks", (1, 5, 10))))
