"""The sampling loop: the one loop every sampler runs on every engine."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .denoiser import Conditioning, DenoiserEngine
from .samplers import DEFAULT_SAMPLER, Sampler, get_sampler, make_plan, step_noise

StepCallback = Callable[[int, int, torch.Tensor], None]


@torch.no_grad()
def sample(engine: DenoiserEngine, noise: torch.Tensor, cond: Conditioning, *, steps: int = 20,
           sampler: str | Sampler = DEFAULT_SAMPLER, eta: float = 0.0,
           generators: Sequence[torch.Generator] | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """Final latents (float32 [N, 4, h, w], x_t at the alpha_bar[0] level) from `noise`.

    `generators` (one per sample) draw the per-step noise of stochastic samplers (DDIM with eta > 0,
    Euler ancestral), so each image depends on its own seed only. `callback(i, total, x)` runs after
    each step (progress bars, previews, cancellation by raising); its x may be an engine's buffer,
    valid until the next step.
    """
    if noise.ndim != 4:
        raise ValueError(f"noise must be [N, C, h, w], got shape {tuple(noise.shape)}")
    sampler = get_sampler(sampler)
    plan = make_plan(sampler, engine.alphas_cumprod, steps, eta)
    engine.prepare(cond, tuple(noise.shape), sampler, plan)
    try:
        x = noise.to(engine.device, torch.float32)
        if plan.init_scale != 1.0:
            x = x * plan.init_scale
        state = tuple(torch.zeros_like(x) for _ in range(sampler.state_size))
        for i in range(plan.num_steps):
            z = step_noise(x, generators) if plan.noisy else None
            x, state = engine.step(x, state, plan, sampler, i, z)
            if callback is not None:
                callback(i, plan.num_steps, x)
        # a new tensor: an engine may step in place in its own buffers
        return x * plan.final_scale if plan.final_scale != 1.0 else x.clone()
    finally:
        engine.finish()
