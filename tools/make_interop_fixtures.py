"""Make tests/fixtures/interop: small random open_clip / timm models, their weights and outputs.

Run BY HAND where torch, open_clip_torch and timm are installed (tests never need them):

  PYTHONPATH=. python tools/make_interop_fixtures.py [--out tests/fixtures/interop]

Writes, per model, NAME.safetensors (the original library's state dict) and NAME.npz (inputs,
reference outputs, the head counts the weights cannot tell). Also checks, in the torch world,
what the tests cannot: our export loads strictly into open_clip / timm and reproduces their outputs,
and `load_torch_state_dict` reads torch.save pickles (DINO-style wrappers), bfloat16 and
TorchScript archives.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile

import jax
import numpy as np

# torchvision wheels built against CUDA torch fail to import next to a CPU torch ("operator
# torchvision::nms does not exist"); open_clip and timm only need its Python transforms.
import torch  # noqa: E402
try:
  import torchvision  # noqa: F401
except RuntimeError:
  import sys
  for _name in [n for n in sys.modules if n.startswith("torchvision")]:
    del sys.modules[_name]
  _lib = torch.library.Library("torchvision", "DEF")  # pylint: disable=invalid-name
  for _op in ("nms", "qnms"):
    _lib.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import open_clip  # noqa: E402
import timm  # noqa: E402
from torch import nn  # noqa: E402

from sslvl_jax import interop  # noqa: E402
from sslvl_jax.interop import clip as clip_interop  # noqa: E402
from sslvl_jax.interop import timm as timm_interop  # noqa: E402

# Two CLIPs: OpenAI-like (QuickGELU) and open_clip ViT-B-16-like (exact GELU), other shapes.
CLIPS = {
    "clip_quickgelu": dict(
        quick_gelu=True, embed_dim=32,
        vision=dict(width=64, layers=2, head_width=32, mlp_ratio=4.0, patch_size=8, image_size=32),
        text=dict(width=64, layers=2, heads=2, mlp_ratio=4.0, context_length=16, vocab_size=100)),
    "clip_gelu": dict(
        quick_gelu=False, embed_dim=24,
        vision=dict(width=48, layers=2, head_width=12, mlp_ratio=2.0, patch_size=8, image_size=24),
        text=dict(width=32, layers=2, heads=4, mlp_ratio=2.0, context_length=12, vocab_size=80)),
}
DINO = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
BATCH = 4


def perturb(model: nn.Module, gen: torch.Generator, skip: tuple[str, ...] = ()) -> None:
  """Add noise to every parameter so zero biases and unit norms cannot hide a mapping error."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name not in skip:
        p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def uint8_images(rng: np.random.Generator, size: int) -> np.ndarray:
  """Smooth-ish random uint8 NHWC images."""
  return rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)


def to_torch_input(images: np.ndarray, mean, std) -> torch.Tensor:
  """uint8 NHWC -> normalised float NCHW, as torchvision's ToTensor + Normalize."""
  x = images.astype(np.float32) / 255.0
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def clip_tokens(rng: np.random.Generator, context: int, vocab: int) -> np.ndarray:
  """OpenAI-BPE-like ids: SOT = vocab-2, EOT = vocab-1 (the largest), pad 0, various lengths."""
  out = np.zeros((BATCH, context), np.int64)
  for i, n in enumerate([context, 2, 5, context - 3]):  # full length, empty text, short, long
    out[i, :n] = rng.integers(1, vocab - 2, n)
    out[i, 0], out[i, n - 1] = vocab - 2, vocab - 1
  return out


def as_numpy(sd: dict) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


def make_clip(name: str, spec: dict, out: str, gen: torch.Generator, rng: np.random.Generator) -> None:
  """One open_clip CLIP: weights, inputs, reference embeddings; checks our export loads back."""
  model = open_clip.CLIP(embed_dim=spec["embed_dim"], vision_cfg=spec["vision"],
                         text_cfg=spec["text"], quick_gelu=spec["quick_gelu"]).eval()
  perturb(model, gen, skip=("logit_scale",))
  images = uint8_images(rng, spec["vision"]["image_size"])
  tokens = clip_tokens(rng, spec["text"]["context_length"], spec["text"]["vocab_size"])
  x = to_torch_input(images, clip_interop.MEAN, clip_interop.STD)
  with torch.no_grad():
    img, txt = model.encode_image(x), model.encode_text(torch.from_numpy(tokens))
  sd = as_numpy(model.state_dict())
  interop.save_safetensors(sd, os.path.join(out, f"{name}.safetensors"))
  heads = dict(vision_heads=spec["vision"]["width"] // spec["vision"]["head_width"],
               text_heads=spec["text"]["heads"])
  act = "quick_gelu" if spec["quick_gelu"] else "gelu"
  np.savez(os.path.join(out, f"{name}.npz"), images=images, tokens=tokens.astype(np.int32),
           image_features=img.numpy(), text_features=txt.numpy(), act=act, **heads)

  ours = interop.clip_from_torch(sd, source="open_clip", act=act, **heads)
  np.testing.assert_allclose(np.asarray(ours.encode_image(images_for_jax(x))),
                             torch.nn.functional.normalize(img, dim=-1).numpy(), atol=1e-5)
  back = open_clip.CLIP(embed_dim=spec["embed_dim"], vision_cfg=spec["vision"],
                        text_cfg=spec["text"], quick_gelu=spec["quick_gelu"]).eval()
  back.load_state_dict(exported_tensors(interop.clip_to_torch(ours), sd), strict=True)
  with torch.no_grad():
    torch.testing.assert_close(back.encode_image(x), img, rtol=0, atol=0)
    torch.testing.assert_close(back.encode_text(torch.from_numpy(tokens)), txt, rtol=0, atol=0)
  check_torch_loading(model, sd, x, tokens, heads)


