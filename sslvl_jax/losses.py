"""Pure loss functions, written per device with axis-aware collectives.

Every loss takes the LOCAL shard of the batch and an `axis_name`. Inside `jax.shard_map` over the
data axis it gathers what it needs (with gradient) and returns the loss of the GLOBAL batch,
identical on every device; with `axis_name=None` the same code is the single-device loss.
Embeddings are expected to be L2-normalised where the method says so; only BYOL, SimSiam and MoCo v3
normalise inside, because their reference losses do (their docstrings say the inputs are raw).
Statistics and softmaxes are computed in f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sslvl_jax import parallel


def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-row softmax cross-entropy with integer labels and optional label smoothing (f32)."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
  return nll


_MASK_LOGIT = 1e9  # SimCLR's LARGE_NUM: removes a sample's similarity to itself


def _check_chunk_size(n: int, chunk_size: int, what: str = "global batch") -> None:
  """Raise a clear error when `chunk_size` does not split the `n` streamed columns evenly."""
  if chunk_size < 0:
    raise ValueError(f"chunk_size={chunk_size} must be >= 0 (0: the dense loss)")
  if chunk_size and n % chunk_size:
    example = max(c for c in range(1, min(n, chunk_size) + 1) if n % c == 0)
    raise ValueError(f"chunk_size={chunk_size} does not divide the {what} of {n}; set chunk_size "
                     f"to a divisor of {n} (e.g. {example}) or to 0 for the dense loss")


def _row_dot(rows: jax.Array, cols: jax.Array, scale: float | jax.Array) -> jax.Array:
  """Per-row logit scale * <rows_i, cols_i> in f32 (cols may broadcast, e.g. a column mean)."""
  return scale * jnp.sum(rows.astype(jnp.float32) * cols.astype(jnp.float32), axis=-1)


def _streamed_row_stats(rows: jax.Array, cols: jax.Array, scale: float | jax.Array,
                        chunk_size: int, *, masked_cols: jax.Array | None = None,
                        row_keys: jax.Array | None = None, col_keys: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """Row statistics of the logits scale * rows @ cols.T without materialising them.

  Streams over `cols` (n, d) in chunks of `chunk_size` rows with a running f32 log-sum-exp; the
  chunk body is rematerialised in the backward pass, so only (b, chunk_size) logits ever exist.
  Returns (lse, key_sum, key_count): each row's log-sum-exp, where column masked_cols[i] of row i
  gets -_MASK_LOGIT (NT-Xent's self-mask); with keys, the sum and number of row i's logits over the
  columns j with col_keys[j] == row_keys[i] (None without keys).
  """
  _check_chunk_size(cols.shape[0], chunk_size)
  n, d = cols.shape
  n_chunks = n // chunk_size
  xs = {"cols": cols.reshape(n_chunks, chunk_size, d),
        "start": jnp.arange(n_chunks, dtype=jnp.int32) * chunk_size}
  with_keys = row_keys is not None
  if with_keys:
    xs["keys"] = col_keys.reshape(n_chunks, chunk_size)

  def body(carry, x):
    run_max, run_sum, key_sum, key_count = carry
    logits = (scale * rows @ x["cols"].T).astype(jnp.float32)
    if masked_cols is not None:
      col = x["start"] + jnp.arange(chunk_size, dtype=jnp.int32)
      logits = logits - jnp.where(masked_cols[:, None] == col[None, :], _MASK_LOGIT, 0.0)
    # The shift is a constant of the log-sum-exp: no gradient through it.
    new_max = jax.lax.stop_gradient(jnp.maximum(run_max, logits.max(axis=-1)))
    run_sum = (run_sum * jnp.exp(run_max - new_max)
               + jnp.exp(logits - new_max[:, None]).sum(axis=-1))
    if with_keys:
      match = row_keys[:, None] == x["keys"][None, :]
      key_sum = key_sum + jnp.where(match, logits, 0.0).sum(axis=-1)
      key_count = key_count + match.sum(axis=-1, dtype=jnp.float32)
    return (new_max, run_sum, key_sum, key_count), None

  # Built from the local rows so that inside shard_map the carry varies over the same axes as
  # the body's output.
  zeros = jnp.zeros_like(rows[:, 0], jnp.float32)
  init = (jnp.full_like(zeros, -jnp.inf), zeros, zeros, zeros)
  (run_max, run_sum, key_sum, key_count), _ = jax.lax.scan(
      jax.checkpoint(body, prevent_cse=False), init, xs)
  lse = run_max + jnp.log(run_sum)
  return (lse, key_sum, key_count) if with_keys else (lse, None, None)


def _streamed_cross_entropy(rows: jax.Array, pos_cols: jax.Array, cols_all: jax.Array,
                            scale: float | jax.Array, chunk_size: int,
                            label_smoothing: float = 0.0) -> jax.Array:
  """Streamed `_cross_entropy` of scale * rows @ cols_all.T; row i's positive is pos_cols[i]."""
  lse = _streamed_row_stats(rows, cols_all, scale, chunk_size)[0]
  nll = lse - _row_dot(rows, pos_cols, scale)
  if label_smoothing:  # the row mean of the logits is the logit of the column mean
    mean_logit = _row_dot(rows, cols_all.astype(jnp.float32).mean(axis=0), scale)
    nll = (1.0 - label_smoothing) * nll - label_smoothing * (mean_logit - lse)
  return nll


def clip_loss(img: jax.Array, txt: jax.Array, logit_scale: jax.Array, *,
              axis_name: str | None = None, label_smoothing: float = 0.0,
              chunk_size: int = 0) -> jax.Array:
  """Symmetric InfoNCE (CLIP/ALIGN) over the global batch; local x global (or x chunk) logits.

  Args:
    img, txt: local (b, d) L2-normalised embeddings; row i of each is a positive pair.
    logit_scale: the multiplier applied to cosine similarities (exp of the learnable log scale).
    label_smoothing: ALIGN uses 0.1.
    chunk_size: 0 materialises the (b, global) logits; N > 0 streams them N gathered columns at a
      time (N must divide the global batch), so only (b, N) logits exist, also in the backward pass.
  """
  b = img.shape[0]
  img_all = parallel.all_gather(img, axis_name)
  txt_all = parallel.all_gather(txt, axis_name)
  n = b * parallel.axis_size(axis_name)
  if chunk_size:
    total = (_streamed_cross_entropy(img, txt, txt_all, logit_scale, chunk_size,
                                     label_smoothing).sum()
             + _streamed_cross_entropy(txt, img, img_all, logit_scale, chunk_size,
                                       label_smoothing).sum())
    return parallel.psum(total, axis_name) / (2 * n)
  labels = parallel.axis_index(axis_name) * b + jnp.arange(b)
  logits_i2t = logit_scale * img @ txt_all.T
  logits_t2i = logit_scale * txt @ img_all.T
  total = (_cross_entropy(logits_i2t, labels, label_smoothing).sum()
           + _cross_entropy(logits_t2i, labels, label_smoothing).sum())
  return parallel.psum(total, axis_name) / (2 * n)


def _siglip_block(img: jax.Array, txt_block: jax.Array, logit_scale: jax.Array,
                  logit_bias: jax.Array, positive: bool, chunk: int) -> jax.Array:
  """Sigmoid loss summed over the (b, b) block img x txt_block, in (b, chunk) pieces.

  Pairs on the block's diagonal are positives when `positive`; each piece is rematerialised in the
  backward pass, so no piece of logits is kept for it.
  """
  b = img.shape[0]

  def piece(cols: jax.Array, start: jax.Array) -> jax.Array:
    logits = (logit_scale * img @ cols.T + logit_bias).astype(jnp.float32)
    if positive:
      diagonal = jnp.arange(b)[:, None] == start + jnp.arange(chunk)[None, :]
      logits = jnp.where(diagonal, -logits, logits)
    return -jax.nn.log_sigmoid(-logits).sum()  # negatives: -log sigmoid(-z)

  piece = jax.checkpoint(piece, prevent_cse=False)
  if chunk == b:
    return piece(txt_block, jnp.int32(0))
  n_pieces = b // chunk
  starts = jnp.arange(n_pieces, dtype=jnp.int32) * chunk
  pieces = txt_block.reshape(n_pieces, chunk, txt_block.shape[1])
  return jax.lax.scan(lambda _, x: (None, piece(*x)), None, (pieces, starts))[1].sum()


def siglip_loss(img: jax.Array, txt: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array, *,
                axis_name: str | None = None, chunk_size: int = 0) -> jax.Array:
  """Pairwise sigmoid loss (SigLIP), chunked around the device ring.

  Text chunks travel around the ring with `ppermute` in a loop (program size independent of the
  device count), so each device only ever holds a (b, b) block of logits, recomputed in the backward
  pass; chunk_size N > 0 (a divisor of the local batch b; N > b means b) splits each block into
  (b, N) pieces. Pairs on the diagonal of the device's own chunk are positives (+1), all other
  pairs of the global batch are negatives (-1). Normalised by the global batch size, as in the paper.
  """
  b = img.shape[0]
  n_dev = parallel.axis_size(axis_name)
  chunk = min(chunk_size, b) if chunk_size else b
  _check_chunk_size(b, chunk_size and chunk, "local batch (global batch / devices)")

  def block(txt_block, positive):
    return _siglip_block(img, txt_block, logit_scale, logit_bias, positive, chunk)

  def ring_step(_, carry):
    txt_block, total = carry
    txt_block = parallel.ring_shift(txt_block, axis_name)
    return txt_block, total + block(txt_block, False)

  total = block(txt, True)
  if n_dev > 1:
    total = jax.lax.fori_loop(0, n_dev - 1, ring_step, (txt, total))[1]
  return parallel.psum(total, axis_name) / (b * n_dev)


# ---- self-supervised and label-aware contrastive losses ---------------------------------------


def _global_mean(x: jax.Array, axis_name: str | None, axis: int | tuple[int, ...] | None = None
                 ) -> jax.Array:
  """Mean over `axis` (default all) of an array evenly sharded over `axis_name` along one of them."""
  total = x.sum(axis=axis)
  return parallel.psum(total, axis_name) / (x.size // total.size * parallel.axis_size(axis_name))


def _global_labels(b: int, axis_name: str | None) -> jax.Array:
  """Positions of this device's b rows in the gathered global batch."""
  return parallel.axis_index(axis_name) * b + jnp.arange(b)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Row-wise L2 normalisation in f32: x / max(|x|, eps), torch's F.normalize (the one copy)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _cosine_to_target(p: jax.Array, z: jax.Array, stop_gradient: bool = True) -> jax.Array:
  """Per-row cos(p, stop_gradient(z)) of raw vectors (no stop-gradient only for ablations)."""
  z = jax.lax.stop_gradient(z) if stop_gradient else z
  return jnp.sum(l2_normalize(p) * l2_normalize(z), axis=-1)


def _soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-row cross-entropy against a target distribution (f32)."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def _off_diagonal_sq_sum(c: jax.Array) -> jax.Array:
  """Sum of squares of the off-diagonal entries of a square matrix."""
  return jnp.sum(jnp.where(jnp.eye(c.shape[0], dtype=bool), 0.0, c) ** 2)


def nt_xent_loss(z1: jax.Array, z2: jax.Array, temperature: float | jax.Array, *,
                 axis_name: str | None = None, chunk_size: int = 0) -> jax.Array:
  """SimCLR NT-Xent over the global batch; the two directions are SUMMED as in the reference.

  Args:
    z1, z2: local (b, d) L2-normalised projections of the two views; row i of each is a pair.
    temperature: tau (0.1 reference ImageNet flag, 0.5 its CIFAR command, 0.2 solo-learn).
  Each row's logits are [z_a . z_b_all, z_a . z_a_all (self masked)] / tau, both halves gathered with
  gradient; the loss is mean(loss_a + loss_b) over the global batch. chunk_size N > 0 streams both
  halves N gathered columns at a time (as in `clip_loss`).
  """
  z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
  z1_all, z2_all = parallel.all_gather(z1, axis_name), parallel.all_gather(z2, axis_name)
  labels = _global_labels(z1.shape[0], axis_name)
  if chunk_size:
    def streamed_direction(za, zb, za_all, zb_all):
      lse_ab = _streamed_row_stats(za, zb_all, 1.0 / temperature, chunk_size)[0]
      lse_aa = _streamed_row_stats(za, za_all, 1.0 / temperature, chunk_size,
                                   masked_cols=labels)[0]
      return jnp.logaddexp(lse_ab, lse_aa) - _row_dot(za, zb, 1.0 / temperature)

    return _global_mean(streamed_direction(z1, z2, z1_all, z2_all)
                        + streamed_direction(z2, z1, z2_all, z1_all), axis_name)
  self_mask = _MASK_LOGIT * jax.nn.one_hot(labels, z1_all.shape[0])

  def direction(za, za_all, zb_all):
    logits_ab = za @ zb_all.T / temperature
    logits_aa = za @ za_all.T / temperature - self_mask
    return _cross_entropy(jnp.concatenate([logits_ab, logits_aa], axis=1), labels)

  return _global_mean(direction(z1, z1_all, z2_all) + direction(z2, z2_all, z1_all), axis_name)


def byol_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array, *,
              axis_name: str | None = None) -> jax.Array:
  """BYOL: SUM of 2 - 2cos(p1, sg(z2)) and 2 - 2cos(p2, sg(z1)), mean over the global batch.

  Inputs are RAW: p_i online predictions, z_i target projections (local (b, d)); the loss
  L2-normalises them itself because normalisation is part of the reference `regression_loss`.
  Range [0, 8].
  """
  return _global_mean(4.0 - 2.0 * (_cosine_to_target(p1, z2) + _cosine_to_target(p2, z1)),
                      axis_name)


def simsiam_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array, *,
                 axis_name: str | None = None, stop_gradient: bool = True) -> jax.Array:
  """SimSiam: -(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2 (directions AVERAGED), global-batch mean.

  Inputs are RAW predictor outputs p_i and projections z_i (local (b, d)); cosine normalises them.
  Minimum -1 (also the value of a collapsed solution). `stop_gradient=False` is the paper's
  ablation that collapses.
  """
  cos = _cosine_to_target(p1, z2, stop_gradient) + _cosine_to_target(p2, z1, stop_gradient)
  return -0.5 * _global_mean(cos, axis_name)


