"""Read PyTorch checkpoints (safetensors, torch.save pickles, TorchScript) as numpy state dicts."""

from __future__ import annotations

import argparse
import contextlib
import os
import zipfile
from typing import Any, Mapping

import numpy as np
import safetensors.numpy

# Where trainers nest the weights, tried in this order (DINO's full checkpoints: teacher first,
# the network the paper evaluates).
WRAPPER_KEYS = ("state_dict", "model", "teacher", "student")
# Prefixes that wrappers add to every key: DDP's 'module.', DINO's MultiCropWrapper 'backbone.'.
STRIP_PREFIXES = ("module.", "backbone.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

_NO_TORCH = ("reading {path} needs PyTorch: `pip install torch` (the CPU wheel is enough), or "
             "convert the file to .safetensors where torch is installed "
             "(safetensors.torch.save_file(state_dict, 'model.safetensors')) and load that instead")


def unwrap_state_dict(obj: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
  """The flat name -> tensor dict inside a checkpoint, wrapper keys unwrapped and prefixes stripped.

  `key` picks the wrapper entry (e.g. 'student' in a DINO checkpoint); by default the first of
  WRAPPER_KEYS present. Prefixes in STRIP_PREFIXES are removed, repeatedly ('module.backbone.x' -> 'x').
  """
  if key is not None:
    if key not in obj:
      raise KeyError(f"checkpoint has no entry {key!r}; it has {sorted(obj)}")
    obj = obj[key]
  else:
    while isinstance(obj, Mapping) and (k := next((k for k in WRAPPER_KEYS if k in obj), None)):
      obj = obj[k]
  out = {}
  for name, value in obj.items():
    while name.startswith(STRIP_PREFIXES):
      name = name.split(".", 1)[1]
    if name in out:
      raise ValueError(f"two tensors map to {name!r} after stripping {STRIP_PREFIXES}")
    out[name] = value
  return out


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _to_numpy(t: Any) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits, exactly
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _torch_load(path: str, allow_jit: bool) -> Mapping[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(_NO_TORCH.format(path=path)) from None
  if _is_torchscript(path):
    if not allow_jit:
      raise ValueError(f"{path} is a TorchScript archive (OpenAI's CLIP release format); loading it "
                       "runs code stored in the file. Pass allow_jit=True (CLI: --allow-jit) if you "
                       "trust the file, or convert it to .safetensors first.")
    return torch.jit.load(path, map_location="cpu").state_dict()
  safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
  with safe([argparse.Namespace]) if safe else contextlib.nullcontext():  # DINO stores its args
    return torch.load(path, map_location="cpu", weights_only=True)


def load_torch_state_dict(path: str, *, key: str | None = None,
                          allow_jit: bool = False) -> dict[str, np.ndarray]:
  """Load a PyTorch checkpoint as {name: numpy array}, wrappers unwrapped, prefixes stripped.

  .safetensors is read with numpy only. .pt/.pth/.bin/.ckpt need torch and are read with
  `torch.load(weights_only=True)` (tensors and plain containers only, no code). TorchScript
  archives (OpenAI's CLIP `.pt` files) are loaded with `torch.jit.load`, which EXECUTES code from
  the file, only when `allow_jit=True`. bfloat16 tensors stay bfloat16 (ml_dtypes); non-tensor
  entries (epochs, args) are dropped. See `unwrap_state_dict` for `key`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if path.endswith(".safetensors"):
    return unwrap_state_dict(safetensors.numpy.load_file(path), key)
  if not path.endswith(TORCH_SUFFIXES):
    raise ValueError(f"unknown checkpoint type {path!r}; expected .safetensors or one of "
                     f"{TORCH_SUFFIXES}")
  sd = unwrap_state_dict(_torch_load(path, allow_jit), key)
  return {k: _to_numpy(v) for k, v in sd.items() if hasattr(v, "detach")}


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str,
                     metadata: dict[str, str] | None = None) -> None:
  """Write {name: array} to `path` as safetensors (loadable by safetensors.torch / open_clip / timm)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  safetensors.numpy.save_file({k: np.asarray(v, order="C") for k, v in state_dict.items()}, path,
                              metadata=metadata)
