"""CLI: import OpenAI CLIP / open_clip / DINO checkpoints, export back to PyTorch layouts.

  python -m sslvl_jax.interop clip ViT-B-32.pt export/clip_b32 --source openai --allow-jit
  python -m sslvl_jax.interop clip open_clip_model.safetensors export/clip_b16 --source open_clip
  python -m sslvl_jax.interop dino dino_deitsmall16_pretrain.pth export/dino_s16
  python -m sslvl_jax.interop to-torch export/dino_s16 dino_s16_timm.safetensors
"""

from __future__ import annotations

import argparse
from typing import Sequence

from sslvl_jax.interop.convert import convert_clip, convert_dino, export_to_torch
from sslvl_jax.interop.torch_io import load_torch_state_dict


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m sslvl_jax.interop", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  for name, what in (("clip", "OpenAI/open_clip ViT CLIP"), ("dino", "DINO/timm ViT")):
    s = sub.add_parser(name, help=f"import a {what} checkpoint as our encoder export")
    s.add_argument("checkpoint", help=".safetensors, .pt/.pth/.bin (needs torch)")
    s.add_argument("out_dir")
    s.add_argument("--key", help="checkpoint entry to read (e.g. 'student'; default: first of "
                   "state_dict/model/teacher/student present)")
    s.add_argument("--allow-jit", action="store_true",
                   help="load TorchScript archives (OpenAI's .pt): this RUNS code from the file")
    s.add_argument("--mean", type=float, nargs=3, help="image normalisation mean (0-1 scale)")
    s.add_argument("--std", type=float, nargs=3, help="image normalisation std (0-1 scale)")
  clip = sub.choices["clip"]
  clip.add_argument("--source", choices=("openai", "open_clip"), required=True,
                    help="where the weights come from, it sets the activation (not recorded in "
                    "the weights): openai -> quick_gelu, open_clip -> gelu")
  clip.add_argument("--act", choices=("quick_gelu", "gelu"),
                    help="override, e.g. quick_gelu for open_clip *-quickgelu models")
  clip.add_argument("--vision-heads", type=int, help="default width // 64 (ViT-H/g/bigG: 16)")
  clip.add_argument("--text-heads", type=int, help="default width // 64")
  sub.choices["dino"].add_argument("--num-heads", type=int, help="default width // 64")
  back = sub.add_parser("to-torch", help="write our export as an open_clip / timm .safetensors")
  back.add_argument("encoder_dir")
  back.add_argument("out_path")
  return p


def main(argv: Sequence[str] | None = None) -> None:
  """Run the CLI."""
  args = _parser().parse_args(argv)
  if args.command == "to-torch":
    sd = export_to_torch(args.encoder_dir, args.out_path)
    print(f"wrote {len(sd)} tensors to {args.out_path}")
    return
  sd = load_torch_state_dict(args.checkpoint, key=args.key, allow_jit=args.allow_jit)
  names = ("source", "act", "vision_heads", "text_heads", "num_heads", "mean", "std")
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in vars(args).items() if k in names and v is not None}
  convert = convert_clip if args.command == "clip" else convert_dino
  convert(sd, args.out_dir, **kwargs)
  print(f"wrote {args.out_dir}")


if __name__ == "__main__":
  main()
