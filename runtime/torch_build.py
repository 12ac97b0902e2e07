"""`caphuman build --backend torch`: the compiled torch engine's artifacts and the merged weights file.

The artifacts are compiled by running the same warm-up requests the server runs at start (prompt
"warm-up", 2 steps, the request defaults) at each batch size and resolution asked, so that a process that
loads them finds every function its warm-up compiles in inductor's cache (`caphuman.engines.torch_artifacts`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from caphuman.engines.samplers import DEFAULT_SAMPLER

log = logging.getLogger(__name__)

SERVER_BATCH_SIZES = (1, 2, 4, 8)   # the caphuman model's default batch_sizes (its buckets)
SERVER_RESOLUTIONS = (512,)         # and warm_resolutions


def build_torch_artifacts(networks, out_dir: str | Path, batch_sizes: Sequence[int] = SERVER_BATCH_SIZES,
                          resolutions: Sequence[int] = SERVER_RESOLUTIONS, samplers: Sequence[str] = (DEFAULT_SAMPLER,),
                          device: str | torch.device = "cuda", dtype: torch.dtype = torch.float16,
                          compile_options: dict | None = None) -> Path:
    """Compile the torch engine of `networks` for every (sampler, resolution, batch size) and save inductor's
    cache artifacts into `out_dir`; returns the artifact's path."""
    from caphuman.engines.torch_artifacts import save_artifacts

    from .pipeline import GenerationRequest, build_pipeline, sphere_hint

    pipe = build_pipeline(networks, "torch", device=device, dtype=dtype, compile=True, compile_options=compile_options)
    ctx = torch.zeros(1, 258, networks.config.context_dim)
    started, shapes = time.perf_counter(), []
    for res in resolutions:
        hint = sphere_hint(res)
        for sampler in samplers:
            for b in batch_sizes:
                t0 = time.perf_counter()
                requests = [GenerationRequest(prompt="warm-up", hint=hint, identity_context=ctx, seed=k, steps=2,
                                              sampler=sampler) for k in range(b)]
                pipe.denoise(requests, batch_size=b)
                if pipe.engine.device.type == "cuda":
                    torch.cuda.synchronize(pipe.engine.device)
                log.info("compiled batch %d at %dx%d (%s) in %.1f s", b, res, res, sampler, time.perf_counter() - t0)
                shapes.append((b, res, res))
    return save_artifacts(pipe.engine, out_dir, shapes, time.perf_counter() - started)


def write_merged(out: str | Path, config_path: str | Path, checkpoint, sd_checkpoint=None, vae_checkpoint=None) -> dict:
    """The merged weights file (`caphuman.export.merged_weights`), each source recorded with the short hash
    the outputs' metadata gives it."""
    from caphuman.export.merged_weights import write_merged_weights

    from .pipeline import file_hash

    return write_merged_weights(out, config_path, checkpoint, sd_checkpoint, vae_checkpoint,
                                describe=lambda p: {"short": file_hash(p)})
