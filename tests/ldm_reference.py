"""An independent implementation of the official CapHuman networks and sampler, in the official
(ldm) module layout, written from the reference specification (shared/reference/caphuman_reference.md
sections 3 and 5). Its state-dict keys ARE the official checkpoint keys, so it loads a synthesized
official checkpoint with strict=True; the tests compare our diffusers-based runtime against it.

Deliberately plain: einsum attention in fp32, explicit loops, the official operation order.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caphuman.export.config import CapHumanConfig, UNetSpec, VAESpec


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def gn(ch: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=eps)


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb: int, out: int):
        super().__init__()
        self.in_layers = nn.Sequential(gn(ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(gn(out), nn.SiLU(), nn.Dropout(0), nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out else nn.Conv2d(ch, out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, qdim: int, cdim: int, heads: int, dh: int):
        super().__init__()
        inner = heads * dh
        self.heads, self.scale = heads, dh ** -0.5
        self.to_q = nn.Linear(qdim, inner, bias=False)
        self.to_k = nn.Linear(cdim, inner, bias=False)
        self.to_v = nn.Linear(cdim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, qdim), nn.Dropout(0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, _ = x.shape
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).permute(0, 2, 1, 3)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        sim = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * self.scale
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v.float())
        return self.to_out(out.permute(0, 2, 1, 3).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dh: int, cdim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dh)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, cdim, heads, dh)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, dh: int, cdim: int, depth: int):
        super().__init__()
        inner = heads * dh
        self.norm = gn(ch, 1e-6)
        self.proj_in = nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, dh, cdim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        for blk in self.transformer_blocks:
            y = blk(y, context)
        y = y.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return self.proj_out(y) + x


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Seq(nn.ModuleList):
    """TimestepEmbedSequential: emb to ResBlocks, context to transformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _encoder(spec: UNetSpec, m: nn.Module):
    """The input blocks + middle block of ldm's UNetModel, attached to m; returns skip channels."""
    mc, emb = spec.model_channels, spec.model_channels * 4
    heads = spec.heads_per_level()
    m.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
    m.input_blocks = nn.ModuleList([Seq([nn.Conv2d(spec.in_channels, mc, 3, padding=1)])])
    chans, ch = [mc], mc
    for level, mult in enumerate(spec.channel_mult):
        for _ in range(spec.num_res_blocks):
            layers = [ResBlock(ch, emb, mult * mc)]
            ch = mult * mc
            if spec.level_has_attention(level):
                layers.append(SpatialTransformer(ch, heads[level], ch // heads[level], spec.context_dim, spec.transformer_depth))
            m.input_blocks.append(Seq(layers))
            chans.append(ch)
        if level != len(spec.channel_mult) - 1:
            m.input_blocks.append(Seq([Downsample(ch)]))
            chans.append(ch)
    m.middle_block = Seq([ResBlock(ch, emb, ch),
                          SpatialTransformer(ch, heads[-1], ch // heads[-1], spec.context_dim, spec.transformer_depth),
                          ResBlock(ch, emb, ch)])
    return chans, ch


class ControlledUnet(nn.Module):
    """ldm UNetModel + the official ControlledUnetModel.forward (hard-masked residuals)."""

    def __init__(self, spec: UNetSpec):
        super().__init__()
        self.spec = spec
        chans, ch = _encoder(spec, self)
        mc, emb, heads = spec.model_channels, spec.model_channels * 4, spec.heads_per_level()
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(spec.channel_mult))[::-1]:
            for i in range(spec.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, mc * mult)]
                ch = mc * mult
                if spec.level_has_attention(level):
                    layers.append(SpatialTransformer(ch, heads[level], ch // heads[level], spec.context_dim, spec.transformer_depth))
                if level and i == spec.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Seq(layers))
        self.out = nn.Sequential(gn(ch), nn.SiLU(), nn.Conv2d(ch, spec.out_channels, 3, padding=1))

    def forward(self, x, t, context, control=None, mask=None, pose_control=None):
        """`control`/`mask`: one person's residual list and mask, or (official list semantics) a list with one
        residual list and one mask per person: each person's residuals are hard-masked by its own mask and
        added to the feature one person after the other."""
        emb = self.time_embed(timestep_embedding(t, self.spec.model_channels))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None and not isinstance(control[0], (list, tuple)):
            control, mask = [control], [mask]
        controls = [list(c) for c in control] if control is not None else None
        masks = list(mask) if mask is not None else None
        pose_control = list(pose_control) if pose_control is not None else None

        def masked(feat, m, like):
            if m is None:
                return feat
            m = F.interpolate(m, size=like.shape[-2:], mode="bilinear", align_corners=False)
            return feat * (m > 0.5).float()

        def add_people(feat, like):
            for person, c in enumerate(controls):
                feat = feat + masked(c.pop(), masks[person] if masks is not None else None, like)
            return feat

        if controls is not None:
            h = add_people(h, h)
            if pose_control is not None:
                h = h + pose_control.pop()
        for block in self.output_blocks:
            skip = hs.pop()
            if controls is not None:
                skip = add_people(skip, h)
                if pose_control is not None:
                    skip = skip + pose_control.pop()
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)


class ControlNet(nn.Module):
    """ldm ControlNet / CapFace (with_mask=True adds mask_predict)."""

    def __init__(self, spec: UNetSpec, with_mask: bool):
        super().__init__()
        self.spec = spec
        chans, ch = _encoder(spec, self)
        mc = spec.model_channels
        widths = [spec.hint_channels, 16, 16, 32, 32, 96, 96, 256]
        layers = []
        for i in range(7):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, stride=2 if i in (2, 4, 6) else 1), nn.SiLU()]
        layers.append(nn.Conv2d(256, mc, 3, padding=1))
        self.input_hint_block = nn.Sequential(*layers)
        self.zero_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 1)) for c in chans])
        self.middle_block_out = nn.Sequential(nn.Conv2d(ch, ch, 1))
        if with_mask:
            self.mask_predict = nn.Sequential(nn.Conv2d(mc, 1, 3, padding=1), nn.Sigmoid())

    def forward(self, x, hint, t, context):
        emb = self.time_embed(timestep_embedding(t, self.spec.model_channels))
        guided = self.input_hint_block(hint)
        mask = self.mask_predict(guided) if hasattr(self, "mask_predict") else None
        outs, h = [], x
        for i, (block, zc) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zc(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs, mask


class CapHumanReference(nn.Module):
    """CapHuman.apply_model with the official module names (model.diffusion_model, control_model, ...)."""

    def __init__(self, cfg: CapHumanConfig):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = ControlledUnet(cfg.unet)
        self.control_model = ControlNet(cfg.capface, with_mask=True)
        self.id_linear = nn.Linear(512, cfg.context_dim)
        self.img_linear = nn.Linear(cfg.img_linear_dim, cfg.context_dim)
        self.control_scales = [1.0] * cfg.unet.num_residuals
        self.drop_control_cond_t = 0
        self.pose_control_model = None
        self.pose_hint = None
        self.pose_control_scales = None

    def apply_model(self, x, t, cond_txt, hint, clip_tokens, id_feat, return_parts=False):
        """One condition (tensors), or a list of conditions (lists of hints, CLIP tokens and FaceNet features,
        one per person): CapFace once per person, each person's residuals scaled by control_scales."""
        if isinstance(hint, (list, tuple)):
            people = list(zip(hint, clip_tokens, id_feat))
        else:
            people = [(hint, clip_tokens, id_feat)]
        controls, masks, raws = [], [], []
        for h, tokens, fid in people:
            control_cond = torch.cat([self.img_linear(tokens), self.id_linear(fid)], dim=1)
            if self.drop_control_cond_t != 0:
                control_cond = control_cond * (t <= self.drop_control_cond_t).float()[:, None, None]
            control, mask = self.control_model(x, h, t, control_cond)
            raws.append(list(control))
            controls.append([c * s for c, s in zip(control, self.control_scales)])
            masks.append(mask)
        pose = None
        if self.pose_control_model is not None:
            pose, _ = self.pose_control_model(x, self.pose_hint, t, cond_txt)
            pose = [c * s for c, s in zip(pose, self.pose_control_scales)]
        if len(people) == 1:
            eps = self.model.diffusion_model(x, t, cond_txt, controls[0], masks[0], pose)
            return (eps, raws[0], masks[0]) if return_parts else eps
        eps = self.model.diffusion_model(x, t, cond_txt, controls, masks, pose)
        return (eps, raws, masks) if return_parts else eps


# --- the official DDIM sampler (ddim_hacked.py), serial CFG --------------------------------------

def official_alphas_cumprod(linear_start=0.00085, linear_end=0.012, n=1000) -> torch.Tensor:
    betas = (torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=torch.float64) ** 2).numpy()
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


