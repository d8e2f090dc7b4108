"""Rebuild our modules from configs and move weights between them and PyTorch state dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sslvl_jax import models
from sslvl_jax.registry import Registry

Array = np.ndarray

# How a tensor changes between the PyTorch layout and ours: (to_ours, to_theirs), exact inverses.
TRANSFORMS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "same": (lambda x: x, lambda x: x),
    "linear": (lambda w: w.T, lambda k: k.T),  # torch (out, in) <-> ours (in, out)
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "token": (lambda x: x[None, None], lambda x: x[0, 0]),  # (d,) <-> (1, 1, d)
    "pos": (lambda x: x[None], lambda x: x[0]),  # (t, d) <-> (1, t, d)
    "gain": (lambda g: g[:, 0], lambda g: g[:, None]),  # torch weight_norm g (out, 1) <-> (out,)
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One tensor: its '/'-joined path in our module, its state-dict key, the layout change."""

  ours: str
  theirs: str
  transform: str = "same"


def linear(ours: str, theirs: str, *, bias: bool = True) -> list[Rule]:
  """Rules for an nnx.Linear <-> torch nn.Linear (weight transposed)."""
  rules = [Rule(f"{ours}/kernel", f"{theirs}.weight", "linear")]
  return rules + ([Rule(f"{ours}/bias", f"{theirs}.bias")] if bias else [])


def layer_norm(ours: str, theirs: str) -> list[Rule]:
  """Rules for an nnx.LayerNorm <-> torch nn.LayerNorm."""
  return [Rule(f"{ours}/scale", f"{theirs}.weight"), Rule(f"{ours}/bias", f"{theirs}.bias")]


def count_blocks(state_dict: Mapping[str, Any], prefix: str) -> int:
  """Number of transformer blocks `prefix`0., `prefix`1., ... in a state dict."""
  ids = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
  if not ids or ids != set(range(len(ids))):
    raise KeyError(f"no contiguous blocks {prefix}N. in the state dict")
  return len(ids)


def with_overrides(cfg: dict[str, Any], overrides: Mapping[str, Any], kind: str) -> dict[str, Any]:
  """An inferred `kind` config updated with `overrides` (an unknown key is a ValueError), its
  numpy integers made Python ints (JSON-able)."""
  unknown = sorted(set(overrides) - set(cfg))
  if unknown:
    raise ValueError(f"unknown {kind} config keys {unknown}; known: {sorted(cfg)}")
  cfg = {**cfg, **overrides}
  return {k: int(v) if isinstance(v, np.integer) else v for k, v in cfg.items()}


# Architectures an exported config can name besides the model registry's sizes.
ARCHITECTURES: Registry = Registry("architecture")
ARCHITECTURES.add("vit", models.ViT)
ARCHITECTURES.add("text_transformer", models.TextTransformer)
ARCHITECTURES.add("dino_head", models.DINOHead)


@ARCHITECTURES.register("two_tower")
def two_tower(*, image: dict, text: dict, embed_dim: int, logit_scale_init: float,
              logit_bias_init: float | None = None, rngs: nnx.Rngs) -> models.TwoTower:
  """A TwoTower from the configs of its two encoders."""
  img, txt = build_module(image, rngs), build_module(text, rngs)
  return models.TwoTower(img, txt, image_width=models.width_of(img), text_width=models.width_of(txt),
                         embed_dim=embed_dim, logit_scale_init=logit_scale_init,
                         logit_bias_init=logit_bias_init, rngs=rngs)


def build_module(config: Mapping[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  """Build {'name': architecture or model-registry name, 'kwargs': {...}}; dtypes given as strings."""
  kwargs = dict(config.get("kwargs", {}))
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = models.dtype_of(kwargs[key])
  name = config["name"]
  if name in ARCHITECTURES:
    return ARCHITECTURES.get(name)(rngs=rngs, **kwargs)
  return models.build(name, rngs=rngs, **kwargs)


def abstract_module(config: Mapping[str, Any]) -> nnx.Module:
  """The module `config` describes, with shapes only (no initialisation, no memory)."""
  return nnx.eval_shape(lambda: build_module(config, nnx.Rngs(0)))


def _key(path: Iterable[Any]) -> str:
  return "/".join(str(p) for p in path)


def flat_arrays(module: nnx.Module) -> dict[str, Array]:
  """Every nnx.Variable of `module` as a numpy array, keyed by its '/'-joined path."""
  return {_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module))}


def structure(module: nnx.Module) -> dict[str, tuple[str, tuple[int, ...], str]]:
  """Every variable's (type, shape, dtype) by '/'-joined path; works on abstract modules too."""
  return {_key(p): (type(v).__name__, tuple(v.get_value().shape), str(v.get_value().dtype))
          for p, v in nnx.to_flat_state(nnx.state(module))}


def fill_module(abstract: nnx.Module, arrays: Mapping[str, Any], *, what: str) -> nnx.Module:
  """A concrete copy of `abstract` whose variables are `arrays` (same keys and shapes, cast to dtype)."""
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  ours = {_key(p) for p, _ in flat}
  missing, unexpected = sorted(ours - set(arrays)), sorted(set(arrays) - ours)
  if missing or unexpected:
    raise ValueError(f"{what} does not match the model: missing {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''}")
  filled = []
  for path, var in flat:
    target, value = var.get_value(), np.asarray(arrays[_key(path)])
    if value.shape != target.shape:
      raise ValueError(f"{what}: {_key(path)} has shape {value.shape}, the model expects "
                       f"{target.shape}; check the config (heads, sizes) matches the weights")
    filled.append((path, var.replace(jnp.asarray(value, target.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def import_weights(abstract: nnx.Module, state_dict: Mapping[str, Array], rules: list[Rule], *,
                   ignore: tuple[str, ...] = (), layout: str) -> nnx.Module:
  """Copy a PyTorch state dict into `abstract` following `rules`; keys starting with `ignore` skipped."""
  absent = [r.theirs for r in rules if r.theirs not in state_dict]
  if absent:
    raise KeyError(f"not a {layout} state dict: missing {absent[:8]}{' ...' if len(absent) > 8 else ''}")
  used = {r.theirs for r in rules}
  extra = sorted(k for k in state_dict if k not in used and not k.startswith(ignore))
  if extra:
    raise ValueError(f"{layout} import: the state dict has tensors this model has no place for "
                     f"(an unsupported variant?): {extra[:8]}{' ...' if len(extra) > 8 else ''}")
  arrays = {r.ours: TRANSFORMS[r.transform][0](np.asarray(state_dict[r.theirs])) for r in rules}
  return fill_module(abstract, arrays, what=f"{layout} import")


def export_weights(module: nnx.Module, rules: list[Rule], *, layout: str) -> dict[str, Array]:
  """Our module's variables renamed and re-laid out as a PyTorch state dict following `rules`."""
  arrays = flat_arrays(module)
  by_ours = {r.ours for r in rules}
  unplaced, lacking = sorted(set(arrays) - by_ours), sorted(by_ours - set(arrays))
  if unplaced or lacking:
    raise ValueError(f"cannot export to the {layout} layout: no place there for {unplaced[:8]}, "
                     f"and the model lacks {lacking[:8]}")
  return {r.theirs: np.asarray(TRANSFORMS[r.transform][1](arrays[r.ours]), order="C") for r in rules}