def moco_v3_loss(q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array,
                 temperature: float | jax.Array, *, axis_name: str | None = None,
                 chunk_size: int = 0) -> jax.Array:
  """MoCo v3: ctr(q1, k2) + ctr(q2, k1), ctr = 2T * CE(q . k_all / T, own key) over the global batch.

  Inputs are RAW local (b, d) queries (predictor outputs) and keys (momentum-encoder projections);
  both are L2-normalised here, as in the reference `contrastive_loss`. Keys are gathered without
  gradient. T is 0.2 for ViT and 1.0 for ResNet-50. chunk_size N > 0 streams the logits N gathered
  keys at a time (as in `clip_loss`).
  """
  labels = _global_labels(q1.shape[0], axis_name)

  def ctr(q, k):
    k = jax.lax.stop_gradient(l2_normalize(k))
    k_all = parallel.all_gather(k, axis_name)
    if chunk_size:
      return _streamed_cross_entropy(l2_normalize(q), k, k_all, 1.0 / temperature, chunk_size)
    return _cross_entropy(l2_normalize(q) @ k_all.T / temperature, labels)

  return 2.0 * temperature * _global_mean(ctr(q1, k2) + ctr(q2, k1), axis_name)


def moco_queue_loss(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float | jax.Array,
                    *, axis_name: str | None = None) -> jax.Array:
  """MoCo v1/v2: CE([q . k+, q . queue] / T, class 0), global-batch mean; not symmetrised.

  Args:
    q, k: local (b, d) L2-normalised queries and keys (normalise once outside, so the same keys
      go to `moco_enqueue`); k gets no gradient.
    queue: (K, d) replicated L2-normalised negatives (before this step's keys are enqueued).
  """
  q = q.astype(jnp.float32)
  k = jax.lax.stop_gradient(k.astype(jnp.float32))
  queue = jax.lax.stop_gradient(queue.astype(jnp.float32))
  logits = jnp.concatenate([jnp.sum(q * k, axis=-1, keepdims=True), q @ queue.T], axis=1)
  labels = jnp.zeros(q.shape[0], jnp.int32)
  return _global_mean(_cross_entropy(logits / temperature, labels), axis_name)


