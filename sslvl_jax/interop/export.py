"""Our exported-encoder format: model.safetensors (every variable) + config.json (how to rebuild)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from sslvl_jax.interop.mapping import abstract_module, fill_module, flat_arrays, structure
from sslvl_jax.interop.torch_io import save_safetensors

FORMAT = "sslvl_jax.encoder"
FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.model"
TOWERS = ("image", "text", "image_text")
ROLES = ("teacher", "student", "imported")  # EMA teacher, online student, converted checkpoint


def _check_extra(extra: Mapping[str, Any]) -> None:
  if extra.get("tower") not in TOWERS:
    raise ValueError(f"extra['tower'] must be one of {TOWERS}, got {extra.get('tower')!r}")
  if extra.get("role") not in ROLES:
    raise ValueError(f"extra['role'] must say where the weights come from, one of {ROLES}; "
                     f"got {extra.get('role')!r}")
  if extra["tower"] != "text":
    prep = extra.get("preprocessing", {})
    if not {"image_size", "mean", "std"} <= set(prep):
      raise ValueError("an image encoder needs extra['preprocessing'] with image_size, mean and std "
                       f"(on the 0-1 scale); got {prep}")
  if extra["tower"] != "image" and "context_length" not in extra.get("tokenizer", {}):
    raise ValueError("a text encoder needs extra['tokenizer'] with at least context_length (and "
                     "model_path, lowercase, pad/bos/eot ids where they apply)")


def save_encoder(path_dir: str, module: nnx.Module, model_config: Mapping[str, Any],
                 extra: Mapping[str, Any]) -> str:
  """Write `module` to `path_dir`: model.safetensors, config.json and the tokenizer model if any.

  `model_config` is {'name': architecture or model-registry name, 'kwargs': JSON-able kwargs} and
  must rebuild `module`'s exact structure. `extra` needs 'tower' (image / text / image_text),
  'role' (teacher / student / imported), 'preprocessing' {image_size, mean, std, ...} for image
  towers and 'tokenizer' {context_length, ...} for text towers; all of it goes to config.json.
  A tokenizer['model_path'] that is a file is copied in as tokenizer.model. Returns `path_dir`.
  """
  extra = json.loads(json.dumps(dict(extra)))  # JSON-able, and our own copy
  model_config = json.loads(json.dumps(dict(model_config)))
  _check_extra(extra)
  want, rebuilt = structure(module), structure(abstract_module(model_config))
  if want != rebuilt:
    diff = sorted(k for k in set(want) | set(rebuilt) if want.get(k) != rebuilt.get(k))
    raise ValueError(f"model_config does not rebuild the module (variable type, shape or dtype "
                     f"differ): {[(k, want.get(k), rebuilt.get(k)) for k in diff[:4]]}")
  arrays = flat_arrays(module)
  os.makedirs(path_dir, exist_ok=True)
  tok_path = extra.get("tokenizer", {}).get("model_path")
  if tok_path and os.path.isfile(tok_path):
    shutil.copyfile(tok_path, os.path.join(path_dir, TOKENIZER_FILE))
    extra["tokenizer"]["model_path"] = TOKENIZER_FILE
  config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model_config, **extra}
  save_safetensors(arrays, os.path.join(path_dir, WEIGHTS_FILE), metadata={"format": FORMAT})
  with open(os.path.join(path_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
  return path_dir


def read_config(path_dir: str) -> dict[str, Any]:
  """config.json of an exported encoder, checked for format and version."""
  with open(os.path.join(path_dir, CONFIG_FILE)) as f:
    config = json.load(f)
  if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(f"{path_dir} is not a {FORMAT} v<={FORMAT_VERSION} export "
                     f"(format {config.get('format')!r} v{config.get('format_version')})")
  tok = config.get("tokenizer", {})
  if tok.get("model_path") == TOKENIZER_FILE:
    tok["model_path"] = os.path.join(path_dir, TOKENIZER_FILE)
  return config


def load_module(path_dir: str) -> nnx.Module:
  """The nnx.Module saved by `save_encoder`, variables bit-exact."""
  config = read_config(path_dir)
  arrays = safetensors.numpy.load_file(os.path.join(path_dir, WEIGHTS_FILE))
  return fill_module(abstract_module(config["model"]), arrays, what=f"{path_dir}/{WEIGHTS_FILE}")


def _image_features(module: nnx.Module, images: jax.Array, normalize: bool) -> jax.Array:
  if not hasattr(module, "encode_image"):
    return module(images)["pooled"]
  return module.encode_image(images) if normalize else module.image_proj(module.image(images)["pooled"])


def _text_features(module: nnx.Module, tokens: jax.Array, normalize: bool) -> jax.Array:
  if not hasattr(module, "encode_text"):
    return module(tokens)["pooled"]
  return module.encode_text(tokens) if normalize else module.text_proj(module.text(tokens)["pooled"])


def load_encoder(path_dir: str, *, tower: str | None = None, normalize: bool = True
                 ) -> Callable[[np.ndarray], jax.Array]:
  """A jitted embedding function of an exported encoder.

  Image towers take uint8 NHWC (b, s, s, 3) images at the exported image size (resize and crop as
  config.json's preprocessing says, e.g. `sslvl_jax.data.examples.resize_center_crop`; NCHW is
  refused) and apply its mean/std; text towers take (b, context_length) token ids from the
  exported tokenizer settings. Two-tower models return L2-normalised embeddings, or with
  `normalize=False` the projections before normalising (open_clip's `encode_image(x)` default);
  single encoders their pooled features. `tower` picks 'image' or 'text' of a two-tower export
  (default 'image').
  """
  config = read_config(path_dir)
  tower = tower or ("text" if config["tower"] == "text" else "image")
  if tower not in config["tower"].split("_"):
    raise ValueError(f"{path_dir} has no {tower} tower (it has {config['tower']!r})")
  graphdef, state = nnx.split(load_module(path_dir))
  features = _image_features if tower == "image" else _text_features
  embed = jax.jit(lambda s, x: features(nnx.merge(graphdef, s), x, normalize))
  if tower == "text":
    return lambda tokens: embed(state, jnp.asarray(tokens, jnp.int32))
  prep = config["preprocessing"]
  size = prep["image_size"]
  mean = np.asarray(prep["mean"], np.float32) * 255.0
  std = np.asarray(prep["std"], np.float32) * 255.0

  def embed_images(images: np.ndarray) -> jax.Array:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
      hint = " (NCHW? transpose with x.transpose(0, 2, 3, 1))" if images.shape[1:2] == (3,) else ""
      raise ValueError(f"expected uint8 NHWC images (b, {size}, {size}, 3), got {images.dtype} "
                       f"{images.shape}{hint}; for other inputs use load_module")
    return embed(state, (jnp.asarray(images, jnp.float32) - mean) / std)

  return embed_images
