"""Trace-clean wrappers: each takes the tensors of its `GraphSpec` in order and returns a tuple.

No `return_dict`, no Python scalars as inputs, no data-dependent branches. The arithmetic is the
public API's (`CapHumanDenoiser.capface_residuals`, `hard_mask_like`, `run_unet`, `VAE.decode`), so
the graphs compute what the PyTorch runtime computes.
"""
from __future__ import annotations

import torch
from torch import nn

from .clip import ImageEncoder, TextEncoder
from .models import VAE, CapHumanDenoiser
from .networks import hard_mask_like, run_unet


def masked_residuals(residuals, mask: torch.Tensor, strength: torch.Tensor) -> list[torch.Tensor]:
    """`inject_residuals` with per-residual scales from a tensor: r * s_i, then * (resize(mask) > 0.5)."""
    return [(r * strength[i]) * hard_mask_like(mask, r) for i, r in enumerate(residuals)]


class TextEncoderGraph(nn.Module):
    def __init__(self, text: TextEncoder):
        super().__init__()
        self.model = text.model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(input_ids=input_ids).last_hidden_state,)


class ImageEncoderGraph(nn.Module):
    def __init__(self, image: ImageEncoder, img_linear: nn.Linear):
        super().__init__()
        self.model, self.img_linear = image.model, img_linear

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model(pixel_values=pixel_values).last_hidden_state
        return tokens, self.img_linear(tokens)


class CapFaceGraph(nn.Module):
    def __init__(self, den: CapHumanDenoiser):
        super().__init__()
        self.capface = den.capface

    def forward(self, sample, timestep, hint, identity_context) -> tuple[torch.Tensor, ...]:
        residuals, mask = self.capface(sample, timestep, hint, identity_context)
        return (*residuals, mask)


class UNetGraph(nn.Module):
    """inputs: sample, timestep, text_embeddings, residual_0..N-1, mask, strength[N]."""

    def __init__(self, den: CapHumanDenoiser):
        super().__init__()
        self.unet = den.unet
        self.n = den.num_residuals

    def forward(self, sample, timestep, text_embeddings, *rest) -> tuple[torch.Tensor]:
        residuals, mask, strength = rest[:self.n], rest[self.n], rest[self.n + 1]
        return (run_unet(self.unet, sample, timestep, text_embeddings, masked_residuals(residuals, mask, strength)),)


class DenoiserGraph(nn.Module):
    """CapFace + UNet: what `CapHumanDenoiser.forward` computes (without tau: zero the identity
    context on the host for timesteps above tau, as `capface_residuals` does)."""

    def __init__(self, den: CapHumanDenoiser):
        super().__init__()
        self.den = den

    def forward(self, sample, timestep, text_embeddings, hint, identity_context, strength) -> tuple[torch.Tensor]:
        residuals, mask = self.den.capface(sample, timestep, hint, identity_context)
        scaled = masked_residuals(residuals, mask, strength)
        return (run_unet(self.den.unet, sample, timestep, text_embeddings, scaled),)


class VAEDecoderGraph(nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, latents) -> tuple[torch.Tensor]:
        return (self.vae.decode(latents),)


class VAEEncoderGraph(nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, images) -> tuple[torch.Tensor]:
        return (self.vae.encode(images),)


class FaceNetGraph(nn.Module):
    def __init__(self, facenet: nn.Module, id_linear: nn.Linear):
        super().__init__()
        self.facenet, self.id_linear = facenet, id_linear

    def forward(self, face) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.facenet(face)
        return features, self.id_linear(features[:, None, :])


class PlainGraph(nn.Module):
    """A network whose forward already takes and returns tensors (BiSeNet, the DECA encoder)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x) -> tuple[torch.Tensor]:
        return (self.net(x),)