def moco_enqueue(queue: jax.Array, keys_global: jax.Array, ptr: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Write the gathered (N, d) global keys into the (K, d) FIFO ring at `ptr`; returns (queue, ptr)."""
  size, n = queue.shape[0], keys_global.shape[0]
  if size % n:
    raise ValueError(f"MoCo queue size {size} is not divisible by the global batch size {n}; "
                     f"choose a queue size that is a multiple of {n}")
  ptr = jnp.asarray(ptr, jnp.int32)
  queue = jax.lax.dynamic_update_slice(queue, keys_global.astype(queue.dtype), (ptr, jnp.int32(0)))
  return queue, (ptr + n) % size


def _dino_terms(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array,
                student_temp: float | jax.Array, teacher_temp: float | jax.Array,
                n_global_crops: int, axis_name: str | None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(DINO loss, mean teacher entropy, largest batch-mean teacher probability), global batch."""
  n_crops = student_logits.shape[0]
  if teacher_logits.shape[0] != n_global_crops or n_crops < n_global_crops:
    raise ValueError(f"DINO expects teacher logits for the {n_global_crops} global crops and at least "
                     f"as many student crops; got teacher {teacher_logits.shape}, student "
                     f"{student_logits.shape}")
  teacher_logp = jax.lax.stop_gradient(jax.nn.log_softmax(
      (teacher_logits.astype(jnp.float32) - center) / teacher_temp, axis=-1))
  teacher_p = jnp.exp(teacher_logp)
  student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  ce = -jnp.einsum("ibk,vbk->ivb", teacher_p, student_logp, precision=jax.lax.Precision.HIGHEST)
  pairs = ~np.eye(n_global_crops, n_crops, dtype=bool)  # teacher crop iq, student crop v != iq
  entropy = -jnp.sum(teacher_p * teacher_logp, axis=-1)
  top_mass = _global_mean(teacher_p, axis_name, axis=(0, 1)).max()
  return _global_mean(ce[pairs], axis_name), _global_mean(entropy, axis_name), top_mass


def dino_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array,
              student_temp: float | jax.Array, teacher_temp: float | jax.Array, *,
              n_global_crops: int = 2, axis_name: str | None = None) -> jax.Array:
  """DINO: mean over (teacher crop iq, student crop v != iq) pairs of the global-batch mean CE.

  Args:
    student_logits: (n_crops, b, K) raw head outputs; crops [0, n_global_crops) are the global crops
      in the teacher's order.
    teacher_logits: (n_global_crops, b, K); teacher probs softmax((t - center) / teacher_temp) are
      stop-gradient. center: (K,) or (1, K), the PREVIOUS center (update it afterwards).
  The number of pairs is 2 * n_crops - 2 with two global crops.
  """
  return _dino_terms(student_logits, teacher_logits, center, student_temp, teacher_temp,
                     n_global_crops, axis_name)[0]


