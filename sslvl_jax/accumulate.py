"""Gradients over micro-batches (`config.microbatches = k`): gradient caching or accumulation.

Each device's share of the global batch is cut into k micro-batches, so micro-batch j holds rows
[j*m, (j+1)*m) of every device's share and is itself spread over all devices.

Methods with an embedding loss (`Method.embeddings` + `Method.embedding_loss`: the contrastive
ones) get gradient caching (Gao et al., 2021): (1) embed every micro-batch without keeping
activations, (2) the loss and its gradients w.r.t. the embeddings and the parameters it reads
directly (temperature, bias) on the WHOLE global batch, (3) per micro-batch, recompute the forward
pass and pull the embedding gradient back to the parameters; the gradients are summed. The result
is the full-batch gradient, negatives and temperature included; only the activations of one
micro-batch are alive at a time.

Other methods get plain accumulation: the mean over micro-batches of each micro-batch's loss and
gradient, equal to the full-batch gradient when the loss is a batch mean (BYOL, SimSiam, DINO).

State rule for both: every micro-batch starts from the step's model and method state, and the new
state is the mean over micro-batches of what each produced (float leaves, computed as the start
plus the mean change, so a leaf that no micro-batch changes, like MoCo's teacher after its
once-per-step `before_step` EMA, stays bitwise as it was; other leaves are taken from the last
micro-batch). So BatchNorm normalises with micro-batch statistics and its running
averages move by the mean of the micro-batch statistics; DINO's centre moves by the mean teacher
output of the whole batch, exactly as with one batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sslvl_jax import parallel
from sslvl_jax.errors import ConfigError
from sslvl_jax.methods.base import Method, TrainState

GradFn = Callable[..., tuple[tuple[jax.Array, tuple[dict, Any, Any]], Any]]


def check_microbatches(global_batch_size: int, num_shards: int, k: int) -> None:
  """ConfigError unless k >= 1 divides every device's share of the batch."""
  share = global_batch_size // num_shards
  if k < 1 or share % k:
    raise ConfigError(f"microbatches={k} does not divide the {share} examples per device "
                      f"(global_batch_size={global_batch_size} over {num_shards} devices); "
                      "set --config.microbatches to a divisor of it")


def split(x: jax.Array, k: int, num_shards: int) -> jax.Array:
  """(B, ...) -> (k, B/k, ...): micro-batch j takes rows [j*m, (j+1)*m) of each device's share."""
  m = x.shape[0] // (num_shards * k)
  x = x.reshape(num_shards, k, m, *x.shape[1:]).swapaxes(0, 1)
  return x.reshape(k, num_shards * m, *x.shape[3:])


def merge(x: jax.Array, num_shards: int) -> jax.Array:
  """Inverse of `split`: (k, B/k, ...) -> (B, ...) in the original row order."""
  k, m = x.shape[0], x.shape[1] // num_shards
  x = x.reshape(k, num_shards, m, *x.shape[2:]).swapaxes(0, 1)
  return x.reshape(num_shards * k * m, *x.shape[3:])


def mean_state(stacked: Any, start: Any) -> Any:
  """The state rule: `start` moved by the mean over the leading micro-batch axis of each float
  leaf's change (a leaf no micro-batch changed stays bitwise `start`), else the last."""
  def rule(x, x0):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x[-1]
    return (x0 + (x - x0).mean(0)).astype(x.dtype)
  return jax.tree.map(rule, stacked, start)


def value_and_grad(method: Method, k: int, mesh: Mesh) -> GradFn:
  """fn(params, state, batch, rng, monitor) -> ((loss, (metrics, model_state, extras)), grads)."""
  full = jax.value_and_grad(method.forward_loss, has_aux=True)
  if k == 1:
    return full
  n = mesh.devices.size
  micro_rows = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
  rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
  to_micro = lambda t: jax.tree.map(  # noqa: E731
      lambda x: jax.lax.with_sharding_constraint(split(x, k, n), micro_rows), t)
  to_full = lambda t: jax.tree.map(  # noqa: E731
      lambda x: jax.lax.with_sharding_constraint(merge(x, n), rows), t)
  index = jnp.arange(k)

  def like_params(tree: Any) -> Any:
    """Keep gradient sums on the parameters' shards (FSDP), not replicated."""
    shardings = getattr(method, "state_sharding", None)
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings.params)

  def accumulate(params: Any, state: TrainState, batch: dict, rng: jax.Array,
                 monitor: jax.Array | bool = True):
    def body(total, xs):
      i, mb = xs
      (loss, aux), g = full(params, state, mb, jax.random.fold_in(rng, i), monitor)
      return like_params(jax.tree.map(jnp.add, total, g)), (loss, aux)

    zeros = like_params(jax.tree.map(jnp.zeros_like, params))
    grads, (losses, (m, model_state, extras)) = jax.lax.scan(body, zeros, (index, to_micro(batch)))
    grads = jax.tree.map(lambda g: g / k, grads)
    m = jax.tree.map(lambda x: x.mean(0), m)
    return (losses.mean(), (m, mean_state(model_state, state.model_state),
                            mean_state(extras, state.extras))), grads

  def cache(params: Any, state: TrainState, batch: dict, rng: jax.Array,
            monitor: jax.Array | bool = True):
    def embed(p, mb, i):
      return method.forward_embeddings(p, state, mb, jax.random.fold_in(rng, i))

    micro = to_micro(batch)
    emb, (model_state, extras) = jax.lax.map(  # (1) no activations kept: nothing is differentiated
        lambda xs: jax.lax.stop_gradient(embed(params, xs[1], xs[0])), (index, micro))
    model_state = mean_state(model_state, state.model_state)
    extras = mean_state(extras, state.extras)
    after = state.replace(extras=extras)
    loss_grad = jax.value_and_grad(method.forward_embedding_loss, argnums=(0, 1), has_aux=True)
    (loss, (m, extras)), (grads, emb_grad) = loss_grad(params, to_full(emb), after, batch, rng,
                                                       monitor)  # (2) the whole batch

    def body(total, xs):  # (3) one micro-batch's activations at a time
      i, mb, g_emb = xs
      _, pull, _ = jax.vjp(lambda p: embed(p, mb, i), params, has_aux=True)
      return like_params(jax.tree.map(jnp.add, total, pull(g_emb)[0])), None

    grads, _ = jax.lax.scan(body, like_params(grads), (index, micro, to_micro(emb_grad)))
    return (loss, (m, model_state, extras)), grads

  return cache if method.has_embedding_loss() else accumulate
