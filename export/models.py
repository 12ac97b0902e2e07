"""The public model API: build CapHuman's networks from the official config and load the official files.

    den = load_denoiser("cldm_v15.yaml", "caphuman.ckpt", sd_checkpoint="Realistic_Vision_V3.0.ckpt")
    ctx = den.project_identity(clip_tokens, id_features)          # [B, 258, 768], official [img, id] order
    eps = den(x_t, t, text_context, hint, ctx, strength=1.0, tau=0)  # == official CapHuman.apply_model
    eps = den(x_t, t, text_context, [hint_1, hint_2], [ctx_1, ctx_2])  # two people: apply_model of a cond list

    vae = load_vae("cldm_v15.yaml", "vae-ft-mse-840000-ema-pruned.ckpt")
    images = vae.decode(latents)                                   # [-1, 1]
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import keymap
from .checkpoints import (CAPFACE_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, VISION_PREFIX, CheckpointError,
                          load_module, read_official, read_state_dict)
from .clip import ImageEncoder, TextEncoder, load_tokenizer
from .config import CapHumanConfig, UNetSpec, load_config, load_controlnet_config
from .networks import ExtraControlNet, SideNetwork, build_unet, build_vae, inject_residuals, run_unet
from .people import as_people, check_person_strength

log = logging.getLogger(__name__)


def official_alphas_cumprod(config: CapHumanConfig) -> torch.Tensor:
    """ldm `register_schedule('linear')`: betas = linspace(sqrt(start), sqrt(end), T, float64)^2,
    cumprod in float64, stored as float32."""
    betas = torch.linspace(config.linear_start ** 0.5, config.linear_end ** 0.5, config.timesteps, device="cpu",
                           dtype=torch.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas.numpy(), axis=0)
    return torch.tensor(alphas_cumprod, dtype=torch.float32, device="cpu")


def _as_timesteps(t, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or shape [{batch}], got {tuple(t.shape)}")
    return t


def _batch_to(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{name} has batch {x.shape[0]}, expected 1 or {batch}")


class CapHumanDenoiser(nn.Module):
    """CapFace + the SD1.5 UNet with hard-masked residual injection; eps prediction.

    The pieces are exposed separately (`capface_residuals`, `controlled_eps`) so samplers can run
    CapFace once per step and the UNet on the batch-2 CFG pair.
    """

    def __init__(self, config: CapHumanConfig):
        super().__init__()
        self.config = config
        self.unet = build_unet(config.unet)
        self.capface = SideNetwork(config.capface, with_mask_head=True)
        self.id_linear = nn.Linear(config.id_dim, config.context_dim)
        self.img_linear = nn.Linear(config.img_linear_dim, config.context_dim)
        # The schedule the official sampler reads (model.alphas_cumprod); a checkpoint's own copy wins.
        self.register_buffer("alphas_cumprod", official_alphas_cumprod(config), persistent=False)
        self.controlnets = nn.ModuleList()            # extra ControlNets (networks); hints/scales below
        self.extra_controls: list[ExtraControlNet] = []

    @property
    def num_residuals(self) -> int:
        return self.config.unet.num_residuals

    def project_identity(self, clip_tokens: torch.Tensor, id_features: torch.Tensor) -> torch.Tensor:
        """[B,257,img_dim] CLIP tokens + [B,512] (or [B,1,512]) FaceNet -> [B,258,ctx], official [img, id] order."""
        if id_features.ndim == 2:
            id_features = id_features[:, None, :]
        return torch.cat([self.img_linear(clip_tokens), self.id_linear(id_features)], dim=1)

    def capface_residuals(self, x_t: torch.Tensor, t, hint: torch.Tensor, identity_context: torch.Tensor,
                          tau: float = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """CapFace's raw residuals and sigmoid head mask; `tau` zeroes the ID context where t > tau."""
        b = x_t.shape[0]
        t = _as_timesteps(t, b, x_t.device)
        context = _batch_to(identity_context, b, "identity_context")
        if tau:
            context = context * (t <= tau).to(context.dtype)[:, None, None]
        return self.capface(x_t, t, _batch_to(hint, b, "hint"), context)

    def scaled_residuals(self, residuals: list[torch.Tensor], mask: torch.Tensor,
                         strength: float | Sequence[float]) -> list[torch.Tensor]:
        scales = _strengths(strength, len(residuals))
        return inject_residuals(residuals, mask, scales)

    def extra_residuals(self, x_t: torch.Tensor, t, text_context: torch.Tensor) -> list[torch.Tensor] | None:
        """Sum of the extra ControlNets' scaled, unmasked residuals (text context of the CFG branch)."""
        total = None
        b = x_t.shape[0]
        t = _as_timesteps(t, b, x_t.device)
        for extra in self.extra_controls:
            res, _ = extra.network(x_t, t, _batch_to(extra.hint.to(x_t), b, "controlnet hint"), text_context)
            res = [r * extra.scale for r in res]
            total = res if total is None else [a + r for a, r in zip(total, res)]
        return total

    def controlled_eps(self, x_t: torch.Tensor, t, text_context: torch.Tensor,
                       residuals: list[torch.Tensor] | None) -> torch.Tensor:
        """The UNet with the given (already scaled and masked) residuals, plus extra ControlNets."""
        b = x_t.shape[0]
        t = _as_timesteps(t, b, x_t.device)
        text_context = _batch_to(text_context, b, "text_context")
        extra = self.extra_residuals(x_t, t, text_context)
        if extra is not None:
            residuals = extra if residuals is None else [r + e for r, e in zip(residuals, extra)]
        return run_unet(self.unet, x_t, t, text_context, residuals)

    def side_residuals(self, x_t: torch.Tensor, t, hint: torch.Tensor | Sequence[torch.Tensor],
                       identity_context: torch.Tensor | Sequence[torch.Tensor],
                       strength: float | Sequence[float] = 1.0, tau: float = 0,
                       person_strength: Sequence[float] | None = None) -> list[torch.Tensor]:
        """CapFace's scaled, hard-masked residuals for one person (tensors) or several (one hint and one
        identity context per person): each person's residuals are scaled, multiplied by that person's own
        hard head mask, and the people's contributions summed (the official `apply_model` for a list of
        conds). `person_strength` multiplies each person's scales (default 1 each)."""
        hints, contexts = as_people(hint, identity_context)
        person_scales = check_person_strength(person_strength, len(hints))
        total = None
        for h, ctx, ps in zip(hints, contexts, person_scales):
            residuals, mask = self.capface_residuals(x_t, t, h, ctx, tau)
            scales = _strengths(strength, len(residuals))
            scaled = self.scaled_residuals(residuals, mask, scales if ps == 1.0 else [s * ps for s in scales])
            total = scaled if total is None else [a + r for a, r in zip(total, scaled)]
        return total

    def forward(self, x_t: torch.Tensor, t, text_context: torch.Tensor, hint: torch.Tensor | Sequence[torch.Tensor],
                identity_context: torch.Tensor | Sequence[torch.Tensor], strength: float | Sequence[float] = 1.0,
                tau: float = 0, person_strength: Sequence[float] | None = None) -> torch.Tensor:
        """eps, exactly what the official `CapHuman.apply_model` computes for one condition, or for a list of
        conditions when `hint` and `identity_context` are lists (one entry per person)."""
        residuals = self.side_residuals(x_t, t, hint, identity_context, strength, tau, person_strength)
        return self.controlled_eps(x_t, t, text_context, residuals)

    def add_controlnet(self, network: SideNetwork, hint: torch.Tensor, scale: float = 1.0) -> None:
        """Add a standard ControlNet (e.g. openpose) with its own hint and scale."""
        self.controlnets.append(network)
        self.extra_controls.append(ExtraControlNet(network, hint, float(scale)))

    def clear_controlnets(self) -> None:
        self.controlnets = nn.ModuleList()
        self.extra_controls = []