def dino_monitors(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array,
                  student_temp: float | jax.Array, teacher_temp: float | jax.Array, *,
                  n_global_crops: int = 2, axis_name: str | None = None) -> dict[str, jax.Array]:
  """DINO collapse diagnostics over the loss pairs.

  teacher_entropy -> 0 and teacher_top_mass (the batch-mean teacher probability of its most used
  output) -> 1 when one output dominates (no centering); entropy -> ln K when the teacher is uniform
  (no sharpening); kl_teacher_student -> 0 in either collapse.
  """
  loss, entropy, top_mass = jax.lax.stop_gradient(_dino_terms(
      student_logits, teacher_logits, center, student_temp, teacher_temp, n_global_crops, axis_name))
  # Every teacher crop appears in the same number of pairs, so pair-mean KL = CE - mean entropy.
  return {"teacher_entropy": entropy, "kl_teacher_student": loss - entropy,
          "teacher_top_mass": top_mass}


def dino_center_update(center: jax.Array, teacher_logits: jax.Array, momentum: float | jax.Array,
                       *, axis_name: str | None = None) -> jax.Array:
  """New center m * center + (1 - m) * mean of the raw teacher logits over global crops and batch."""
  batch_center = _global_mean(teacher_logits.astype(jnp.float32), axis_name, axis=(0, 1))
  return momentum * center + (1.0 - momentum) * batch_center