def exported_tensors(exported: dict, sd: dict) -> dict[str, torch.Tensor]:
  """Our export as tensors, after checking names, shapes and dtypes equal the original's
  (load_state_dict alone would accept a (1,) tensor for a () one)."""
  assert sorted(exported) == sorted(sd), set(exported) ^ set(sd)
  for k, v in exported.items():
    assert (v.shape, v.dtype) == (sd[k].shape, sd[k].dtype), (k, v.shape, sd[k].shape)
  return {k: torch.tensor(v) for k, v in exported.items()}


def images_for_jax(x: torch.Tensor) -> np.ndarray:
  return x.numpy().transpose(0, 2, 3, 1)


def check_torch_loading(model: nn.Module, sd: dict, x: torch.Tensor, tokens: np.ndarray,
                        heads: dict) -> None:
  """load_torch_state_dict on a TorchScript archive (OpenAI's format), with and without allow_jit."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "traced.pt")
    with torch.no_grad():
      torch.jit.save(torch.jit.trace(model, (x, torch.from_numpy(tokens))), path)
    try:
      interop.load_torch_state_dict(path)
      raise AssertionError("TorchScript archive loaded without allow_jit")
    except ValueError as e:
      assert "allow_jit" in str(e), e
    jit_sd = interop.load_torch_state_dict(path, allow_jit=True)
    extra = set(jit_sd) - set(sd)
    assert set(sd) <= set(jit_sd) and extra <= set(clip_interop.IGNORED_KEYS), extra
    for k, v in sd.items():
      np.testing.assert_array_equal(jit_sd[k], v)
    interop.clip_from_torch(jit_sd, source="openai", **heads)  # the traced buffers are ignored


def attention_hook(store: dict):
  """Forward pre-hook on timm Attention: softmax(q k^T * scale) of its input, per head."""
  def hook(attn: nn.Module, args: tuple) -> None:
    (x,) = args[:1]
    b, t, d = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    store["attn"] = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
  return hook


def make_dino(out: str, gen: torch.Generator, rng: np.random.Generator) -> None:
  """A timm ViT in DINO's layout saved as DINO's teacher (backbone. prefix + a head tensor)."""
  model = timm.models.vision_transformer.VisionTransformer(
      **DINO, qkv_bias=True, num_classes=0,
      norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)).eval()
  perturb(model, gen)
  images = uint8_images(rng, DINO["img_size"])
  x = to_torch_input(images, timm_interop.IMAGENET_MEAN, timm_interop.IMAGENET_STD)
  store: dict = {}
  model.blocks[-1].attn.register_forward_pre_hook(attention_hook(store))
  with torch.no_grad():
    cls = model.forward_features(x)[:, 0]
  sd = as_numpy(model.state_dict())
  wrapped = {f"backbone.{k}": v for k, v in sd.items()}
  wrapped["head.last_layer.weight_g"] = np.ones((1, 8), np.float32)  # DINO head: ignored on import
  interop.save_safetensors(wrapped, os.path.join(out, "dino_vit.safetensors"))
  np.savez(os.path.join(out, "dino_vit.npz"), images=images, cls=cls.numpy(),
           last_attention=store["attn"].numpy(), num_heads=DINO["num_heads"])

  ours = interop.dino_vit_from_torch(sd, num_heads=DINO["num_heads"])
  np.testing.assert_allclose(np.asarray(ours(images_for_jax(x))["pooled"]), cls.numpy(), atol=1e-5)
  back = timm.models.vision_transformer.VisionTransformer(
      **DINO, qkv_bias=True, num_classes=0, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
  back.load_state_dict(exported_tensors(interop.vit_to_timm(ours), sd), strict=True)
  with torch.no_grad():
    torch.testing.assert_close(back.eval().forward_features(x)[:, 0], cls, rtol=0, atol=0)
  check_pickle_loading(sd)


def check_pickle_loading(sd: dict) -> None:
  """A DINO-style full checkpoint (teacher/student, DDP prefixes, argparse args) and bfloat16."""
  import argparse as ap  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  ckpt = {"student": {f"module.backbone.{k}": v + 1 for k, v in tensors.items()},
          "teacher": {f"backbone.{k}": v for k, v in tensors.items()},
          "epoch": 3, "args": ap.Namespace(arch="vit_small", patch_size=16)}
  ckpt["teacher"]["head.last_layer.weight_g"] = torch.ones(1, 8)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "checkpoint.pth")
    torch.save(ckpt, path)
    teacher = interop.load_torch_state_dict(path)
    student = interop.load_torch_state_dict(path, key="student")
    for k, v in sd.items():
      np.testing.assert_array_equal(teacher[k], v)
      np.testing.assert_array_equal(student[k], v + 1)
    bf16 = torch.randn(5, 3).to(torch.bfloat16)
    torch.save({"state_dict": {"module.w": bf16}}, path)
    got = interop.load_torch_state_dict(path)["w"]
    assert str(got.dtype) == "bfloat16"
    np.testing.assert_array_equal(got.astype(np.float32), bf16.float().numpy())


# Real architectures (random weights: nothing is downloaded): open_clip names -> our `source`.
FULL_CLIPS = {"ViT-B-32-quickgelu": "openai", "ViT-B-16": "open_clip", "ViT-L-14": "open_clip"}
FULL_DINOS = {"vit_small_patch16_224": 6, "vit_base_patch16_224": 12}  # DINO ViT-S/16, ViT-B/16


def check_full_size() -> None:
  """Import the real-size architectures with default settings and compare embeddings (not saved)."""
  rng = np.random.default_rng(1)
  for name, source in FULL_CLIPS.items():
    model = open_clip.create_model(name, pretrained=None).eval()
    size = model.visual.image_size[0]
    x = to_torch_input(uint8_images(rng, size)[:2], clip_interop.MEAN, clip_interop.STD)
    tokens = clip_tokens(rng, 77, 49408)[:2]
    with torch.no_grad():
      img = model.encode_image(x, normalize=True).numpy()
      txt = model.encode_text(torch.from_numpy(tokens), normalize=True).numpy()
    ours = interop.clip_from_torch(as_numpy(model.state_dict()), source=source)
    got_img = jax.jit(lambda m, v: m.encode_image(v))(ours, images_for_jax(x))
    got_txt = jax.jit(lambda m, t: m.encode_text(t))(ours, tokens.astype(np.int32))
    errs = [float(np.abs(g - w).max() / np.abs(w).max()) for g, w in ((got_img, img), (got_txt, txt))]
    print(f"{name:24s} relative error image {errs[0]:.1e} text {errs[1]:.1e}")
    assert max(errs) < 1e-4, errs
  for name, heads in FULL_DINOS.items():
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    x = to_torch_input(uint8_images(rng, 224)[:2], timm_interop.IMAGENET_MEAN, timm_interop.IMAGENET_STD)
    with torch.no_grad():
      cls = model.forward_features(x)[:, 0].numpy()
    ours = interop.dino_vit_from_torch(as_numpy(model.state_dict()))
    assert ours.blocks[0].attn.num_heads == heads
    got = jax.jit(lambda m, v: m(v)["pooled"])(ours, images_for_jax(x))
    err = float(np.abs(got - cls).max() / np.abs(cls).max())
    print(f"{name:24s} relative error cls {err:.1e}")
    assert err < 1e-4, err


def main() -> None:
  """Write the fixtures and print their sizes."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="tests/fixtures/interop")
  parser.add_argument("--check-full-size", action="store_true",
                      help="also import random-weight ViT-B/32, B/16, L/14 CLIPs and DINO ViT-S/16, "
                      "B/16 with default settings and compare embeddings (slow, nothing saved)")
  args = parser.parse_args()
  out = args.out
  os.makedirs(out, exist_ok=True)
  torch.manual_seed(0)
  gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
  for name, spec in CLIPS.items():
    make_clip(name, spec, out, gen, rng)
  make_dino(out, gen, rng)
  total = 0
  for f in sorted(os.listdir(out)):
    size = os.path.getsize(os.path.join(out, f))
    total += size
    print(f"{f:32s} {size / 1024:8.1f} KiB")
  print(f"{'total':32s} {total / 1024:8.1f} KiB  (torch {torch.__version__}, open_clip "
        f"{open_clip.__version__}, timm {timm.__version__})")
  if args.check_full_size:
    check_full_size()


if __name__ == "__main__":
  main()
