"""The public sampling API on a denoiser module or any engine: `ddim_sample` reproduces the official sampler.

    latents = ddim_sample(den, noise, text_cond, text_uncond, hint, ctx, steps=20, guidance=7.0)
    latents = sample_with("dpmpp_2m", den, noise, text_cond, text_uncond, hint, ctx, steps=12)
    latents = ddim_sample(den, noise, text_cond, text_uncond, [hint_1, hint_2], [ctx_1, ctx_2])  # two people

`den` is a `CapHumanDenoiser` (run eagerly: the reference) or any `DenoiserEngine` from
`caphuman.engines.factory.create_engine`.

DDIM has the exact semantics of the official sampler (`src/cldm/ddim_hacked.py`): the schedule is the
denoiser's `alphas_cumprod` (float32, as loaded); timesteps c = T // steps, range(0, T, c) + 1, so 30 steps
visit 31 timesteps, as the official code does; the last step's alpha_prev is alphas_cumprod[0] (not 1);
every update is computed in float32 in the official operation order, so results match the official code to
float rounding.

Guidance: the official code runs CapFace + UNet twice per step (cond, then uncond). CapFace sees the same
inputs in both branches (only the text differs), so `cfg="batched"` (default) runs CapFace once per step and
the UNet once on the [cond, uncond] batch -- mathematically identical. `cfg="serial"` is the official way,
kept as the reference mode. The samplers themselves are `caphuman.engines.samplers`, the loop
`caphuman.engines.loop`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from caphuman.engines.denoiser import Conditioning, DenoiserEngine
from caphuman.engines.loop import sample
from caphuman.engines.samplers import (NUM_TRAIN_TIMESTEPS, SAMPLERS, Plan, Sampler, ddim_plan, ddim_timesteps,
                                       ddim_update, get_sampler, k_diffusion_timesteps, register_sampler,
                                       step_noise)

__all__ = ["NUM_TRAIN_TIMESTEPS", "SAMPLERS", "Plan", "Sampler", "ddim_plan", "ddim_timesteps", "ddim_update",
           "get_sampler", "register_sampler", "step_noise", "k_diffusion_timesteps", "as_engine", "sample_with",
           "ddim_sample", "dpmpp_2m_sample"]


def as_engine(den) -> DenoiserEngine:
    """An engine as it is; a `CapHumanDenoiser` module wrapped in the eager engine."""
    if isinstance(den, DenoiserEngine):
        return den
    from caphuman.engines.eager_engine import EagerEngine
    return EagerEngine(den)


@torch.no_grad()
def sample_with(sampler: str | Sampler, den, noise: torch.Tensor, text_cond: torch.Tensor, text_uncond: torch.Tensor,
                hint: torch.Tensor, identity_context: torch.Tensor, steps: int = 20, guidance: float = 7.0,
                eta: float = 0.0, strength: float | Sequence[float] = 1.0, tau: float = 0, *, cfg: str = "batched",
                generators: Sequence[torch.Generator] | None = None,
                callback: Callable[[int, int, torch.Tensor], None] | None = None,
                person_strength: Sequence[float] | None = None) -> torch.Tensor:
    """Final latents x_0 from `noise` [N,4,h,w] with any registered sampler.

    text_cond/text_uncond: [1 or N, 77, C]; hint: [1 or N, 9, 8h, 8w]; identity_context: [1 or N, 258, C];
    several people: lists of hints and identity contexts, one per person (`person_strength`: one scale each).
    `generators` (one per sample) draw the per-step noise of stochastic samplers; `callback(i, total, x)`
    is called after each step (progress bars, previews)."""
    cond = Conditioning(text_cond, text_uncond, hint, identity_context, guidance=guidance, strength=strength,
                        tau=tau, cfg=cfg, person_strength=person_strength)
    return sample(as_engine(den), noise, cond, steps=steps, sampler=sampler, eta=eta, generators=generators,
                  callback=callback)


@torch.no_grad()
def ddim_sample(den, noise: torch.Tensor, text_cond: torch.Tensor, text_uncond: torch.Tensor,
                hint: torch.Tensor, identity_context: torch.Tensor, steps: int = 20, guidance: float = 7.0,
                eta: float = 0.0, strength: float | Sequence[float] = 1.0, tau: float = 0, *,
                cfg: str = "batched", generators: Sequence[torch.Generator] | None = None,
                callback: Callable[[int, int, torch.Tensor], None] | None = None,
                person_strength: Sequence[float] | None = None) -> torch.Tensor:
    """Final DDIM latents x_0 from `noise` [N,4,h,w], exactly as the official sampler computes them (for one
    person, or several: lists of hints and identity contexts, as the official code's list of conds)."""
    return sample_with("ddim", den, noise, text_cond, text_uncond, hint, identity_context, steps, guidance, eta,
                       strength, tau, cfg=cfg, generators=generators, callback=callback,
                       person_strength=person_strength)


@torch.no_grad()
def dpmpp_2m_sample(den, noise: torch.Tensor, text_cond: torch.Tensor, text_uncond: torch.Tensor,
                    hint: torch.Tensor, identity_context: torch.Tensor, steps: int = 12, guidance: float = 7.0,
                    strength: float | Sequence[float] = 1.0, tau: float = 0, *, cfg: str = "batched",
                    callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), an option for fewer steps; not the official sampler (DDIM stays the default)."""
    return sample_with("dpmpp_2m", den, noise, text_cond, text_uncond, hint, identity_context, steps, guidance, 0.0,
                       strength, tau, cfg=cfg, callback=callback)
