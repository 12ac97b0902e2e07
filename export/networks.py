"""CapHuman's PyTorch networks, built on diffusers/transformers module structures.

diffusers' UNet2DConditionModel, ControlNetModel and AutoencoderKL compute what ldm's UNetModel,
ControlNet and AutoencoderKL compute (same blocks, [cos, sin] timestep embedding, GroupNorm eps,
1x1-conv transformer projections), so we use them and map the official keys onto them
(`caphuman.export.keymap`). What diffusers lacks is written here: CapFace's head-mask predictor on the
guided hint, and the hard-masked, per-residual-scaled injection of the side network's residuals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from .config import CLIPSpec, UNetSpec, VAESpec

HINT_EMBED_CHANNELS = (16, 32, 96, 256)  # ldm input_hint_block widths, fixed in the official code


def _block_types(spec: UNetSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    down = tuple("CrossAttnDownBlock2D" if spec.level_has_attention(i) else "DownBlock2D"
                 for i in range(len(spec.channel_mult)))
    up = tuple("CrossAttnUpBlock2D" if spec.level_has_attention(i) else "UpBlock2D"
               for i in reversed(range(len(spec.channel_mult))))
    return down, up


def _common_unet_kwargs(spec: UNetSpec) -> dict:
    down, _ = _block_types(spec)
    heads = spec.heads_per_level()
    return dict(
        in_channels=spec.in_channels,
        down_block_types=down,
        block_out_channels=tuple(spec.model_channels * m for m in spec.channel_mult),
        layers_per_block=spec.num_res_blocks,
        cross_attention_dim=spec.context_dim,
        # diffusers' "attention_head_dim" is the number of heads for SD1.x (its documented naming debt).
        attention_head_dim=heads if len(set(heads)) > 1 else heads[0],
        transformer_layers_per_block=spec.transformer_depth,
        norm_num_groups=32,
        norm_eps=1e-5,
        use_linear_projection=False,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def build_unet(spec: UNetSpec) -> UNet2DConditionModel:
    _, up = _block_types(spec)
    return UNet2DConditionModel(out_channels=spec.out_channels, up_block_types=up, center_input_sample=False,
                                **_common_unet_kwargs(spec))


class SideNetwork(nn.Module):
    """A ControlNet-style copy of the UNet encoder: CapFace (with its head-mask predictor) or a
    standard ControlNet such as openpose (without).

    forward(x, t, hint, context) -> (residuals [1 + blocks + middle], mask or None)
    """

    def __init__(self, spec: UNetSpec, with_mask_head: bool):
        super().__init__()
        self.spec = spec
        self.net = ControlNetModel(conditioning_channels=spec.hint_channels,
                                   conditioning_embedding_out_channels=HINT_EMBED_CHANNELS,
                                   **_common_unet_kwargs(spec))
        # CapFace's head-mask predictor on the guided hint (official: Conv2d(320, 1, 3) + Sigmoid;
        # 320 is model_channels, which we take from the config so reduced configs work).
        self.mask_predict = nn.Conv2d(spec.model_channels, 1, 3, padding=1) if with_mask_head else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, hint: torch.Tensor, context: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        guided_hint, mask = self.embed_hint(hint)
        return self.encode(x, t, guided_hint, context), mask

    def embed_hint(self, hint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(guided hint, head mask or None) of a hint image. They depend on the hint alone (not on
        x, t or the context), so a sampler computes them once per request instead of once per step."""
        guided_hint = self.net.controlnet_cond_embedding(hint)
        mask = torch.sigmoid(self.mask_predict(guided_hint)) if self.mask_predict is not None else None
        return guided_hint, mask

    def encode(self, x: torch.Tensor, t: torch.Tensor, guided_hint: torch.Tensor, context: torch.Tensor
               ) -> list[torch.Tensor]:
        """The residuals [1 + blocks + middle] given the guided hint of ``embed_hint``."""
        net = self.net
        t = t.reshape(-1).expand(x.shape[0])
        emb = net.time_embedding(net.time_proj(t).to(x.dtype))
        h = net.conv_in(x) + guided_hint
        features = [h]
        for block in net.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, skips = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, skips = block(hidden_states=h, temb=emb)
            features.extend(skips)
        residuals = [zero_conv(f) for zero_conv, f in zip(net.controlnet_down_blocks, features)]
        h = net.mid_block(h, emb, encoder_hidden_states=context)
        residuals.append(net.controlnet_mid_block(h))
        return residuals