def official_ddim(apply_model, alphas_cumprod, x, cond, uncond, steps, scale, eta=0.0, noise_fn=None):
    c = 1000 // steps
    ddim_t = np.asarray(list(range(0, 1000, c))) + 1
    alphacums = alphas_cumprod
    alphas = alphacums[ddim_t]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_t[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    sqrt_one_minus = np.sqrt(1.0 - alphas)
    b = x.shape[0]
    total = ddim_t.shape[0]
    for i, step in enumerate(np.flip(ddim_t)):
        index = total - i - 1
        ts = torch.full((b,), int(step), dtype=torch.long)
        if scale == 1.0:
            e_t = apply_model(x, ts, cond)
        else:
            e_c = apply_model(x, ts, cond)
            e_u = apply_model(x, ts, uncond)
            e_t = e_u + scale * (e_c - e_u)
        a_t = torch.full((b, 1, 1, 1), float(alphas[index]))
        a_prev = torch.full((b, 1, 1, 1), float(alphas_prev[index]))
        sigma_t = torch.full((b, 1, 1, 1), float(sigmas[index]))
        s1m = torch.full((b, 1, 1, 1), float(sqrt_one_minus[index]))
        pred_x0 = (x - s1m * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * (noise_fn(x.shape) if noise_fn else torch.zeros(x.shape))
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
    return x


# --- ldm AutoencoderKL decoder ------------------------------------------------------------------

class VResnet(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = gn(cin, 1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = gn(cout, 1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class VAttn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = gn(c, 1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w = torch.bmm(q, k.reshape(b, c, hh * ww)) * (int(c) ** -0.5)
        w = F.softmax(w, dim=2)
        out = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class VAEDecoderReference(nn.Module):
    """post_quant_conv + ldm Decoder, official names under first_stage_model."""

    def __init__(self, spec: VAESpec):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(spec.embed_dim, spec.z_channels, 1)
        self.decoder = nn.Module()
        d = self.decoder
        block_in = spec.ch * spec.ch_mult[-1]
        d.conv_in = nn.Conv2d(spec.z_channels, block_in, 3, padding=1)
        d.mid = nn.Module()
        d.mid.block_1, d.mid.attn_1, d.mid.block_2 = VResnet(block_in, block_in), VAttn(block_in), VResnet(block_in, block_in)
        d.up = nn.ModuleList([nn.Module() for _ in spec.ch_mult])
        for level in reversed(range(len(spec.ch_mult))):
            out = spec.ch * spec.ch_mult[level]
            blocks = []
            for _ in range(spec.num_res_blocks + 1):
                blocks.append(VResnet(block_in, out))
                block_in = out
            d.up[level].block = nn.ModuleList(blocks)
            if level:
                d.up[level].upsample = Upsample(block_in)
        d.norm_out = gn(block_in, 1e-6)
        d.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def decode(self, z, scale_factor=0.18215):
        d = self.decoder
        h = d.conv_in(self.post_quant_conv(1.0 / scale_factor * z))
        h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(h)))
        for level in reversed(range(len(d.up))):
            for blk in d.up[level].block:
                h = blk(h)
            if level:
                h = d.up[level].upsample(h)
        return d.conv_out(F.silu(d.norm_out(h)))


def randomize_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Every parameter random (zero-initialised convs too, so every path matters); norms near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module
