"""The one factory: a `DenoiserEngine` from a backend name and options.

    engine = create_engine("torch", den, device="cuda", dtype=torch.float16)
    engine = create_engine("onnxruntime", den, engine_dir="onnx/")        # graphs exported from den if absent
    engine = create_engine("tensorrt", None, config=cfg, engine_dir="engines/", alphas_cumprod=...)

Backends:
- eager: the PyTorch modules as they are (the reference; `cfg="serial"` is the official way of running);
- torch: the fast engine (fp16 or fp32, Triton attention, cross-attention K/V once per request, one CUDA
  graph per step on the GPU; `compile=True` adds torch.compile; `engine_dir` (compile implied): the
  compiled artifacts `caphuman build --backend torch` wrote there, loaded before anything compiles);
- onnxruntime: the `capface` + `unet` (+ `denoiser`) ONNX graphs from `engine_dir`, exported there (or into a
  temporary folder) from the given denoiser's weights when the folder lacks them;
- tensorrt: the TensorRT plans `caphuman build` wrote into `engine_dir` (its `engines.json`);
- tensorrt-rtx: the same with TensorRT for RTX engines (`caphuman build --backend tensorrt-rtx`), on RTX GPUs.
The CLI, the pipeline, the server and the benchmarks all build their engine here.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from caphuman.export.models import CapHumanDenoiser
from caphuman.export.onnx_specs import graph_specs

from .base import EngineError
from .catalog import BACKENDS
from .denoiser import DenoiserEngine

log = logging.getLogger(__name__)

ONNX_DENOISER_GRAPHS = ("capface", "unet", "denoiser")
EXTRA_CONTROLNET_BACKENDS = ("eager", "torch")


def create_engine(backend: str, den: CapHumanDenoiser | None, *, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, engine_dir: str | Path | None = None, config=None,
                  alphas_cumprod: torch.Tensor | None = None, **torch_options) -> DenoiserEngine:
    """A denoiser engine of `backend` (see the module docstring). `den` is the loaded denoiser (its
    weights, schedule and extra ControlNets); the tensorrt backend needs only `config` and
    `alphas_cumprod` when no module is loaded. `torch_options` go to `TorchDenoiserEngine`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if den is not None and den.extra_controls and backend not in EXTRA_CONTROLNET_BACKENDS:
        raise ValueError(f"extra ControlNets run on the {' and '.join(EXTRA_CONTROLNET_BACKENDS)} backends, "
                         f"not on {backend!r} (their graphs have no ControlNet inputs)")
    if torch_options and backend != "torch":
        raise ValueError(f"options {sorted(torch_options)} apply to the torch backend only, not {backend!r}")
    if backend == "eager":
        from .eager_engine import EagerEngine

        _need(den, backend)
        return EagerEngine(den.to(device or next(den.parameters()).device, dtype or next(den.parameters()).dtype))
    if backend == "torch":
        from .torch_engine import TorchDenoiserEngine

        _need(den, backend)
        if engine_dir is not None:  # the folder of `caphuman build --backend torch`: the compiled engine's artifacts
            if not torch_options.setdefault("compile", True):
                raise ValueError("an engine folder holds compiled torch artifacts: drop compile=False, or the folder")
        engine = TorchDenoiserEngine(den, device=device or next(den.parameters()).device,
                                     dtype=dtype or next(den.parameters()).dtype, **torch_options)
        if engine_dir is not None:
            from .torch_artifacts import load_artifacts

            # before the first request: inductor must find the artifacts in its caches when it compiles
            engine.artifacts = load_artifacts(engine, engine_dir) or {"torch_artifacts": None}
        return engine
    config = config if config is not None else _need(den, backend).config
    schedule = alphas_cumprod if alphas_cumprod is not None else _need(den, backend).alphas_cumprod
    specs = graph_specs(config)
    from .graph_engine import GraphDenoiserEngine

    if backend == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        if dtype not in (None, torch.float32):
            raise ValueError("the onnxruntime backend runs the fp32 graphs; drop --fp16")
        folder, temporary, artifacts = _onnx_dir(den, engine_dir)
        try:
            graphs = {g: OnnxRuntimeEngine(folder / f"{g}.onnx", specs[g]) for g in ONNX_DENOISER_GRAPHS}
        finally:
            if temporary:  # the sessions have read the graphs (and their external data) into memory
                shutil.rmtree(folder, ignore_errors=True)
        device = torch.device(device or "cpu")
        engine = GraphDenoiserEngine(graphs["capface"], graphs["unet"], schedule, dtype=torch.float32,
                                     denoiser=graphs["denoiser"], device=device,
                                     backend="onnxruntime-" + "+".join(graphs["unet"].providers),
                                     hint_channels=config.capface.hint_channels)
        engine.artifacts = artifacts  # what ran, for the outputs' metadata
        return engine
    from .tensorrt_engine import TensorRTEngine
    from .tensorrt_library import TensorRTUnavailable, library

    trt_library = library(backend)
    try:
        trt_library.load()
        trt_library.check_device()
    except TensorRTUnavailable as e:
        raise ValueError(f"the {backend} backend: {e}") from None
    if engine_dir is None:
        raise ValueError(f"the {backend} backend needs an engine folder (the one `caphuman build --out` wrote)")
    index = Path(engine_dir) / "engines.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: run `caphuman build --backend {backend} --out {engine_dir}` first")
    plans = json.loads(index.read_text())
    missing = [g for g in ("capface", "unet") if g not in plans]
    if missing:
        raise EngineError(f"{index} has no engines for {missing}")
    graphs = {g: TensorRTEngine(Path(engine_dir) / plans[g]["plan"], specs[g], library=trt_library)
              for g in ("capface", "unet")}
    return GraphDenoiserEngine(graphs["capface"], graphs["unet"], schedule, dtype=graphs["unet"].float_dtype,
                               device=device or "cuda", backend=backend, hint_channels=config.capface.hint_channels)


