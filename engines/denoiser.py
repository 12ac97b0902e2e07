"""The denoiser-engine contract: what every backend implements, and what the sampling loop calls.

Per request an engine is prepared once with the request's `Conditioning` (text pair, hint, identity
context, guidance, CapFace strength, ID dropout): it does all the step-independent work there (the
guided hint, cross-attention K/V of the constant contexts, static buffers). Per step it returns the
classifier-free-guided eps of the batch at an integer timestep: CapFace once, the UNet once on the
[cond, uncond] pair (`cfg="batched"`; `"serial"` is the official two passes, kept as the reference mode
on the eager engine, and computes the same value). `step` is eps plus the sampler's update; an engine
may run both as one captured CUDA graph.

An engine serves one request at a time: `prepare` replaces the previous request's state.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from caphuman.export.people import PeopleFields, as_people, check_person_strength

from .samplers import Plan, Sampler

NUM_IDENTITY_TOKENS = 258


@dataclass
class Conditioning(PeopleFields):
    """One request's conditions; tensors of batch 1 are shared by every sample of the batch. Several people:
    `hint` and `identity_context` are lists with one entry per person (each person's residuals are masked by
    that person's head mask and the contributions summed, as the official code does for a list of conds)."""
    text_cond: torch.Tensor              # [1 or N, 77, C]
    text_uncond: torch.Tensor            # [1 or N, 77, C]
    hint: torch.Tensor | Sequence[torch.Tensor]              # [1 or N, 9, H, W] raw hint (normal | albedo | shading)
    identity_context: torch.Tensor | Sequence[torch.Tensor]  # [1 or N, 258, C]
    guidance: float = 7.0
    strength: float | Sequence[float] = 1.0   # CapFace residual scale: one, or one per residual
    tau: float = 0.0                     # ID dropout: the identity context is off where t > tau (0: off)
    cfg: str = "batched"
    person_strength: Sequence[float] | None = None   # one scale per person, times `strength` (default 1 each)

    def check(self, batch: int, height: int, width: int, hint_channels: int, num_residuals: int) -> None:
        """Shapes against the batch and the latents' size; finite scalars. ValueError says what is wrong."""
        for name in ("guidance", "tau"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        strengths = list(self.strength) if isinstance(self.strength, (list, tuple)) else [self.strength]
        if len(strengths) not in (1, num_residuals) or not all(math.isfinite(float(s)) for s in strengths):
            raise ValueError(f"strength needs 1 or {num_residuals} finite per-residual scales, got {self.strength!r}")
        if self.cfg not in ("batched", "serial"):
            raise ValueError(f"cfg must be 'batched' or 'serial', got {self.cfg!r}")
        hints, contexts = as_people(self.hint, self.identity_context)
        check_person_strength(self.person_strength, len(hints))
        for hint in hints:
            if hint.ndim != 4 or hint.shape[1] != hint_channels:
                raise ValueError(f"hint must be [N, {hint_channels}, H, W], got shape {tuple(hint.shape)}")
            if tuple(hint.shape[-2:]) != (height, width):
                raise ValueError(f"hint is {tuple(hint.shape[-2:])}, expected 8x the latent size "
                                 f"{(height // 8, width // 8)}")
        for name, t in [("text_cond", self.text_cond), ("text_uncond", self.text_uncond),
                        *(("hint", h) for h in hints), *(("identity_context", c) for c in contexts)]:
            if t.shape[0] not in (1, batch):
                raise ValueError(f"{name} has batch {t.shape[0]}, expected 1 or {batch}")
        for ctx in contexts:
            if ctx.ndim != 3:
                raise ValueError(f"identity context must be [N, tokens, C], got {tuple(ctx.shape)}")

    @property
    def strengths(self) -> list[float]:
        return [float(s) for s in self.strength] if isinstance(self.strength, (list, tuple)) else [float(self.strength)]

    def strength_vector(self, n: int) -> torch.Tensor:
        """[n] float32 per-residual scales (the graphs' `strength` input)."""
        s = self.strengths
        return torch.tensor(s * n if len(s) == 1 else s, dtype=torch.float32)

    def identity_on(self, t: int) -> bool:
        """ID dropout at timestep t: the identity context is used where t <= tau (always when tau is 0)."""
        return not self.tau or t <= self.tau


class DenoiserEngine(ABC):
    """A backend's denoiser: `prepare` once per request, then `guided_eps` (or `step`) per step."""

    backend: str = "?"                   # the label generation metadata reports
    device: torch.device
    dtype: torch.dtype                   # the networks' float type
    alphas_cumprod: torch.Tensor         # float32 [T] on the CPU: the schedule the samplers plan with
    hint_channels: int
    num_residuals: int

    def prepare(self, cond: Conditioning, noise_shape: Sequence[int], sampler: Sampler, plan: Plan) -> None:
        """Take this request's conditions for a batch of latents of `noise_shape`, sampled by `sampler`
        along `plan`."""
        n, _, h, w = noise_shape
        cond.check(n, h * 8, w * 8, self.hint_channels, self.num_residuals)
        self._prepare(cond, n, h * 8, w * 8, sampler, plan)

    @abstractmethod
    def _prepare(self, cond: Conditioning, batch: int, height: int, width: int, sampler: Sampler,
                 plan: Plan) -> None:
        """Backend part of `prepare`, on checked conditions."""

    @abstractmethod
    def guided_eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """float32 guided eps [N, 4, h, w] of the model input x (float32) at integer timestep t."""

    def step(self, x: torch.Tensor, state: tuple, plan: Plan, sampler: Sampler, i: int,
             noise: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
        """Step i of `plan`: the next x and sampler state. Engines that capture the step override this."""
        scale = plan.model_scale[i].item()
        x_in = x if scale == 1.0 else x * scale
        eps = self.guided_eps(x_in, plan.timesteps[i])
        return sampler.update(x, eps, self._coeffs_on(plan, x.device)[i], state, noise)

    def _coeffs_on(self, plan: Plan, device: torch.device) -> torch.Tensor:
        """The plan's coefficients on `device`, copied once per request (a copy per step would make the
        host wait for the GPU at every step)."""
        cached = getattr(self, "_plan_coeffs", None)
        if cached is None or cached[0] is not plan or cached[1].device != device:
            cached = (plan, plan.coeffs.to(device))
            self._plan_coeffs = cached
        return cached[1]

    def finish(self) -> None:
        """The request is done: drop references to its tensors (buffers stay for the next one)."""

    def close(self) -> None:
        """Release device memory and backend objects (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def expand_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else t.expand(n, *t.shape[1:])
