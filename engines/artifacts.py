"""Engine artifacts keyed by content, with a JSON sidecar: the one rule that TensorRT plans
(`tensorrt_engine.build_engine`) and compiled torch artifacts (`torch_artifacts`) share.

An artifact `<name>-<key[:12]>.<ext>` sits next to `<name>-<key[:12]>.json`, whose "key" is the sha256 of
every field the artifact depends on (graph or config, weights where baked in, GPU, library versions,
options, shapes). It is reused only when the recomputed key equals the sidecar's, never on "file exists".
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def content_key(fields: dict) -> str:
    """sha256 of `fields` as canonical JSON (sorted keys): any change of any field gives another key."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def sidecar_path(artifact: Path) -> Path:
    return Path(artifact).with_suffix(".json")


def read_sidecar(artifact: Path) -> dict | None:
    """The sidecar of `artifact` (None when there is none or it is not a JSON object)."""
    path = sidecar_path(artifact)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_cached(artifact: Path, key: str) -> bool:
    """Whether `artifact` exists with a sidecar recording this very key."""
    sidecar = read_sidecar(artifact)
    return Path(artifact).is_file() and sidecar is not None and sidecar.get("key") == key


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write under a temporary name, then rename: a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    os.replace(tmp, path)


def write_sidecar(artifact: Path, record: dict) -> Path:
    """Write the sidecar (its "key" and the fields a reader checks); after the artifact itself."""
    if "key" not in record:
        raise ValueError("a sidecar records its artifact's key")
    path = sidecar_path(artifact)
    write_atomic(path, json.dumps(record, indent=1))
    return path
