"""In-loop and standalone evaluators: feature extraction over the mesh + the eval math.

Each evaluator is configured by a dict in `config.evals` (name -> {type, every_steps, ...}) and
runs on its own schedule, like big_vision's evaluators. Every setting it uses is logged with it.
Building one checks all it can without weights (settings, splits, class names, templates,
tokenizer), so a bad value fails before training starts; at evaluation an unreadable record is
logged, left out and counted in the result's `skipped`.

An evaluator knows nothing of the method: it gets the method's prediction functions
(`Method.predict_fns`: fn(params, model_state, extras, batch)), jits the ones it needs once when
built, and calls them with the state of each evaluation, so no evaluation compiles the encoders
again. Its data config is the eval's `data` over the training data config it is given.
"""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from sslvl_jax import data, parallel
from sslvl_jax.data.examples import tokenizer
from sslvl_jax.errors import ConfigError, RunError
from sslvl_jax.evals import EVALUATORS, knn, linear_probe, retrieval_recalls, zero_shot

T = TypeVar("T")
COMMON = ("type", "every_steps", "batch_size", "data")  # settings of every evaluator
TRAIN_TEST = {"train_split": "train", "test_split": "test"}


def checked(name: str, key: str, value: Any, fn: Callable[[], T]) -> T:
  """fn(), any failure raised as a one-line ConfigError naming `evals.<name>.<key>=value`."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except  # whatever failed, name the setting
    reason = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
    raise ConfigError(f"evals.{name}.{key}={value!r}: {(reason.splitlines() or [''])[0]}") from e


def _open(cfg: ConfigDict, split: str) -> Any:
  """The source of `split`; one without records is a configuration error."""
  source = data.source(cfg, split)
  if not len(source):
    raise ConfigError("the split has no records")
  return source


class Evaluator:
  """Base: settings checked and splits opened up front, sharded feature extraction of a split."""

  SPLITS: dict[str, str] = {}  # split setting -> its default
  REQUIRED: tuple[str, ...] = ()
  OPTIONS: tuple[str, ...] = ()  # the other settings it reads
  EXAMPLE = "image_label"  # host transform of its records
  TEXT = False  # needs the tokenizer
  PREDICT: tuple[str, ...] = ("image_features",)  # the prediction functions it calls
  IMAGES = "image_features"  # the one `features` extracts

  def __init__(self, cfg: ConfigDict, predict_fns: dict[str, Callable], mesh: Any,
               train_data: ConfigDict, name: str | None = None):
    """`predict_fns`: Method.predict_fns(); `train_data`: the training data config, under the
    eval's own `data` (the eval reads its splits from it where it has no `data`)."""
    self.cfg, self.mesh = cfg, mesh
    self.name = name or cfg.type
    self._check_settings()
    missing = [k for k in self.PREDICT if k not in predict_fns]
    if missing:
      raise ConfigError(f"evals.{self.name}.type={cfg.type!r}: the method has no {missing[0]} "
                        f"(it predicts {', '.join(sorted(predict_fns)) or 'nothing'})")
    # Jitted once: params and state are arguments, so every evaluation reuses the executables.
    self.predict = {k: jax.jit(predict_fns[k]) for k in self.PREDICT}
    self.data_cfg = ConfigDict(train_data.to_dict())
    self.data_cfg.update(cfg.get("data", {}))
    self.batch_size = cfg.get("batch_size", 256)
    n = mesh.devices.size
    self.batch_size = -(-self.batch_size // n) * n
    self.splits = {key: cfg.get(key, default) for key, default in self.SPLITS.items()}
    self.sources = {key: checked(self.name, key, split, lambda s=split: _open(self.data_cfg, s))
                    for key, split in self.splits.items()}
    if self.TEXT:
      self.tokenizer = checked(self.name, "data.tokenizer", self.data_cfg.get("tokenizer"),
                               lambda: tokenizer(data.tokenizer_spec(self.data_cfg)))
    self.transform = data.example_transform(self.data_cfg, self.EXAMPLE, train=False)
    self.skipped = 0  # records left out as unreadable in the current run, all processes

  def _check_settings(self) -> None:
    """Every setting is one this evaluator reads, and the required ones are set."""
    known = sorted({*COMMON, *self.SPLITS, *self.REQUIRED, *self.OPTIONS})
    for key in self.cfg.keys():
      if key not in known:
        raise ConfigError(f"evals.{self.name}.{key}: not a setting of a {self.cfg.type} "
                          f"evaluator; known: {', '.join(known)}")
    for key in self.REQUIRED:
      if self.cfg.get(key) is None:
        raise ConfigError(f"evals.{self.name}.{key} is not set; a {self.cfg.type} evaluator "
                          f"needs {', '.join(self.REQUIRED)}")

  def run(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """The metrics of `evaluate` on this state and `skipped`, the records left out as unreadable."""
    self.skipped = 0
    return {**self.evaluate(params, model_state, extras), "skipped": self.skipped}

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """The metrics of this evaluator (each subclass)."""
    raise NotImplementedError

  def _count(self, key: str, rows: int) -> None:
    """Add the records of split setting `key` missing from the `rows` read to `skipped`.

    `rows` counts what every process read, so this is the sum over processes of the records a
    process should have read minus the rows it got. No row at all is an error.
    """
    if not rows:
      raise RunError(f"evals.{self.name}.{key}={self.splits[key]!r}: all "
                         f"{len(self.sources[key])} records are unreadable (each is logged above)")
    self.skipped += len(self.sources[key]) - rows

  def due(self, step: int, total_steps: int) -> bool:
    """Run every `every_steps` and at the last step."""
    every = self.cfg.get("every_steps")
    return step == total_steps or bool(every and step % every == 0)

  def features(self, params: Any, model_state: Any, extras: Any, key: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the readable examples of split setting `key`, sharded over the mesh.

    The features are `IMAGES` of the predictions (image_features, or image_embed for zero-shot).

    Every process runs the same number of batches (zero-padded, with a validity mask), so the
    collectives line up on multi-host; rows come back grouped by process. A process whose
    records were left out as unreadable just has fewer valid rows.
    """
    source = self.sources[key]
    nproc = jax.process_count()
    local_bs = self.batch_size // nproc
    n_batches = -(-(-(-len(source) // nproc)) // local_bs)
    it = iter(data.make_dataset(source, self.transform, local_batch_size=local_bs, seed=0,
                                train=False))
    size = self.data_cfg.image_size
    predict = self.predict[self.IMAGES]
    feats, labels = [], []
    for _ in range(n_batches):
      local = next(it, None)
      n = 0 if local is None else len(local["label"])
      images = np.zeros((local_bs, size, size, 3), np.uint8)
      lab = np.full((local_bs,), -1, np.int64)
      if n:
        images[:n], lab[:n] = local["image"], local["label"]
      g = parallel.host_to_global(self.mesh, {"image": images})
      f = gather(predict(params, model_state, extras, g["image"]))
      valid = gather(np.arange(local_bs) < n)
      feats.append(f[valid])
      labels.append(gather(lab)[valid])
    self._count(key, sum(map(len, labels)))
    return np.concatenate(feats), np.concatenate(labels)

  def train_test(self, params: Any, model_state: Any, extras: Any) -> tuple:
    """(train feats, train labels, test feats, test labels, number of classes) for probes."""
    train_f, train_l = self.features(params, model_state, extras, "train_split")
    test_f, test_l = self.features(params, model_state, extras, "test_split")
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

  SPLITS = {"split": "test"}
  REQUIRED = ("classnames", "templates")
  TEXT = True
  PREDICT = ("image_embed", "text_embed")
  IMAGES = "image_embed"

  def __init__(self, cfg: ConfigDict, predict_fns: dict[str, Callable], mesh: Any,
               train_data: ConfigDict, name: str | None = None):
    super().__init__(cfg, predict_fns, mesh, train_data, name)
    self.classnames = checked(self.name, "classnames", cfg.classnames,
                              lambda: zero_shot.load_classnames(cfg.classnames))
    self.templates = checked(self.name, "templates", cfg.templates,
                             lambda: zero_shot.load_templates(cfg.templates))

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """Top-1/top-5 on `cfg.split` with `cfg.classnames` x `cfg.templates`."""
    encode = self.predict["text_embed"]
    class_emb = zero_shot.class_text_embeddings(
        lambda t: np.asarray(encode(params, model_state, extras, jnp.asarray(t))),
        self.tokenizer.encode, self.classnames, self.templates)
    feats, labels = self.features(params, model_state, extras, "split")
    scores = zero_shot.zero_shot_scores(feats, class_emb)
    return knn.topk_accuracy(scores, labels, ks=(1, 5))


@EVALUATORS.register("knn")
class Knn(Evaluator):
  """DINO k-NN: cosine similarity, top-k, votes weighted by exp(sim / T)."""

  SPLITS = TRAIN_TEST
  OPTIONS = ("k", "temperature", "num_classes")

  def __init__(self, cfg: ConfigDict, predict_fns: dict[str, Callable], mesh: Any,
               train_data: ConfigDict, name: str | None = None):
    super().__init__(cfg, predict_fns, mesh, train_data, name)
    self.k, bank = cfg.get("k", 20), len(self.sources["train_split"])
    if self.k > bank:
      raise ConfigError(f"evals.{self.name}.k={self.k}: more neighbours than the {bank} records "
                        f"of train_split={self.splits['train_split']!r}")

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """Top-1/top-5 of `cfg.test_split` against the `cfg.train_split` feature bank."""
    train_f, train_l, test_f, test_l, num_classes = self.train_test(params, model_state, extras)
    scores = knn.knn_predict(train_f, train_l, test_f, num_classes=num_classes,
                             k=self.k, temperature=self.cfg.get("temperature", 0.07),
                             mesh=self.mesh)
    return knn.topk_accuracy(scores, test_l, ks=(1, 5))


@EVALUATORS.register("linear_probe")
class LinearProbe(Evaluator):
  """Linear classifier on frozen features with a small lr/wd sweep on a held-out split."""

  SPLITS = TRAIN_TEST
  OPTIONS = ("probe", "num_classes")

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """Top-1/top-5 on `cfg.test_split` after training on `cfg.train_split`."""
    train_f, train_l, test_f, test_l, num_classes = self.train_test(params, model_state, extras)
    res = linear_probe.linear_probe(train_f, train_l, test_f, test_l, num_classes=num_classes,
                                    **self.cfg.get("probe", {}))
    return {k: float(v) for k, v in res.items() if np.ndim(v) == 0 and not isinstance(v, str)}


def build_all(cfg: ConfigDict, method: Any, mesh: Any, *,
              predict_fns: dict[str, Callable] | None = None,
              train_data: ConfigDict | None = None) -> dict[str, Evaluator]:
  """Evaluators of `config.evals` by name, each checked against its data and assets.

  They get `predict_fns` (default `method.predict_fns()`) and the training data config
  `train_data` (default `method.config.data`, the config the method trains on); nothing else of
  the method.
  """
  predict_fns = method.predict_fns() if predict_fns is None else predict_fns
  train_data = method.config.data if train_data is None else train_data
  out = {}
  for name, c in cfg.items():
    kind = c.get("type")
    out[name] = checked(name, "type", kind, lambda k=kind: EVALUATORS.get(k))(
        c, predict_fns, mesh, train_data, name)
  return out


def save_result(workdir: str, name: str, step: int, result: dict, settings: dict) -> None:
  """WORKDIR/evals/<name>_<step>.json with the results and every setting used (process 0)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / "evals" / f"{name}_{step}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"step": step, "results": {k: float(v) for k, v in result.items()},
                              "settings": settings}, indent=1, default=str))