def _need(den: CapHumanDenoiser | None, backend: str) -> CapHumanDenoiser:
    if den is None:
        raise ValueError(f"the {backend} backend needs the loaded denoiser")
    return den


class ForeignGraphsError(EngineError, ValueError):
    """Graphs (or engines) made from other weights than the loaded ones: refused, never run."""


def _manifest_entries(folder: Path) -> dict:
    manifest = folder / "manifest.json"
    return json.loads(manifest.read_text()).get("graphs", {}) if manifest.is_file() else {}


def check_graph_weights(folder: Path, fingerprint: str, graphs=ONNX_DENOISER_GRAPHS) -> dict:
    """The manifest entries of `graphs` in `folder`, after checking that they were exported from weights
    with this `weights_fingerprint`; ForeignGraphsError, saying how to rebuild, otherwise."""
    entries = _manifest_entries(folder)
    recorded = {g: entries.get(g, {}).get("weights_sha256") for g in graphs}
    wrong = {g: v for g, v in recorded.items() if v != fingerprint}
    if wrong:
        seen = sorted({str(v)[:12] if v else "not recorded" for v in wrong.values()})
        raise ForeignGraphsError(
            f"the ONNX graphs {sorted(wrong)} in {folder} were not exported from the loaded weights (their weights "
            f"fingerprint: {', '.join(seen)}; the loaded denoiser's: {fingerprint[:12]}); re-export them with the "
            f"same weight flags: caphuman export --only {','.join(graphs)} --out {folder} ..., or give an empty "
            f"or new --engine-dir (or delete {folder}) to have them exported there from the loaded weights (the "
            "built-in demo's random weights are not those of `caphuman export --random-weights`)")
    return {g: entries[g] for g in graphs}


def _has_graphs(folder: Path | None) -> bool:
    return folder is not None and all((folder / f"{g}.onnx").is_file() for g in ONNX_DENOISER_GRAPHS)


def _onnx_dir(den: CapHumanDenoiser | None, engine_dir: str | Path | None) -> tuple[Path, bool, dict]:
    """(folder, whether it is temporary, the graphs' identity): `engine_dir` when it holds the denoiser's
    graphs, exported from these weights (else refused); else export them from `den` into `engine_dir`, or
    into a temporary folder.

    Several processes may start on one `engine_dir` at once (the server's model instances do): the export
    runs under a file lock, into a staging folder whose files are moved in with the `.onnx` files last, so
    a reader never sees a graph without its external data, and the others reuse the first one's graphs."""
    folder = Path(engine_dir) if engine_dir is not None else None
    if _has_graphs(folder):
        return folder, False, _existing_graphs(den, folder)
    if den is None:
        raise FileNotFoundError(f"no ONNX graphs {ONNX_DENOISER_GRAPHS} in {engine_dir} and no weights to export "
                                "them from (run `caphuman export` first)")
    if folder is None:
        out = Path(tempfile.mkdtemp(prefix="caphuman-onnx-"))
        return out, True, _export_denoiser_graphs(den, out)
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):
        if _has_graphs(folder):  # another process exported them while this one waited
            return folder, False, _existing_graphs(den, folder)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
        try:
            if (folder / "manifest.json").is_file():  # the export merges its entries into the folder's manifest
                shutil.copy2(folder / "manifest.json", staging / "manifest.json")
            identity = _export_denoiser_graphs(den, staging)
            files = sorted(staging.iterdir(), key=lambda f: f.suffix == ".onnx")
            for f in files:
                os.replace(f, folder / f.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder, False, {**identity, "graphs": str(folder.resolve())}


def _existing_graphs(den: CapHumanDenoiser | None, folder: Path) -> dict:
    """The identity of the graphs already in `folder`, checked against the loaded weights when there are any."""
    if den is None:
        log.info("using the ONNX graphs in %s (no loaded weights to check them against)", folder)
        entries, fingerprint = _manifest_entries(folder), None
    else:
        from caphuman.export.fingerprint import weights_fingerprint

        fingerprint = weights_fingerprint(den)
        entries = check_graph_weights(folder, fingerprint)
        log.info("using the ONNX graphs in %s (exported from these weights)", folder)
    return {"graphs": str(folder.resolve()), "weights_sha256": fingerprint,
            "graph_sha256": {g: entries.get(g, {}).get("sha256") for g in ONNX_DENOISER_GRAPHS}}


def _export_denoiser_graphs(den: CapHumanDenoiser, out: Path) -> dict:
    from caphuman.export.fingerprint import weights_fingerprint
    from caphuman.export.onnx_export import ExportSources, export_graphs

    log.info("exporting capface/unet/denoiser graphs from the loaded weights into %s", out)
    p = next(den.parameters())
    device, dtype = p.device, p.dtype
    try:
        reports = export_graphs(ExportSources(den.config, denoiser=den.float().cpu()), ONNX_DENOISER_GRAPHS, out,
                                validate=False, progress=False)
        fingerprint = weights_fingerprint(den)
    finally:
        den.to(device, dtype)
    return {"graphs": "exported from the loaded weights", "weights_sha256": fingerprint,
            "graph_sha256": {r.name: r.sha256 for r in reports}}


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on `folder` across processes (held until the block ends)."""
    with open(folder / ".export.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
