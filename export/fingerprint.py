"""The content fingerprint of a network's weights: what exported graphs and engines record and what a loader
compares, so that graphs made from other weights are refused instead of run.

sha256 over every state-dict entry in key order: its name, shape and float32 bytes (float32, so that the
fingerprint does not depend on the dtype the module happens to be in; fp16 weights are exact in float32).
Cost: one pass over the weights at memory speed, instant on the tiny model and of the order of a second
on the official denoiser (~1.4 GB of fp32 CapFace + UNet), once per process (callers cache it).
"""
from __future__ import annotations

import hashlib

from torch import nn


def weights_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks (multi-GB checkpoints and graphs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()
