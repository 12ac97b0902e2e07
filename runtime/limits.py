"""The request limits: the one place that says which generation parameters are accepted.

Read by `GenerationRequest.validate`, the CLI's options and the server's request table
(`caphuman.tritonserver.params`). Every check raises ValueError with the parameter's name, the value and
the accepted range; callers rename it to their own spelling (`--steps`, `STEPS`) through `name`.
"""
from __future__ import annotations

import math

from caphuman.engines.catalog import NUM_TRAIN_TIMESTEPS

MIN_RESOLUTION = 256          # the official range of image sides, in pixels
MAX_RESOLUTION = 1024
RESOLUTION_MULTIPLE = 64      # the UNet's three downsamplings of the 8x latents
MIN_STEPS = 1
MAX_STEPS = NUM_TRAIN_TIMESTEPS
MAX_TAU = NUM_TRAIN_TIMESTEPS
MAX_SEED = 2 ** 32 - 1
MAX_NUM_SAMPLES = 64          # images of one request (CLI --num-samples; the server has its own max_items)
MAX_PROMPT_BYTES = 4096       # per prompt, before tokenizing (CLIP then keeps 77 tokens)
# Finite bounds, wide around what is used (official guidance 5-10, strength 1): values far outside give
# saturated noise, and ones like 1e38 overflow fp16 engines to inf/NaN.
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 100.0   # classifier-free guidance scale (1: text without guidance)
MIN_STRENGTH, MAX_STRENGTH = 0.0, 10.0    # CapFace residual scale (0: no identity/head control)

# The server's bound on one request's work, in denoising steps of a 512x512 image summed over the request's
# images (steps x images x (resolution / 512)^2): 400 is 8 images of 50 steps at 512x512, 2 of 50 at
# 1024x1024, or one of 400 steps. It keeps one request from holding a model instance for long (each step
# at 1024 costs four at 512). `CAPHUMAN_SERVE_SETTINGS` ("max_request_cost") changes it per server.
COST_UNIT_PIXELS = 512 * 512
MAX_REQUEST_COST = 400

RESOLUTION_RULE = f"a multiple of {RESOLUTION_MULTIPLE} in [{MIN_RESOLUTION}, {MAX_RESOLUTION}]"
STEPS_RULE = f"an integer in [{MIN_STEPS}, {MAX_STEPS}]"


def check_finite(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_in_range(name: str, value, low: float, high: float) -> float:
    value = check_finite(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value:g}")
    return value


def check_resolution(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value % RESOLUTION_MULTIPLE \
            or not MIN_RESOLUTION <= value <= MAX_RESOLUTION:
        raise ValueError(f"{name} must be {RESOLUTION_RULE} (the official range), got {value}")
    return int(value)


def check_steps(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_STEPS <= value <= MAX_STEPS:
        raise ValueError(f"{name} must be {STEPS_RULE}, got {value!r}")
    return value


def check_eta(name: str, value) -> float:
    value = check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_tau(name: str, value) -> float:
    value = check_finite(name, value)
    if not 0 <= value <= MAX_TAU:
        raise ValueError(f"{name} must be in [0, {MAX_TAU}], got {value}")
    return value


def check_seed(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, {MAX_SEED}], got {value}")
    return int(value)


def request_cost(steps: int, resolution: int, images: int) -> float:
    """A request's work in 512x512 denoising steps (see MAX_REQUEST_COST)."""
    return steps * images * resolution * resolution / COST_UNIT_PIXELS


def check_request_cost(steps: int, resolution: int, images: int, max_cost: float = MAX_REQUEST_COST) -> float:
    cost = request_cost(steps, resolution, images)
    if cost > max_cost:
        raise ValueError(f"the request asks for {images} image(s) x {steps} steps at {resolution}x{resolution}, "
                         f"{cost:g} steps-at-512x512 of work, over the server's limit of {max_cost:g} "
                         "(fewer steps, images or pixels; or split the request)")
    return cost


def check_sampler(name: str, value: str) -> str:
    from caphuman.engines.samplers import SAMPLERS  # the registry (torch): samplers registered at run time count
    if value not in SAMPLERS:
        raise ValueError(f"{name} must be one of {sorted(SAMPLERS)}, got {value!r}")
    return value


def check_sampling(steps, guidance, eta, strength, tau, sampler: str = "ddim", names: dict | None = None) -> None:
    """The parameters every generation shares, by their Python names unless `names` renames them."""
    n = {"steps": "steps", "guidance": "guidance", "eta": "eta", "strength": "strength", "tau": "tau",
         "sampler": "sampler", **(names or {})}
    check_steps(n["steps"], steps)
    check_in_range(n["guidance"], guidance, MIN_GUIDANCE, MAX_GUIDANCE)
    check_eta(n["eta"], eta)
    for s in (strength if isinstance(strength, (list, tuple)) else [strength]):
        check_in_range(n["strength"], s, MIN_STRENGTH, MAX_STRENGTH)
    check_tau(n["tau"], tau)
    check_sampler(n["sampler"], sampler)
