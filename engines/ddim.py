"""The official DDIM arithmetic (`src/cldm/ddim_hacked.py`): timestep list, per-step coefficients and
the update, computed in float32 in the official operation order.

It lives below both the samplers (`caphuman.runtime.sampling`) and the engines, which capture the update in
their CUDA graphs, so both use one definition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def ddim_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The official (ascending) DDIM timestep list: [1, 51, ..., 951] for 20 steps; 31 entries for 30."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_train_timesteps}], got {steps!r}")
    c = num_train_timesteps // int(steps)
    timesteps = [t + 1 for t in range(0, num_train_timesteps, c)]
    if timesteps[-1] >= num_train_timesteps:
        # c divides T-1 (steps 3, 9, 27, 37, ...): the official list ends at t=T, past the schedule,
        # and the official sampler fails with an IndexError. Say so instead.
        ok = _usable_neighbours(steps, num_train_timesteps)
        raise ValueError(f"steps={steps} is not usable: the official DDIM timestep list would reach "
                         f"t={timesteps[-1]}, past the {num_train_timesteps}-step schedule; use e.g. {ok}")
    return timesteps


def _usable_neighbours(steps: int, total: int) -> list[int]:
    usable = [s for s in range(1, total + 1) if (total - 1) % (total // s)]
    below = [s for s in usable if s < steps][-1:]
    above = [s for s in usable if s > steps][:1]
    return below + above


@dataclass(frozen=True)
class DDIMSchedule:
    timesteps: list[int]          # ascending, as the official list
    alphas: torch.Tensor          # float32 [S]: alphas_cumprod[t]
    alphas_prev: torch.Tensor     # float32 [S]: [alphas_cumprod[0]] + alphas[:-1]
    sigmas: torch.Tensor          # float32 [S]
    sqrt_one_minus_alphas: torch.Tensor  # float32 [S]


def ddim_schedule(alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0) -> DDIMSchedule:
    """`make_ddim_sampling_parameters`: alphas in float32, sigmas computed in float64 then used as float32."""
    ts = ddim_timesteps(steps, alphas_cumprod.shape[0])
    ac = alphas_cumprod.detach().to("cpu", torch.float32)
    alphas = ac[ts]
    alphas_prev = torch.cat([ac[:1], alphas[:-1]])
    a64, p64 = alphas.double(), alphas_prev.double()
    sigmas = eta * torch.sqrt((1 - p64) / (1 - a64) * (1 - a64 / p64))
    return DDIMSchedule(ts, alphas, alphas_prev, sigmas.float(), torch.sqrt(1.0 - alphas))


def ddim_update(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
                sigma_t: torch.Tensor, sqrt_one_minus_at: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """One DDIM step (official `p_sample_ddim`, eps parameterization, no thresholding)."""
    pred_x0 = (x - sqrt_one_minus_at * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev


def _check_finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number, got {value!r}") from e
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def validate_sampling_args(steps, guidance, eta, strength, tau) -> None:
    ddim_timesteps(steps)
    _check_finite("guidance", guidance)
    if _check_finite("eta", eta) < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for s in (strength if isinstance(strength, (list, tuple)) else [strength]):
        _check_finite("strength", s)
    if not 0 <= _check_finite("tau", tau) <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"tau must be in [0, {NUM_TRAIN_TIMESTEPS}], got {tau}")


def step_noise(x: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    if generators is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    if len(generators) != x.shape[0]:
        raise ValueError(f"{len(generators)} generators for {x.shape[0]} samples")
    return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype).to(x.device)
                      for g in generators])