def hard_mask_like(mask: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Official hard head mask at a feature's resolution: bilinear resize (align_corners=False,
    no antialias, as torchvision 0.14's tensor resize) then > 0.5."""
    if mask.shape[-2:] != feature.shape[-2:]:
        mask = F.interpolate(mask, size=feature.shape[-2:], mode="bilinear", align_corners=False)
    return (mask > 0.5).to(feature.dtype)


def inject_residuals(residuals: list[torch.Tensor], mask: torch.Tensor | None, scales) -> list[torch.Tensor]:
    """Scale each residual (control_scales) and multiply by the hard mask, in the official order."""
    out = []
    for r, s in zip(residuals, scales):
        r = r * s
        if mask is not None:
            r = r * hard_mask_like(mask, r)
        out.append(r)
    return out


def run_unet(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, text_context: torch.Tensor,
             residuals: list[torch.Tensor] | None) -> torch.Tensor:
    """The SD UNet with side-network residuals added to its middle feature and skip connections."""
    t = t.reshape(-1).expand(x.shape[0])
    down = mid = None
    if residuals is not None:
        down, mid = tuple(residuals[:-1]), residuals[-1]
    return unet(x, t, encoder_hidden_states=text_context, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]


class UNetEncoding(NamedTuple):
    """What the UNet's first half hands to its second: the mid-block output (before any side-network
    residual), the skip connections (before residuals), the time embedding and the text context.
    (A NamedTuple, so torch.compile'd halves return it without a graph break.)"""
    sample: torch.Tensor
    skips: tuple[torch.Tensor, ...]
    emb: torch.Tensor
    text_context: torch.Tensor


def unet_encode(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor,
                text_context: torch.Tensor, branches: int = 1) -> UNetEncoding:
    """Time embedding, conv_in, down blocks and the mid block: the part of `run_unet` that does not
    read the side network's residuals, so it can run concurrently with CapFace. With `unet_decode`
    it computes exactly `run_unet` (same modules, same order; tests check equality).

    ``branches=k``: ``x`` and ``t`` hold ONE copy (batch n) of latents that the UNet runs as k
    classifier-free-guidance branches (``text_context`` has batch k*n), i.e. the same as passing
    ``torch.cat([x] * k)``. Until the first cross-attention the branches are identical (the side
    network's residuals only enter in `unet_decode`), so the time embedding, conv_in and the first
    ResNet block run at batch n and their outputs are tiled. Same math, not bit-identical: kernels
    at batch n may round differently from those at batch k*n (tests: relative error <= 1e-6 fp32).
    A first down block of another type than (CrossAttn)DownBlock2D takes the concatenated batch."""
    if branches > 1:
        from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, DownBlock2D

        if type(unet.down_blocks[0]) in (CrossAttnDownBlock2D, DownBlock2D):
            return _unet_encode_shared_prefix(unet, x, t, text_context, branches)
        x, t = x.repeat(branches, 1, 1, 1), t.reshape(-1).expand(x.shape[0]).repeat(branches)
    t = t.reshape(-1).expand(x.shape[0])
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    sample = unet.conv_in(x)
    sample, skips = _down_blocks_and_mid(unet, unet.down_blocks, sample, (sample,), emb, text_context)
    return UNetEncoding(sample, skips, emb, text_context)


def _down_blocks_and_mid(unet, blocks, sample, skips, emb, text_context):
    for block in blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=text_context)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips += res
    return unet.mid_block(sample, emb, encoder_hidden_states=text_context), skips


