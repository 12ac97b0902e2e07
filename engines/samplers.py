"""Samplers: small pure functions over a precomputed schedule (k-diffusion style), one signature for all.

A sampler is two functions and a flag or two (`Sampler`):
- `plan(alphas_cumprod, steps, eta) -> Plan`: everything that depends on the step index, computed once
  before the loop: the integer timestep the model sees at each step, the factor the model's input is
  scaled by, and the update's per-step scalars as one float32 row per step (`Plan.coeffs`);
- `update(x, eps, c, state, noise) -> (x_next, state)`: one step, pure tensor arithmetic with no
  branch on the step index (the per-step values come in `c`), so that an engine can capture it in a
  CUDA graph with the network that computes `eps`. `state` is a tuple of `state_size` latent-shaped
  tensors a multistep method carries between steps (zeros before the first step).

`caphuman.engines.loop.sample` runs any sampler on any engine; adding a sampler is one `Sampler(...)` and
`register_sampler`. Built in: `ddim` (the official sampler, integer timesteps and float32 operation
order of `src/cldm/ddim_hacked.py`: the default and the parity reference), `dpmpp_2m`
(DPM-Solver++(2M), Lu et al. 2022) and `euler_a` (Euler ancestral), the latter two in k-diffusion's
variables x = x_t / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar), integrating from where
the official 20-step DDIM starts (t = 951) to where its last step lands (the alpha_bar[0] level), so
that all three return x_t at the same noise level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .catalog import DEFAULT_SAMPLER, NUM_TRAIN_TIMESTEPS, SAMPLER_DOCS

K_DIFFUSION_START = 951   # the first timestep of the official 20-step DDIM


@dataclass(frozen=True)
class Plan:
    """A sampler's precomputed schedule for one (steps, eta)."""
    timesteps: list[int]          # the model's integer timestep at each step, in the order they run
    model_scale: torch.Tensor     # float32 [S]: the model sees x * model_scale[i]
    coeffs: torch.Tensor          # float32 [S, K]: the update's scalars at each step
    init_scale: float             # x before the first step = noise * init_scale
    final_scale: float            # the returned latents = x * final_scale (x_t at the alpha_bar[0] level)
    noisy: bool                   # the update takes fresh Gaussian noise at every step

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


Update = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple, "torch.Tensor | None"], tuple]


@dataclass(frozen=True)
class Sampler:
    name: str
    plan: Callable[[torch.Tensor, int, float], Plan]
    update: Update
    state_size: int = 0           # latent-shaped tensors carried from step to step
    uses_eta: bool = False        # eta is one of its parameters (others reject eta != 0)
    doc: str = ""


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> Sampler:
    """Make `sampler` available by name to every engine, the pipeline, the CLI and the server."""
    SAMPLERS[sampler.name] = sampler
    return sampler


def get_sampler(sampler: str | Sampler) -> Sampler:
    if isinstance(sampler, Sampler):
        return sampler
    try:
        return SAMPLERS[sampler]
    except KeyError:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}") from None


