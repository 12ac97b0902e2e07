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
    check_finite(n["guidance"], guidance)
    check_eta(n["eta"], eta)
    for s in (strength if isinstance(strength, (list, tuple)) else [strength]):
        check_finite(n["strength"], s)
    check_tau(n["tau"], tau)
    check_sampler(n["sampler"], sampler)
