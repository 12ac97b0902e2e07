"""Names of the official (ldm / transformers 4.24) state dict for each of our parameters.

Each function takes the diffusers/transformers parameter name and returns the official key
(without the module prefix such as `model.diffusion_model.`). Mapping in this direction lets the
loader enumerate exactly what our module needs, so a missing key is named and nothing is guessed.
"""
from __future__ import annotations

import re

from .config import UNetSpec

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class KeyMapError(KeyError):
    pass


def _resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    if head not in table:
        raise KeyMapError(rest)
    return f"{table[head]}.{tail}"


def unet_key(name: str, spec: UNetSpec) -> str:
    """Official `UNetModel` / `ControlNet` / `CapFace` key of a diffusers UNet or ControlNet parameter."""
    per_level = spec.num_res_blocks + 1
    m = re.match(r"time_embedding\.linear_([12])\.(.*)", name)
    if m:
        return f"time_embed.{0 if m[1] == '1' else 2}.{m[2]}"
    if name.startswith("conv_in."):
        return "input_blocks.0.0." + name[len("conv_in."):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", name)
    if m:
        level, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{1 + level * per_level + spec.num_res_blocks}.0.op.{rest.removeprefix('conv.')}"
        n = 1 + level * per_level + i
        return f"input_blocks.{n}.0.{_resnet(rest, _RESNET)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        kind, i, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if i == 0 else 2}.{_resnet(rest, _RESNET)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", name)
    if m:
        rev, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        level = len(spec.channel_mult) - 1 - rev
        if kind == "upsamplers":
            slot = 2 if spec.level_has_attention(level) else 1
            return f"output_blocks.{rev * per_level + spec.num_res_blocks}.{slot}.{rest}"
        n = rev * per_level + i
        return f"output_blocks.{n}.0.{_resnet(rest, _RESNET)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    if name.startswith("conv_norm_out."):
        return "out.0." + name[len("conv_norm_out."):]
    if name.startswith("conv_out."):
        return "out.2." + name[len("conv_out."):]
    # ControlNet-only parts
    m = re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.*)", name)
    if m:
        n_blocks = 2 * len(_HINT_BLOCKS)
        idx = 0 if m[1] == "conv_in" else (2 * (n_blocks + 1) if m[1] == "conv_out" else 2 * (int(m[2]) + 1))
        return f"input_hint_block.{idx}.{m[3]}"
    m = re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", name)
    if m:
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if name.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + name[len("controlnet_mid_block."):]
    raise KeyMapError(name)


_HINT_BLOCKS = (16, 32, 96)  # pairs of convs between conv_in and conv_out in the hint embedding


def side_network_key(name: str, spec: UNetSpec) -> str:
    """Official key of a `SideNetwork` parameter (`net.*` is the ControlNet, `mask_predict.*` CapFace's head)."""
    if name.startswith("mask_predict."):
        return "mask_predict.0." + name[len("mask_predict."):]
    if not name.startswith("net."):
        raise KeyMapError(name)
    return unet_key(name[len("net."):], spec)


def vae_key(name: str, num_levels: int) -> str:
    """Official `AutoencoderKL` key of a diffusers AutoencoderKL parameter."""
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name
    m = re.match(r"(encoder|decoder)\.(.*)", name)
    if not m:
        raise KeyMapError(name)
    part, rest = m[1], m[2]
    if rest.startswith(("conv_in.", "conv_out.")):
        return name
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
    mm = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest)
    if mm:
        return f"{part}.mid.block_{int(mm[1]) + 1}.{_resnet(mm[2], _VAE_RESNET)}"
    mm = re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", rest)
    if mm:
        return f"{part}.mid.attn_1.{_VAE_ATTN[mm[1]]}.{mm[2]}"
    mm = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
    if mm:
        level = int(mm[2]) if mm[1] == "down" else num_levels - 1 - int(mm[2])
        if mm[3] == "resnets":
            return f"{part}.{mm[1]}.{level}.block.{mm[4]}.{_resnet(mm[5], _VAE_RESNET)}"
        sampler = "downsample" if mm[3] == "downsamplers" else "upsample"
        return f"{part}.{mm[1]}.{level}.{sampler}.{mm[5]}"
    raise KeyMapError(name)


def vae_needs_conv_shape(official_key: str) -> bool:
    """ldm's VAE attention uses 1x1 convs where diffusers uses Linear layers: reshape those weights."""
    return ".mid.attn_1." in official_key and official_key.endswith(".weight") and ".norm." not in official_key


def clip_key(name: str, tower: str) -> str:
    """Official (transformers 4.24) key of a CLIP text or vision model parameter.

    transformers >= 5 dropped the `text_model.` / `vision_model.` level; 4.x keeps it.
    """
    return name if name.startswith(f"{tower}.") else f"{tower}.{name}"