def make_plan(sampler: str | Sampler, alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0) -> Plan:
    """`sampler.plan`, after the checks every sampler shares."""
    sampler = get_sampler(sampler)
    eta = _finite("eta", eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta and not sampler.uses_eta:
        raise ValueError(f"eta applies to DDIM only; the {sampler.name} sampler takes none (got eta={eta})")
    return sampler.plan(alphas_cumprod.detach().to("cpu", torch.float32), steps, eta)


def _finite(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number, got {value!r}") from e
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_steps(steps, low: int, high: int, what: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not low <= steps <= high:
        raise ValueError(f"{what} steps must be an integer in [{low}, {high}], got {steps!r}")
    return int(steps)


def step_noise(x: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Fresh N(0, 1) noise shaped like x: sample i's from its own generator when given (reproducible
    per image, whatever the batch)."""
    if generators is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    if len(generators) != x.shape[0]:
        raise ValueError(f"{len(generators)} generators for {x.shape[0]} samples")
    return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype).to(x.device)
                      for g in generators])


# ------------------------------------------------------------------------------------------ DDIM
def ddim_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The official (ascending) DDIM timestep list: [1, 51, ..., 951] for 20 steps; 31 entries for 30."""
    steps = _check_steps(steps, 1, num_train_timesteps, "DDIM")
    c = num_train_timesteps // steps
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


def ddim_plan(alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0) -> Plan:
    """`make_ddim_sampling_parameters`: alphas in float32, sigmas computed in float64 then used as
    float32; the last step's alpha_prev is alphas_cumprod[0] (not 1). Steps run from the largest t."""
    ts = ddim_timesteps(steps, alphas_cumprod.shape[0])
    ac = alphas_cumprod.to(torch.float32)
    alphas = ac[ts]
    alphas_prev = torch.cat([ac[:1], alphas[:-1]])
    a64, p64 = alphas.double(), alphas_prev.double()
    sigmas = (eta * torch.sqrt((1 - p64) / (1 - a64) * (1 - a64 / p64))).float()
    coeffs = torch.stack([alphas, alphas_prev, sigmas, torch.sqrt(1.0 - alphas)], dim=1).flip(0)
    n = len(ts)
    return Plan(ts[::-1], torch.ones(n), coeffs.contiguous(), 1.0, 1.0, noisy=eta > 0)


def ddim_update(x: torch.Tensor, eps: torch.Tensor, c: torch.Tensor, state: tuple = (),
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
    """One DDIM step (official `p_sample_ddim`, eps parameterization, no thresholding);
    c = [alpha_t, alpha_prev, sigma_t, sqrt(1 - alpha_t)]."""
    a_t, a_prev, sigma_t, sqrt_one_minus_at = c[0], c[1], c[2], c[3]
    pred_x0 = (x - sqrt_one_minus_at * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, state


# ------------------------------------------------------------------------- k-diffusion variables
def k_diffusion_timesteps(steps: int, start: int = K_DIFFUSION_START) -> list[int]:
    """Integer timesteps from `start` down to 1, evenly spaced."""
    steps = _check_steps(steps, 2, start, "DPM-Solver++ / Euler")
    return [int(round(t)) for t in np.linspace(start, 1, steps)]


def _sigmas(alphas_cumprod: torch.Tensor, timesteps: list[int]) -> list[float]:
    """sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) at each timestep, then at alpha_bar[0] (the end)."""
    ac = alphas_cumprod.to(torch.float64)
    return [math.sqrt((1 - float(ac[t])) / float(ac[t])) for t in timesteps] + [math.sqrt((1 - float(ac[0])) / float(ac[0]))]


def _k_plan(alphas_cumprod, timesteps, rows, noisy) -> Plan:
    sig = _sigmas(alphas_cumprod, timesteps)
    ac = alphas_cumprod.to(torch.float64)
    return Plan(timesteps, torch.tensor([1.0 / math.sqrt(1.0 + s * s) for s in sig[:-1]], dtype=torch.float32),
                torch.tensor(rows, dtype=torch.float32), 1.0 / math.sqrt(float(ac[timesteps[0]])),
                math.sqrt(float(ac[0])), noisy)


def dpmpp_2m_plan(alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0, start: int = K_DIFFUSION_START) -> Plan:
    """c = [sigma, a, b, sigma_next / sigma, -expm1(-h)]: the second-order combination d = a*denoised
    - b*previous_denoised (a = 1, b = 0 at the first step) and the exponential-integrator step."""
    ts = k_diffusion_timesteps(steps, start)
    sig = _sigmas(alphas_cumprod, ts)
    rows = []
    for i in range(len(ts)):
        h = math.log(sig[i] / sig[i + 1])
        if i == 0:
            a, b = 1.0, 0.0
        else:
            r = math.log(sig[i - 1] / sig[i]) / h
            a, b = 1 + 1 / (2 * r), 1 / (2 * r)
        rows.append([sig[i], a, b, sig[i + 1] / sig[i], -math.expm1(-h)])
    return _k_plan(alphas_cumprod, ts, rows, noisy=False)


def dpmpp_2m_update(x, eps, c, state, noise=None):
    sigma, a, b, ratio, step = c[0], c[1], c[2], c[3], c[4]
    denoised = x - sigma * eps
    d = a * denoised - b * state[0]
    return ratio * x + step * d, (denoised,)


def euler_ancestral_plan(alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0,
                         start: int = K_DIFFUSION_START) -> Plan:
    """c = [sigma_down - sigma, sigma_up] (k-diffusion's `get_ancestral_step` at eta 1)."""
    ts = k_diffusion_timesteps(steps, start)
    sig = _sigmas(alphas_cumprod, ts)
    rows = []
    for s, s_next in zip(sig[:-1], sig[1:]):
        up = min(s_next, math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        down = math.sqrt(s_next ** 2 - up ** 2)
        rows.append([down - s, up])
    return _k_plan(alphas_cumprod, ts, rows, noisy=True)


def euler_ancestral_update(x, eps, c, state, noise=None):
    return x + eps * c[0] + noise * c[1], state


DDIM = register_sampler(Sampler("ddim", ddim_plan, ddim_update, uses_eta=True, doc=SAMPLER_DOCS["ddim"]))
DPMPP_2M = register_sampler(Sampler("dpmpp_2m", dpmpp_2m_plan, dpmpp_2m_update, state_size=1,
                                    doc=SAMPLER_DOCS["dpmpp_2m"]))
EULER_A = register_sampler(Sampler("euler_a", euler_ancestral_plan, euler_ancestral_update,
                                   doc=SAMPLER_DOCS["euler_a"]))
assert DEFAULT_SAMPLER in SAMPLERS


def check_sampler_args(sampler: str | Sampler, steps: int, eta: float = 0.0) -> None:
    """Raise the ValueError that `make_plan` would for these steps and eta, before any model is run."""
    make_plan(sampler, _REFERENCE_SCHEDULE, steps, eta)


# any valid schedule of the training length: the timestep lists depend on its length only
_REFERENCE_SCHEDULE = torch.linspace(0.9991, 0.0047, NUM_TRAIN_TIMESTEPS)