def _unet_encode_shared_prefix(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor,
                               text_context: torch.Tensor, branches: int) -> UNetEncoding:
    """`unet_encode` with ``branches`` > 1: the text-free prefix at the batch of ``x``. The first
    down block is run here as diffusers' (CrossAttn)DownBlock2D.forward runs it, with a tiling
    after its first ResNet block. conv_in's output stays at batch n (`unet_decode` tiles it)."""
    if text_context.shape[0] != branches * x.shape[0]:
        raise ValueError(f"text_context has batch {text_context.shape[0]}, expected {branches} x {x.shape[0]}")
    t = t.reshape(-1).expand(x.shape[0])
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    sample = unet.conv_in(x)
    skips = (sample,)
    first, rest = unet.down_blocks[0], unet.down_blocks[1:]
    sample = first.resnets[0](sample, emb)
    # from here on every branch's copy is computed: tile the features, the embedding and (where
    # the blocks' time projections are fused) its projections
    sample = sample.repeat(branches, 1, 1, 1)
    emb = emb.repeat(branches, 1)
    fused = getattr(unet, "_fused_time_projections", None)
    if fused is not None:
        fused.repeat_batch(branches)
    attentions = getattr(first, "attentions", None)
    for i, resnet in enumerate(first.resnets):
        if i > 0:
            sample = resnet(sample, emb)
        if attentions is not None:
            sample = attentions[i](sample, encoder_hidden_states=text_context, return_dict=False)[0]
        skips += (sample,)
    if first.downsamplers is not None:
        for down in first.downsamplers:
            sample = down(sample)
        skips += (sample,)
    sample, skips = _down_blocks_and_mid(unet, rest, sample, skips, emb, text_context)
    return UNetEncoding(sample, skips, emb, text_context)


def _add_tiled(feature: torch.Tensor, residual: torch.Tensor | None, batch: int) -> torch.Tensor:
    """feature + residual at ``batch``, where a feature or residual of batch n serves k*n (the k CFG
    branches of the same samples, as ``torch.cat([r] * k)``); compiled, the tiling is fused into the
    add instead of materialised."""
    if residual is not None:
        if residual.shape[0] < feature.shape[0]:
            residual = residual.repeat(feature.shape[0] // residual.shape[0], 1, 1, 1)
        elif feature.shape[0] < residual.shape[0]:
            feature = feature.repeat(residual.shape[0] // feature.shape[0], 1, 1, 1)
        feature = feature + residual
    if feature.shape[0] != batch:
        feature = feature.repeat(batch // feature.shape[0], 1, 1, 1)
    return feature


def unet_decode(unet: UNet2DConditionModel, enc: UNetEncoding, residuals: list[torch.Tensor] | None) -> torch.Tensor:
    """The up blocks and the output head, after adding the side network's residuals (the
    ControlNet convention of `run_unet`: one per skip connection, the last one to the mid output).
    Residuals may have the batch of the samples when the UNet runs k CFG branches of them
    (batch k*n): they are tiled, as `run_unet` with `torch.cat([r] * k)` does; so are skips that
    `unet_encode(..., branches=k)` left at batch n."""
    skips, sample = enc.skips, enc.sample
    batch = sample.shape[0]
    if residuals is None:
        residuals = [None] * (len(skips) + 1)
    skips = tuple(_add_tiled(s, r, batch) for s, r in zip(skips, residuals[:-1]))
    sample = _add_tiled(sample, residuals[-1], batch)
    n_up = len(unet.up_blocks) - 1
    forward_upsample_size = any(d % (2 ** n_up) for d in skips[0].shape[-2:])
    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        if i < n_up and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=enc.emb, res_hidden_states_tuple=res,
                           encoder_hidden_states=enc.text_context, upsample_size=upsample_size)
        else:
            sample = block(hidden_states=sample, temb=enc.emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def build_vae(spec: VAESpec) -> AutoencoderKL:
    n = len(spec.ch_mult)
    return AutoencoderKL(
        in_channels=spec.in_channels, out_channels=spec.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(spec.ch * m for m in spec.ch_mult), layers_per_block=spec.num_res_blocks,
        latent_channels=spec.z_channels, norm_num_groups=32, sample_size=256, scaling_factor=0.18215,
        use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
    )


def build_text_encoder(spec: CLIPSpec) -> CLIPTextModel:
    model = CLIPTextModel(CLIPTextConfig(**spec.text, attn_implementation="eager"))
    return model.eval()


def build_vision_encoder(spec: CLIPSpec) -> CLIPVisionModel:
    model = CLIPVisionModel(CLIPVisionConfig(**spec.vision, attn_implementation="eager"))
    return model.eval()


@dataclass
class ExtraControlNet:
    """A standard ControlNet added next to CapFace (the official openpose option; the paper's
    post-hoc head-control enhancement, Eq. 9, is the same mechanism): its own hint and scale,
    residuals added unmasked, text context of the current CFG branch."""
    network: SideNetwork
    hint: torch.Tensor
    scale: float = 1.0
