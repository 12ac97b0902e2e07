"""The compiled torch engine as a build artifact: inductor's portable cache artifacts, keyed by content.

`caphuman build --backend torch --out DIR` compiles the engine's step functions (CapFace's residuals, the
UNet's two halves with guidance and the sampler's update) for each batch size and resolution asked, then
saves what inductor compiled (`torch.compiler.save_cache_artifacts()`: FX graph cache, AOTAutograd cache,
Triton autotuning results) as one file:

    DIR/torch-<device>-<key[:12]>.bin     the cache artifacts
    DIR/torch-<device>-<key[:12]>.json    sidecar: key, the fields below, shapes, size and sha256 of the .bin

A fresh process with `create_engine("torch", den, engine_dir=DIR)` loads the artifacts that fit it into
inductor's caches (`torch.compiler.load_cache_artifacts`) before anything compiles, so its first request of
each built shape traces and then finds every compiled kernel in the cache instead of generating and
compiling (and autotuning) it again.

What an artifact depends on, hence its key (`engine_fields`): the network config, the engine's options
(dtype, layout, kernels, rewrites, CUDA graphs, inductor options), torch / Triton / CUDA / Python versions,
the device (GPU name and compute capability; the CPU's vector ISA on the CPU), and the weights' fingerprint
where inductor bakes them in (the `freezing` option; by default weights are graph inputs, so one artifact
serves any weights of the same config). An artifact whose fields differ from the process's is refused with
the fields that differ (StaleArtifactError), never loaded; one whose bytes do not match its sidecar
(truncated, corrupt) is refused as such (ArtifactError).

Trust: inductor's cache entries are code (generated Python and kernels, pickled) that the process runs, so
an artifact folder is as trusted as the installed package: only the build job may write to it. The
sidecar's sha256 catches damage, not a writer that rewrites both files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import torch

from .artifacts import content_key, read_sidecar, write_atomic, write_sidecar
from .base import EngineError

log = logging.getLogger(__name__)

ARTIFACT_KIND = "torch-inductor-cache-artifacts"
ARTIFACT_GLOB = "torch-*.json"


class ArtifactError(EngineError):
    """A torch artifact that cannot be used: truncated, corrupt, or unreadable by this torch."""


class StaleArtifactError(ArtifactError):
    """Torch artifacts built for another config, options, device or software: refused, never loaded."""


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def device_identity(device: torch.device) -> dict:
    """What compiled code is specific to: the GPU's name and compute capability, or the CPU's vector ISA."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "capability": f"sm{major}{minor}"}
    return {"type": device.type, "name": platform.machine(), "capability": torch.backends.cpu.get_cpu_capability()}


def engine_fields(engine) -> dict:
    """Every field a compiled torch engine's artifacts depend on (shapes aside), for `engine`
    (a `TorchDenoiserEngine` built with compile=True; weights fingerprint only where the options bake them in)."""
    if engine.compile_backend != "inductor":
        raise ValueError(f"torch artifacts are inductor's; this engine compiles with {engine.compile_backend!r}")
    options = dict(engine.compile_options or {})
    weights = None
    if options.get("freezing"):  # inductor then folds the weights into the compiled code
        from caphuman.export.fingerprint import weights_fingerprint
        weights = weights_fingerprint(engine.den)
    config = {k: v for k, v in dataclasses.asdict(engine.den.config).items() if k != "path"}  # content, not place
    config = json.dumps(config, sort_keys=True, default=str)
    return {
        "kind": ARTIFACT_KIND,
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "weights_sha256": weights,
        "engine": {"dtype": str(engine.dtype).removeprefix("torch."), "channels_last": engine.channels_last,
                   "fast_attention": engine._attn is not None, "fused_geglu": engine._fused_ff is not None,
                   "rewrite_networks": engine.rewrite_networks, "cuda_graph": engine.cuda_graph,
                   "parallel_side_network": engine._side_stream is not None,
                   "extra_controlnets": len(engine.den.extra_controls)},
        "inductor_options": options,
        "versions": {"torch": torch.__version__, "triton": _triton_version(), "cuda": torch.version.cuda,
                     "python": f"{sys.version_info.major}.{sys.version_info.minor}"},
        "device": device_identity(engine.device),
    }


def artifact_name(fields: dict, key: str) -> str:
    dev = fields["device"]
    tag = dev["capability"] if dev["type"] == "cuda" else dev["type"]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"torch-{tag}-{key[:12]}.bin")


def _differences(recorded: dict, wanted: dict, prefix: str = "") -> list[str]:
    """'field: artifact X, this process Y' for each leaf that differs."""
    out = []
    for k in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: artifact {a!r}, this process {b!r}")
    return out


