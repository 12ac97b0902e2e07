"""Put a pipeline's denoiser on a backend: `attach_backend(pipe, "torch" | "onnxruntime" | "tensorrt")`.

The pipeline (`caphuman.runtime.pipeline.CapHumanPipeline`) keeps its text encoder and VAE; its DDIM loop
runs through `pipe.sampler`, which this sets:
- torch: `TorchDenoiserEngine.sample` (fp16 or fp32, Triton attention, one CUDA graph per step);
- onnxruntime: `EngineSampler` over the `capface` and `unet` graphs (+ `denoiser` for --cfg serial),
  read from `engine_dir` when it holds them, else exported from the pipeline's own weights into it
  (or into a temporary folder);
- tensorrt: `EngineSampler` over TensorRT engines built by `caphuman build` into `engine_dir`.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from caphuman.export.onnx_specs import graph_specs

from .base import EngineError

log = logging.getLogger(__name__)
BACKENDS = ("eager", "torch", "onnxruntime", "tensorrt")
_ORT_GRAPHS = ("capface", "unet", "denoiser")


def _onnx_dir(pipe, engine_dir: str | Path | None) -> Path:
    from caphuman.export.onnx_export import ExportSources, export_graphs

    if engine_dir is not None and all((Path(engine_dir) / f"{g}.onnx").is_file() for g in _ORT_GRAPHS):
        log.info("using the ONNX graphs in %s (they must come from the same weights)", engine_dir)
        return Path(engine_dir)
    out = Path(engine_dir) if engine_dir is not None else Path(tempfile.mkdtemp(prefix="caphuman-onnx-"))
    log.info("exporting capface/unet/denoiser graphs from the loaded weights into %s", out)
    src = ExportSources(pipe.config, denoiser=pipe.denoiser.float().cpu())
    export_graphs(src, _ORT_GRAPHS, out, validate=False, progress=False)
    pipe.denoiser.to(pipe.device)
    return out


def attach_backend(pipe, backend: str, dtype: torch.dtype | None = None, engine_dir: str | Path | None = None) -> None:
    """Route `pipe.generate`'s denoising through `backend` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "eager":
        pipe.sampler, pipe.backend = None, "eager"
        return
    if pipe.denoiser.extra_controls:
        raise ValueError(f"extra ControlNets run on the eager backend only, not on {backend!r}")
    specs = graph_specs(pipe.config)
    if backend == "torch":
        from .torch_engine import TorchDenoiserEngine

        dtype = dtype or pipe.dtype
        engine = TorchDenoiserEngine(pipe.denoiser, device=pipe.device, dtype=dtype)
        pipe.text_encoder.to(dtype)
        pipe.vae.to(dtype)
        pipe.sampler, pipe.backend = engine.sample, f"torch-{str(dtype).removeprefix('torch.')}"
        return
    from .sampler import EngineSampler

    alphas = pipe.denoiser.alphas_cumprod
    if backend == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        if pipe.dtype != torch.float32:
            raise ValueError("--backend onnxruntime runs the fp32 graphs; drop --fp16")

        folder = _onnx_dir(pipe, engine_dir)
        eng = {g: OnnxRuntimeEngine(folder / f"{g}.onnx", specs[g]) for g in _ORT_GRAPHS}
        pipe.sampler = EngineSampler(eng["capface"], eng["unet"], alphas, torch.float32, denoiser=eng["denoiser"])
        pipe.backend = "onnxruntime-" + "+".join(eng["unet"].providers)
        return
    from .tensorrt_engine import TensorRTEngine, TensorRTUnavailable, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        raise ValueError(f"--backend tensorrt: {e}") from None
    if engine_dir is None:
        raise ValueError("--backend tensorrt needs --engine-dir (the folder `caphuman build --out` wrote)")
    index = Path(engine_dir) / "engines.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: run `caphuman build --out {engine_dir}` first")
    plans = json.loads(index.read_text())
    missing = [g for g in ("capface", "unet") if g not in plans]
    if missing:
        raise EngineError(f"{index} has no engines for {missing}")
    eng = {g: TensorRTEngine(Path(engine_dir) / plans[g]["plan"], specs[g]) for g in ("capface", "unet")}
    pipe.sampler = EngineSampler(eng["capface"], eng["unet"], alphas, eng["unet"].float_dtype)
    pipe.backend = "tensorrt"