@EVALUATORS.register("retrieval")
class Retrieval(Evaluator):
  """Image-text retrieval R@1/5/10 on `cfg.split` of an image-text source.

  Rows may repeat an image with another caption (COCO/Flickr30k layout: one row per caption);
  identical decoded images are one gallery entry, so an image counts as found when any of its
  captions is retrieved.
  """

  SPLITS = {"split": "test"}
  OPTIONS = ("ks",)
  EXAMPLE = "image_text"
  TEXT = True
  PREDICT = ("image_embed", "text_embed")
  IMAGES = "image_embed"

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """Image->text and text->image recall at `cfg.ks` (default 1, 5, 10)."""
    # Every process reads the whole split and computes the recalls itself.
    batches = list(data.make_dataset(self.sources["split"], self.transform,
                                     local_batch_size=self.batch_size, seed=0, train=False,
                                     process_index=0, process_count=1))
    self._count("split", sum(len(b["tokens"]) for b in batches))
    rows = np.concatenate([b["image"] for b in batches])
    tokens = np.concatenate([b["tokens"] for b in batches])
    index: dict[bytes, int] = {}
    text_to_image = np.asarray([index.setdefault(im.tobytes(), len(index)) for im in rows])
    images = rows[np.unique(text_to_image, return_index=True)[1]]
    image_fn, text_fn = self.predict["image_embed"], self.predict["text_embed"]
    img = np.concatenate([np.asarray(image_fn(params, model_state, extras,
                                              jnp.asarray(images[i:i + self.batch_size])))
                          for i in range(0, len(images), self.batch_size)])
    txt = np.concatenate([np.asarray(text_fn(params, model_state, extras,
                                             jnp.asarray(tokens[i:i + self.batch_size])))
                          for i in range(0, len(tokens), self.batch_size)])
    return retrieval_recalls(img, txt, text_to_image, ks=tuple(self.cfg.get("ks", (1, 5, 10))))