def save_artifacts(engine, out_dir: str | Path, shapes: list[tuple[int, int, int]], seconds: float) -> Path:
    """Save what this process compiled (call it after running every shape of `shapes`: (batch, height,
    width)) as the artifact of `engine` in `out_dir`; returns the artifact's path."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0]:
        raise ArtifactError("inductor recorded nothing to save: did the compiled engine run (compile=True, "
                            "inductor backend)?")
    data, info = saved
    fields = {**engine_fields(engine), "shapes": [list(s) for s in shapes]}
    key = content_key(fields)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / artifact_name(fields, key)
    write_atomic(path, bytes(data))
    write_sidecar(path, {"key": key, "fields": fields, "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest(), "build_seconds": round(seconds, 1),
                         "entries": {k: len(v) for k, v in info.artifacts.items()}})
    log.info("torch artifacts: %s (%.1f MiB, %s)", path, len(data) / 2**20,
             ", ".join(f"{len(v)} {k}" for k, v in info.artifacts.items()))
    return path


def find_artifacts(folder: str | Path, fields: dict) -> tuple[list[tuple[Path, dict]], list[str]]:
    """(the artifacts in `folder` whose fields equal `fields` (shapes aside), with their sidecars;
    why each other torch artifact there does not fit)."""
    fits, misfits = [], []
    for sidecar_file in sorted(Path(folder).glob(ARTIFACT_GLOB)):
        path = sidecar_file.with_suffix(".bin")
        sidecar = read_sidecar(path)
        if sidecar is None or sidecar.get("fields", {}).get("kind") != ARTIFACT_KIND:
            continue
        recorded = {k: v for k, v in sidecar["fields"].items() if k != "shapes"}
        diff = _differences(recorded, fields)
        if diff:
            misfits.append(f"{path.name}: {'; '.join(diff)}")
        elif content_key(sidecar["fields"]) != sidecar.get("key"):
            misfits.append(f"{path.name}: its sidecar's key does not match its fields (edited sidecar?)")
        else:
            fits.append((path, sidecar))
    return fits, misfits


def _read_checked(path: Path, sidecar: dict) -> bytes:
    """The artifact's bytes, after checking them against the size and sha256 its sidecar recorded."""
    rebuild = f"rebuild it: caphuman build --backend torch --out {path.parent}"
    if not path.is_file():
        raise ArtifactError(f"torch artifact {path} is missing (its sidecar is there); {rebuild}")
    data = path.read_bytes()
    if len(data) != sidecar.get("bytes"):
        raise ArtifactError(f"torch artifact {path} is truncated or damaged: {len(data)} bytes, its sidecar "
                            f"says {sidecar.get('bytes')}; {rebuild}")
    if hashlib.sha256(data).hexdigest() != sidecar.get("sha256"):
        raise ArtifactError(f"torch artifact {path} is corrupt: its sha256 differs from its sidecar's; {rebuild}")
    return data


def load_artifacts(engine, folder: str | Path) -> dict | None:
    """Load the artifacts of `folder` that fit `engine` into inductor's caches (before it compiles anything).
    Returns what was loaded (for the outputs' metadata), or None when `folder` holds no torch artifacts (the
    engine then compiles each shape at its first use). Refuses artifacts that fit nothing here
    (StaleArtifactError, saying which fields differ) and damaged ones (ArtifactError)."""
    folder = Path(folder)
    fields = engine_fields(engine)
    fits, misfits = find_artifacts(folder, fields)
    if not fits and not misfits:
        log.info("no torch artifacts in %s: the engine compiles each batch size and resolution at its first use "
                 "(`caphuman build --backend torch --out %s` builds them once)", folder, folder)
        return None
    if not fits:
        raise StaleArtifactError(
            f"the torch artifacts in {folder} were built for another configuration and are refused: "
            f"{' | '.join(misfits)}. Rebuild them here: caphuman build --backend torch --out {folder} ...")
    started = time.perf_counter()
    loaded, shapes = [], []
    for path, sidecar in fits:
        data = _read_checked(path, sidecar)
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as e:  # inductor's own error types; the bytes matched their sidecar
            info, error = None, f"{type(e).__name__}: {e}"
        else:
            error = "it returned nothing (unreadable bytes: its warning above says why)"
        if info is None:  # torch logs a bad file and returns None instead of raising
            raise ArtifactError(f"torch artifact {path}: torch {torch.__version__} could not load it ({error}); "
                                f"rebuild it: caphuman build --backend torch --out {folder}")
        loaded.append(path.name)
        shapes += [tuple(s) for s in sidecar["fields"]["shapes"]]
    if misfits:
        log.info("torch artifacts in %s that do not fit this process, not loaded: %s", folder, " | ".join(misfits))
    log.info("loaded torch artifacts %s in %.2f s: compiled code for (batch, height, width) %s", loaded,
             time.perf_counter() - started, sorted(set(shapes)))
    return {"torch_artifacts": loaded, "shapes": sorted(set(shapes))}