def _strengths(strength, n: int) -> list[float]:
    if isinstance(strength, (int, float)):
        return [float(strength)] * n
    scales = [float(s) for s in strength]
    if len(scales) != n:
        raise ValueError(f"strength needs 1 or {n} per-residual scales, got {len(scales)}")
    return scales


class VAE(nn.Module):
    """AutoencoderKL with the latent scale applied: decode(latents) -> images in [-1, 1]."""

    def __init__(self, config: CapHumanConfig):
        super().__init__()
        self.scale_factor = config.scale_factor
        self.model = build_vae(config.vae)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # Official decode_first_stage: (1 / scale_factor) * z, then post_quant_conv + decoder.
        return self.model.decode((1.0 / self.scale_factor) * latents, return_dict=False)[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (posterior mean times the scale factor; deterministic)."""
        return self.model.encode(images, return_dict=False)[0].mean * self.scale_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)


def _vae_reshape(key: str, src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if keymap.vae_needs_conv_shape(key) and src.ndim == 4 and len(shape) == 2:
        return src[:, :, 0, 0]
    return src


def _resolve_config(config) -> CapHumanConfig:
    return config if isinstance(config, CapHumanConfig) else load_config(config)


def _schedule_from_state(den: CapHumanDenoiser, state: dict[str, torch.Tensor]) -> None:
    """Use the checkpoint's alphas_cumprod (the official sampler reads the loaded buffer) when it
    is a valid schedule; a corrupt one is reported and the config's schedule kept."""
    ac = state.get("alphas_cumprod")
    if ac is None:
        return
    # the buffer stays where the config's schedule was computed, whichever device the checkpoint was read to
    ac = ac.detach().to(device=den.alphas_cumprod.device, dtype=torch.float32).reshape(-1)
    valid = (ac.numel() == den.alphas_cumprod.numel() and bool(torch.isfinite(ac).all())
             and bool(((ac > 0) & (ac <= 1)).all()) and bool((ac[1:] <= ac[:-1]).all()))
    if not valid:
        log.warning("checkpoint 'alphas_cumprod' is not a valid schedule; using the config's scaled-linear schedule")
        return
    diff = (ac - den.alphas_cumprod).abs().max().item()
    if diff > 1e-6:
        log.warning("checkpoint 'alphas_cumprod' differs from the config's schedule by %.3g; using the checkpoint's, "
                    "as the official sampler does", diff)
    den.alphas_cumprod.copy_(ac)


def _without_random_init():
    """A context in which modules are built without their random initialisation, for modules whose every
    parameter and persistent buffer is then loaded from a checkpoint (`load_module` refuses a missing key,
    so no uninitialised value survives; buffers computed in constructors are still computed). It makes
    the full-size denoiser's construction 0.03 s instead of 17 s (2 CPU cores)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def denoiser_from_state(config: CapHumanConfig, state: dict[str, torch.Tensor],
                        dtype: torch.dtype = torch.float32) -> CapHumanDenoiser:
    with _without_random_init():
        den = CapHumanDenoiser(config).eval()
    load_module(den.unet, state, UNET_PREFIX, lambda n: keymap.unet_key(n, config.unet), "UNet")
    load_module(den.capface, state, CAPFACE_PREFIX, lambda n: keymap.side_network_key(n, config.capface), "CapFace")
    load_module(den.id_linear, state, "id_linear.", lambda n: n, "id_linear")
    load_module(den.img_linear, state, "img_linear.", lambda n: n, "img_linear")
    _schedule_from_state(den, state)
    schedule = den.alphas_cumprod.clone()
    den = den.to(dtype).requires_grad_(False)
    den.alphas_cumprod = schedule  # the schedule stays fp32 (not rounded through fp16) whatever the network dtype
    return den


def load_denoiser(config_path, checkpoint_path, sd_checkpoint=None, dtype: torch.dtype = torch.float32
                  ) -> CapHumanDenoiser:
    """CapFace + UNet + identity projections from `caphuman.ckpt`; an SD1.x checkpoint, when given,
    overrides the UNet (the official loading order)."""
    config = _resolve_config(config_path)
    state = read_official(checkpoint_path, sd_checkpoint)
    return denoiser_from_state(config, state, dtype)


def vae_from_state(config: CapHumanConfig, state: dict[str, torch.Tensor], dtype=torch.float32) -> VAE:
    with _without_random_init():
        vae = VAE(config).eval()
    levels = len(config.vae.ch_mult)
    load_module(vae.model, state, VAE_PREFIX, lambda n: keymap.vae_key(n, levels), "VAE", reshape=_vae_reshape)
    return vae.to(dtype).requires_grad_(False)


def load_vae(config_path, checkpoint_path, sd_checkpoint=None, vae_checkpoint=None, dtype=torch.float32) -> VAE:
    """The VAE from `checkpoint_path` (a caphuman.ckpt, an SD1.x checkpoint, or a bare VAE checkpoint
    with `encoder.*`/`decoder.*` keys), overridden by `sd_checkpoint` then `vae_checkpoint`."""
    config = _resolve_config(config_path)
    first = read_state_dict(checkpoint_path) if checkpoint_path else {}
    if any(k.startswith("decoder.") for k in first):  # a bare VAE file as the only source
        state = read_official(None, sd_checkpoint, checkpoint_path)
        if vae_checkpoint:
            state.update(read_official(None, None, vae_checkpoint))
    else:
        state = read_official(checkpoint_path, sd_checkpoint, vae_checkpoint)
    return vae_from_state(config, state, dtype)


def text_encoder_from_state(config: CapHumanConfig, state: dict[str, torch.Tensor], clip_dir=None,
                            dtype=torch.float32) -> TextEncoder:
    tokenizer = load_tokenizer(clip_dir)
    with _without_random_init():
        enc = TextEncoder(config.text_clip, tokenizer).eval()
    load_module(enc.model, state, TEXT_PREFIX, lambda n: keymap.clip_key(n, "text_model"), "CLIP text encoder")
    return enc.to(dtype).requires_grad_(False)


def image_encoder_from_state(config: CapHumanConfig, state: dict[str, torch.Tensor], dtype=torch.float32
                             ) -> ImageEncoder:
    with _without_random_init():
        enc = ImageEncoder(config.vision_clip).eval()
    load_module(enc.model, state, VISION_PREFIX, lambda n: keymap.clip_key(n, "vision_model"), "CLIP image encoder")
    return enc.to(dtype).requires_grad_(False)


def official_state_dict(den: CapHumanDenoiser | None = None, vae: VAE | None = None,
                        text: TextEncoder | None = None, image: ImageEncoder | None = None) -> dict[str, torch.Tensor]:
    """Our modules' weights under the official checkpoint keys (the inverse of loading): used to
    write checkpoints in the official layout, e.g. for tests and for converting fine-tunes."""
    out: dict[str, torch.Tensor] = {}

    def put(module: nn.Module, prefix: str, name_fn, reshape=None):
        for name, value in module.state_dict().items():
            key = prefix + name_fn(name)
            out[key] = reshape(key, value) if reshape else value

    if den is not None:
        cfg = den.config
        put(den.unet, UNET_PREFIX, lambda n: keymap.unet_key(n, cfg.unet))
        put(den.capface, CAPFACE_PREFIX, lambda n: keymap.side_network_key(n, cfg.capface))
        put(den.id_linear, "id_linear.", lambda n: n)
        put(den.img_linear, "img_linear.", lambda n: n)
        out["alphas_cumprod"] = den.alphas_cumprod.clone()
    if vae is not None:
        levels = len(vae.model.config.block_out_channels)
        put(vae.model, VAE_PREFIX, lambda n: keymap.vae_key(n, levels),
            lambda k, v: v[:, :, None, None] if keymap.vae_needs_conv_shape(k) and v.ndim == 2 else v)
    if text is not None:
        put(text.model, TEXT_PREFIX, lambda n: keymap.clip_key(n, "text_model"))
    if image is not None:
        put(image.model, VISION_PREFIX, lambda n: keymap.clip_key(n, "vision_model"))
    return out


def clip_folder_state(clip_dir: str | Path, tower: str) -> dict[str, torch.Tensor]:
    """Weights of a HF CLIP folder (openai/clip-vit-large-patch14) under the official prefix of `tower`."""
    clip_dir = Path(clip_dir)
    files = sorted(clip_dir.glob("*.safetensors")) or sorted(clip_dir.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{clip_dir} has no model.safetensors or pytorch_model.bin")
    prefix = TEXT_PREFIX if tower == "text_model" else VISION_PREFIX
    out = {}
    for f in files:
        for k, v in read_state_dict(f).items():
            if k.startswith(f"{tower}."):
                out[prefix + k] = v
    return out


def load_controlnet(config_path, checkpoint_path, dtype=torch.float32) -> SideNetwork:
    """A standard ldm ControlNet (e.g. control_v11p_sd15_openpose.pth: `control_model.*` keys, or bare)."""
    spec: UNetSpec = load_controlnet_config(config_path)
    state = read_state_dict(checkpoint_path)
    if not any(k.startswith(CAPFACE_PREFIX) for k in state):
        state = {CAPFACE_PREFIX + k: v for k, v in state.items()}
    with _without_random_init():
        net = SideNetwork(spec, with_mask_head=False).eval()
    load_module(net, state, CAPFACE_PREFIX, lambda n: keymap.side_network_key(n, spec), "ControlNet")
    return net.to(dtype).requires_grad_(False)
