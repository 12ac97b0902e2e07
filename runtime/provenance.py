"""What an output was made from, for its sidecar: every command-line option as given, and the path and
content hash of every input file, so that the same command reproduces the same image."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

FULL_HASH_MAX_BYTES = 64 << 20   # photos, .npy inputs: hashed whole; weights files above: head, tail and size


def file_record(path: str | Path) -> dict:
    """{"path": absolute path, "sha256": ...} of a file; a folder gets its path only. Files above
    FULL_HASH_MAX_BYTES (multi-GB weights) are hashed over their first and last 16 MiB and their size
    ("sha256_head_tail"), which tells checkpoints apart at a fraction of the cost."""
    p = Path(path).resolve()
    if not p.is_file():
        return {"path": str(p)}
    size = p.stat().st_size
    if size <= FULL_HASH_MAX_BYTES:
        return {"path": str(p), "bytes": size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 24))
        f.seek(-(1 << 24), 2)
        h.update(f.read())
    return {"path": str(p), "bytes": size, "sha256_head_tail": h.hexdigest()}


def command_record(command: str, args: argparse.Namespace, file_options: tuple[str, ...],
                   skip: tuple[str, ...] = ("func", "verbose", "command")) -> dict:
    """{"command", "options": every option by its dest, "files": file_record of every given file option}."""
    def plain(v):
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    options = {k: plain(v) for k, v in sorted(vars(args).items()) if k not in skip}
    files = {k: [file_record(v) for v in options[k]] if isinstance(options[k], list) else file_record(options[k])
             for k in file_options if options.get(k)}
    return {"command": command, "options": options, "files": files, "versions": versions()}


def versions() -> dict:
    """The software that made an output: this package, Python, and torch where it is loaded."""
    import importlib.metadata
    import platform
    import sys
    try:
        ours = importlib.metadata.version("caphuman-rt")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
        ours = None
    torch = sys.modules.get("torch")
    return {"caphuman-rt": ours, "python": platform.python_version(),
            "torch": getattr(torch, "__version__", None) if torch is not None else None}
