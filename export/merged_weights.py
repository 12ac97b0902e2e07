"""Merged weights: caphuman.ckpt + SD checkpoint + VAE checkpoint as ONE safetensors file.

`caphuman build --backend torch --weights-out caphuman-merged.safetensors` writes the state dict that
`read_official` merges (the official order and precedence, official key names, each tensor as its file
holds it) with a JSON header under the safetensors metadata key "caphuman":

    {"format": "caphuman-merged-weights", "version": 1, "config": "cldm_v15.yaml",
     "config_sha256": "...", "sources": {"checkpoint": {"name": ..., "bytes": ..., "sha256": ...}, ...}}

Loading it (`caphuman.runtime.pipeline.load_networks`, `--checkpoint FILE` or a weights folder holding
`caphuman-merged.safetensors`) reads the tensors with safetensors straight onto the target device: no
unpickling, no second merge, and the networks are bit-identical to those loaded from the separate files
(the same tensors go through the same key mapping and dtype conversion).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from .checkpoints import CheckpointError
from .fingerprint import file_sha256

MERGED_FORMAT = "caphuman-merged-weights"
MERGED_VERSION = 1
METADATA_KEY = "caphuman"
SOURCE_LABELS = ("checkpoint", "sd_checkpoint", "vae_checkpoint")



def source_record(path: str | Path) -> dict:
    """What the header says of one source file: name, size and full sha256."""
    path = Path(path)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _unshared(state: dict) -> dict:
    """Contiguous tensors, none sharing storage (safetensors refuses shared tensors; torch files may tie some)."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def write_merged_weights(out: str | Path, config_path: str | Path, checkpoint: str | Path,
                         sd_checkpoint: str | Path | None = None, vae_checkpoint: str | Path | None = None,
                         describe: Callable[[Path], dict] | None = None) -> dict:
    """Merge the official files into `out` (written to a temporary name, then renamed); returns the header.
    `describe(path)` adds fields to a source's record (the runtime adds the outputs' short hash of the file,
    so that a merged run's metadata names the same files as a run on the separate ones)."""
    import safetensors.torch

    from .checkpoints import read_official

    config_path, out = Path(config_path), Path(out)
    if merged_metadata(checkpoint) is not None:
        raise CheckpointError(f"{checkpoint} already is a merged weights file")
    state = read_official(checkpoint, sd_checkpoint, vae_checkpoint)
    sources = {label: {**source_record(p), **(describe(Path(p)) if describe else {})}
               for label, p in zip(SOURCE_LABELS, (checkpoint, sd_checkpoint, vae_checkpoint)) if p}
    header = {"format": MERGED_FORMAT, "version": MERGED_VERSION, "config": config_path.name,
              "config_sha256": file_sha256(config_path), "sources": sources}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    safetensors.torch.save_file(_unshared(state), str(tmp), metadata={METADATA_KEY: json.dumps(header)})
    os.replace(tmp, out)  # never leave a half-written file under the final name
    return header


def merged_metadata(path: str | Path | None) -> dict | None:
    """The header of a merged weights file; None for any other file (an official checkpoint, a plain
    safetensors file). Reads the safetensors header only."""
    if not path or Path(path).suffix.lower() != ".safetensors" or not Path(path).is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # the header only: no torch needed
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    if METADATA_KEY not in meta:
        return None
    try:
        header = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its caphuman header is not JSON ({e})") from None
    if header.get("format") != MERGED_FORMAT or header.get("version") != MERGED_VERSION:
        raise CheckpointError(f"{path}: merged weights of format {header.get('format')!r} version "
                              f"{header.get('version')!r}; this release reads {MERGED_FORMAT!r} version {MERGED_VERSION}")
    return header


def read_merged_weights(path: str | Path, config_path: str | Path, device="cpu") -> tuple[dict, dict]:
    """(state dict of tensors on `device`, header) of a merged weights file made for the config at `config_path`."""
    import safetensors.torch
    import torch

    header = merged_metadata(path)
    if header is None:
        raise CheckpointError(f"{path} is not a merged weights file (no caphuman header)")
    if header["config_sha256"] != file_sha256(Path(config_path)):
        raise CheckpointError(f"{path} was merged for the config {header['config']} (sha256 "
                              f"{header['config_sha256'][:12]}), not for {config_path}; merge it again with "
                              "`caphuman build --backend torch --weights-out` and this config")
    try:
        state = safetensors.torch.load_file(str(path), device=str(torch.device(device)))
    except Exception as e:  # a truncated file fails here with safetensors' own error
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    return state, header