def _global_batch_norm(z: jax.Array, axis_name: str | None, eps: float = 1e-5) -> jax.Array:
  """BatchNorm without affine using GLOBAL batch statistics (biased variance, torch eps)."""
  z = z.astype(jnp.float32)
  mean = _global_mean(z, axis_name, axis=0)
  var = _global_mean(jnp.square(z - mean), axis_name, axis=0)
  return (z - mean) * jax.lax.rsqrt(var + eps)


def barlow_twins_loss(z1: jax.Array, z2: jax.Array, lambd: float = 0.0051, *,
                      axis_name: str | None = None, scale_loss: float = 1.0) -> jax.Array:
  """Barlow Twins: sum (diag(c) - 1)^2 + lambd * sum offdiag(c)^2, c the global cross-correlation.

  z1, z2: local (b, D) raw projections; each is batch-normalised (no affine) with global-batch
  statistics and c = bn(z1)^T bn(z2) / global_batch. lambd 0.0051 is the code default (paper: 5e-3);
  scale_loss multiplies the whole loss (solo-learn's CIFAR recipe uses 0.1).
  """
  n = z1.shape[0] * parallel.axis_size(axis_name)
  z1n, z2n = _global_batch_norm(z1, axis_name), _global_batch_norm(z2, axis_name)
  c = parallel.psum(z1n.T @ z2n, axis_name) / n
  on_diag = jnp.sum(jnp.square(jnp.diagonal(c) - 1.0))
  return scale_loss * (on_diag + lambd * _off_diagonal_sq_sum(c))


