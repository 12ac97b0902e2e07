"""The names the command line offers, importable without torch: `caphuman --help` must not load torch.

The engines and samplers themselves live in `factory.py` and `samplers.py`, which take their names and
one-line descriptions from here (a sampler registered later at run time is accepted by the pipeline,
but not offered on the command line).
"""
from __future__ import annotations

NUM_TRAIN_TIMESTEPS = 1000

BACKENDS = ("eager", "torch", "onnxruntime", "tensorrt", "tensorrt-rtx")

# built-in samplers: name -> one-line description
SAMPLER_DOCS = {
    "ddim": "the official DDIM (integer timesteps, eta), the default",
    "dpmpp_2m": "DPM-Solver++(2M): second order multistep, for 10-15 steps",
    "euler_a": "Euler ancestral: stochastic, fresh noise every step",
}
DEFAULT_SAMPLER = "ddim"
