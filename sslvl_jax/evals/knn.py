"""DINO k-NN classification on frozen features (`eval_knn.py`), optionally with a sharded bank.

Train and test features are L2-normalised; each test row takes the `k` train rows of highest cosine
similarity and every neighbour votes for its label with weight exp(sim / T). With a mesh the train
bank is split by rows over the 'data' axis: every device keeps its local top-k, the candidates are
all-gathered and a last top-k picks the global k, which equals the single-device result.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sslvl_jax import parallel
from sslvl_jax.evals.common import similarity
from sslvl_jax.losses import l2_normalize


def _chunk_scores(test: jax.Array, bank: jax.Array, bank_labels: jax.Array, *, n_train: int, k: int,
                  temperature: float, num_classes: int, axis_name: str | None) -> jax.Array:
  """Class scores of one chunk of normalised test rows against this device's rows of the bank."""
  n_local = bank.shape[0]
  rows = parallel.axis_index(axis_name) * n_local + jnp.arange(n_local)
  sim = jnp.where(rows < n_train, similarity(test, bank), -jnp.inf)  # padding rows never win
  sim, idx = jax.lax.top_k(sim, min(k, n_local))
  sim = parallel.all_gather(sim.T, axis_name).T  # (chunk, devices * local k) candidates
  labels = parallel.all_gather(bank_labels[idx].T, axis_name).T
  sim, pos = jax.lax.top_k(sim, k)
  labels = jnp.take_along_axis(labels, pos, axis=1)
  weights = jnp.exp(sim / temperature)[..., None]
  return (jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * weights).sum(axis=1)


@functools.partial(jax.jit, static_argnames=("n_train", "n_test", "k", "temperature", "num_classes",
                                             "mesh"))
def _knn_scores(bank: jax.Array, bank_labels: jax.Array, test_chunks: jax.Array, *, n_train: int,
                n_test: int, k: int, temperature: float, num_classes: int, mesh: Mesh | None
                ) -> jax.Array:
  """All test chunks through `_chunk_scores`, over the mesh when there is one."""
  axis_name = None if mesh is None else parallel.BATCH_AXES

  def per_device(bank, bank_labels, test_chunks):
    score = functools.partial(_chunk_scores, bank=l2_normalize(bank), bank_labels=bank_labels,
                              n_train=n_train, k=k, temperature=temperature,
                              num_classes=num_classes, axis_name=axis_name)
    return jax.lax.map(lambda t: score(l2_normalize(t)), test_chunks)

  if mesh is not None:
    # The all-gathered candidates are the same on every device; shard_map cannot infer that.
    per_device = jax.shard_map(per_device, mesh=mesh, out_specs=P(), check_vma=False,
                               in_specs=(P(parallel.BATCH_AXES), P(parallel.BATCH_AXES), P()))
  scores = per_device(bank, bank_labels, test_chunks)
  return scores.reshape(-1, num_classes)[:n_test]


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  """Zero rows appended so that len(x) is a multiple of `multiple`."""
  pad = -len(x) % multiple
  return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x


def _put(x: np.ndarray, mesh: Mesh | None, spec: P) -> jax.Array:
  """A host array (identical on every process) as a global array with `spec` on `mesh`."""
  if mesh is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def knn_predict(train_feats: jax.Array, train_labels: jax.Array, test_feats: jax.Array, *,
                num_classes: int, k: int = 20, temperature: float = 0.07, mesh: Mesh | None = None,
                test_chunk: int = 256) -> jax.Array:
  """DINO k-NN class scores (n_test, num_classes): per class, sum of exp(cos / T) over the k nearest.

  The test set is processed `test_chunk` rows at a time (memory test_chunk x bank rows per device).
  Similarities are computed in f32 at highest matmul precision.
  """
  train_feats = np.asarray(train_feats, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  test_feats = np.asarray(test_feats, np.float32)
  n_train, n_test = len(train_feats), len(test_feats)
  if not 0 < k <= n_train:
    raise ValueError(f"k={k} needs 1 <= k <= number of train features ({n_train})")
  n_dev = 1 if mesh is None else mesh.devices.size
  chunk = max(1, min(test_chunk, n_test))
  test_chunks = _pad_rows(test_feats, chunk).reshape(-1, chunk, test_feats.shape[1])
  bank_spec = P(parallel.BATCH_AXES)
  return _knn_scores(_put(_pad_rows(train_feats, n_dev), mesh, bank_spec),
                     _put(_pad_rows(train_labels, n_dev), mesh, bank_spec),
                     _put(test_chunks, mesh, P()), n_train=n_train, n_test=n_test, k=k,
                     temperature=float(temperature), num_classes=num_classes, mesh=mesh)


def topk_accuracy(scores: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)
                  ) -> dict[str, float]:
  """{'top{k}': fraction of rows whose label is among the k highest scores} (k capped at #classes).

  Ties are broken towards the lower class index (`jax.lax.top_k`).
  """
  scores = jnp.asarray(scores)
  kmax = min(max(ks), scores.shape[1])
  _, top = jax.lax.top_k(scores, kmax)
  hit = np.asarray(top == jnp.asarray(labels)[:, None])
  return {f"top{k}": float(hit[:, :min(k, kmax)].any(axis=1).mean()) for k in ks}