def vicreg_loss(x: jax.Array, y: jax.Array, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, *, axis_name: str | None = None) -> jax.Array:
  """VICReg: sim * MSE(x, y) + std * variance hinge + cov * off-diagonal covariance, global batch.

  x, y: local (b, D) raw projections. Std (eps 1e-4) and covariance (unbiased, / (N - 1)) are
  computed on the gradient-carrying all-gather of the global batch, as in the reference.
  """
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  repr_loss = _global_mean(jnp.square(x - y), axis_name)

  def std_cov(z):
    n, d = z.shape
    z = z - z.mean(axis=0)
    std = jnp.sqrt(jnp.sum(z * z, axis=0) / (n - 1) + 1e-4)
    return jnp.mean(jax.nn.relu(1.0 - std)) / 2, _off_diagonal_sq_sum(z.T @ z / (n - 1)) / d

  std_x, cov_x = std_cov(parallel.all_gather(x, axis_name))
  std_y, cov_y = std_cov(parallel.all_gather(y, axis_name))
  # Every device computes the same gathered-statistics terms; pmean keeps one copy of their
  # gradient (the all-gather transposes to a sum over devices).
  gathered_terms = parallel.pmean(std_coeff * (std_x + std_y) + cov_coeff * (cov_x + cov_y),
                                  axis_name)
  return sim_coeff * repr_loss + gathered_terms


def unicl_loss(img: jax.Array, txt: jax.Array, labels: jax.Array, logit_scale: jax.Array, *,
               axis_name: str | None = None, chunk_size: int = 0) -> jax.Array:
  """UniCL: image-text-label contrastive loss; every global pair sharing a label is a positive.

  Args:
    img, txt: local (b, d) L2-normalised embeddings. labels: local (b,) ints; give each plain
      image-text pair its own unique label. logit_scale: as in `clip_loss`.
  Targets are uniform over each row's positives in the GLOBAL batch; the two directions are averaged,
  so with all labels distinct this is `clip_loss`. chunk_size N > 0 streams the logits and the
  targets N gathered columns at a time (as in `clip_loss`).
  """
  img_all, txt_all = parallel.all_gather(img, axis_name), parallel.all_gather(txt, axis_name)
  n = img.shape[0] * parallel.axis_size(axis_name)
  if chunk_size:
    labels_all = parallel.all_gather(labels, axis_name)

    def direction(rows, cols_all):
      # CE against uniform targets over the positives: lse - mean logit of the positives.
      lse, pos_sum, pos_count = _streamed_row_stats(rows, cols_all, logit_scale, chunk_size,
                                                    row_keys=labels, col_keys=labels_all)
      return lse - pos_sum / pos_count

    total = direction(img, txt_all).sum() + direction(txt, img_all).sum()
    return parallel.psum(total, axis_name) / (2 * n)
  positives = (labels[:, None] == parallel.all_gather(labels, axis_name)[None, :])
  targets = positives / positives.sum(axis=-1, keepdims=True)
  total = (_soft_cross_entropy(logit_scale * img @ txt_all.T, targets).sum()
           + _soft_cross_entropy(logit_scale * txt @ img_all.T, targets).sum())
  return parallel.psum(total, axis_name) / (2 * n)
