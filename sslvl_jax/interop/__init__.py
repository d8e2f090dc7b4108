"""PyTorch interop: import OpenAI CLIP / open_clip / DINO checkpoints, export back, our export format.

    sd = load_torch_state_dict("ViT-B-32.pt", allow_jit=True)    # OpenAI's TorchScript release
    clip = clip_from_torch(sd, source="openai")                  # -> models.TwoTower
    save_safetensors(clip_to_torch(clip), "open_clip_model.safetensors")
    sd = load_torch_state_dict("dino_deitsmall16_pretrain.pth")
    vit = convert_dino(sd, "export/dino_s16")                    # -> models.ViT, and saved
    embed = load_encoder("export/dino_s16")                      # uint8 NHWC images -> features
    head = dino_head_from_torch(load_torch_state_dict("dino_deitsmall16_full_checkpoint.pth"))

Imported DINO ViTs interpolate position embeddings as DINO does (pos_interp='dino'), so other
resolutions (96 px local crops) match DINO's outputs. CLIP imports need `source` ('openai':
QuickGELU, 'open_clip': GELU); `encode_image` is L2-normalised (`load_encoder(normalize=False)`:
open_clip's unnormalised `encode_image`).

CLI: `python -m sslvl_jax.interop --help`.
"""

from sslvl_jax.interop.clip import (clip_from_torch, clip_model_config, clip_rules, clip_to_torch,
                                    infer_clip_config)
from sslvl_jax.interop.convert import (convert_clip, convert_dino, export_to_torch, load_dino_head,
                                       to_torch)
from sslvl_jax.interop.export import load_encoder, load_module, read_config, save_encoder
from sslvl_jax.interop.mapping import ARCHITECTURES, Rule, build_module, flat_arrays
from sslvl_jax.interop.timm import (dino_head_from_torch, dino_head_rules, dino_vit_from_torch,
                                    infer_dino_head_config, infer_vit_config, timm_rules,
                                    vit_model_config, vit_to_timm)
from sslvl_jax.interop.torch_io import load_torch_state_dict, save_safetensors, unwrap_state_dict

__all__ = [
    "ARCHITECTURES", "Rule", "build_module", "clip_from_torch", "clip_model_config", "clip_rules",
    "clip_to_torch", "convert_clip", "convert_dino", "dino_head_from_torch", "dino_head_rules",
    "dino_vit_from_torch", "export_to_torch", "flat_arrays", "infer_clip_config",
    "infer_dino_head_config", "infer_vit_config", "load_dino_head", "load_encoder", "load_module",
    "load_torch_state_dict", "read_config", "save_encoder", "save_safetensors", "timm_rules",
    "to_torch", "unwrap_state_dict", "vit_model_config", "vit_to_timm",
]
