"""DDIM over engines: the official sampler's loop with CapFace and the UNet as two engines.

Same contract and numerics as `caphuman.runtime.sampling.ddim_sample` (it reuses `ddim_schedule`,
`ddim_update` and the per-sample noise of that module), with the networks replaced by any
`Engine` pair: CapFace once per step at batch N, the UNet once at batch 2N on the [cond, uncond]
pair with the residuals and mask repeated (guidance 1 runs the cond branch alone, as the official
sampler does). `cfg="serial"` runs the fused `denoiser` engine twice per step when one is given.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .ddim import ddim_schedule, ddim_update, step_noise, validate_sampling_args

from .base import Engine


def per_residual_strength(strength: float | Sequence[float], n: int) -> torch.Tensor:
    """The graphs' `strength` input: [n] float32 control scales."""
    if isinstance(strength, (int, float)):
        return torch.full((n,), float(strength), dtype=torch.float32)
    s = torch.tensor([float(v) for v in strength], dtype=torch.float32)
    if s.numel() != n:
        raise ValueError(f"strength needs 1 or {n} per-residual scales, got {s.numel()}")
    return s


def gate_identity(identity_context: torch.Tensor, t: int, tau: float) -> torch.Tensor:
    """`capface_residuals`' ID dropout on the host: the context times (t <= tau) when tau is set."""
    if tau and t > tau:
        return identity_context * 0
    return identity_context


class EngineSampler:
    """`sampler(noise, text_cond, text_uncond, hint, identity_context, steps=..., ...) -> latents`:
    the signature of `ddim_sample` without the model, so the pipeline can swap it in."""

    def __init__(self, capface: Engine, unet: Engine, alphas_cumprod: torch.Tensor, dtype=torch.float32,
                 denoiser: Engine | None = None):
        self.capface, self.unet, self.denoiser = capface, unet, denoiser
        self.alphas_cumprod = alphas_cumprod.float().cpu()
        self.dtype = dtype
        self.num_residuals = sum(t.name.startswith("residual_") for t in unet.spec.inputs)

    def _eps_pair(self, x, tt, text_pair, hint, ctx, strength, branches: int) -> torch.Tensor:
        cap = self.capface.run({"sample": x, "timestep": tt, "hint": hint, "identity_context": ctx})
        feed = {"sample": torch.cat([x] * branches), "timestep": torch.cat([tt] * branches),
                "text_embeddings": text_pair, "mask": torch.cat([cap["mask"]] * branches), "strength": strength}
        for i in range(self.num_residuals):
            feed[f"residual_{i}"] = torch.cat([cap[f"residual_{i}"]] * branches)
        return self.unet.run(feed)["eps"]

    def _eps_fused(self, x, tt, text, hint, ctx, strength) -> torch.Tensor:
        return self.denoiser.run({"sample": x, "timestep": tt, "text_embeddings": text, "hint": hint,
                                  "identity_context": ctx, "strength": strength})["eps"]

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor, text_cond: torch.Tensor, text_uncond: torch.Tensor, hint: torch.Tensor,
                 identity_context: torch.Tensor, steps: int = 20, guidance: float = 7.0, eta: float = 0.0,
                 strength: float | Sequence[float] = 1.0, tau: float = 0, *, cfg: str = "batched",
                 generators: Sequence[torch.Generator] | None = None,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        validate_sampling_args(steps, guidance, eta, strength, tau)
        if cfg not in ("batched", "serial"):
            raise ValueError(f"cfg must be 'batched' or 'serial', got {cfg!r}")
        sched = ddim_schedule(self.alphas_cumprod, steps, eta)
        n, dt = noise.shape[0], self.dtype
        x = noise.to(torch.float32)
        device = x.device
        cond = text_cond.to(device, dt).expand(n, -1, -1)
        uncond = text_uncond.to(device, dt).expand(n, -1, -1)
        hint = hint.to(device, dt).expand(n, -1, -1, -1)
        ctx0 = identity_context.to(device, dt).expand(n, -1, -1)
        s = per_residual_strength(strength, self.num_residuals).to(device)
        total = len(sched.timesteps)
        for i, index in enumerate(reversed(range(total))):
            t = sched.timesteps[index]
            tt = torch.full((n,), t, dtype=torch.long, device=device)
            ctx = gate_identity(ctx0, t, tau)
            xi = x.to(dt)
            if guidance == 1.0:
                eps = self._eps_pair(xi, tt, cond, hint, ctx, s, 1)
            elif cfg == "serial" and self.denoiser is not None:
                eps_c = self._eps_fused(xi, tt, cond, hint, ctx, s).float()
                eps_u = self._eps_fused(xi, tt, uncond, hint, ctx, s).float()
                eps = eps_u + guidance * (eps_c - eps_u)
            else:
                pair = self._eps_pair(xi, tt, torch.cat([cond, uncond]), hint, ctx, s, 2).float()
                eps_c, eps_u = pair[:n], pair[n:]
                eps = eps_u + guidance * (eps_c - eps_u)
            noise_t = step_noise(x, generators) if eta > 0 else None
            x = ddim_update(x, eps.float(), sched.alphas[index].to(device), sched.alphas_prev[index].to(device),
                            sched.sigmas[index].to(device), sched.sqrt_one_minus_alphas[index].to(device), noise_t)
            if callback is not None:
                callback(i, total, x)
        return x
