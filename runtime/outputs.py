"""Writing results: PNG images with their generation parameters in PNG text chunks and a JSON sidecar."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def save_png_with_sidecar(image: np.ndarray, path: str | Path, parameters: dict) -> tuple[Path, Path]:
    """Write `path` (PNG, parameters in a 'caphuman' text chunk) and `path.json`; atomically, so a
    crash never leaves half a file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(parameters, indent=2, sort_keys=True, default=str)
    info = PngInfo()
    info.add_text("caphuman", text)
    sidecar = path.with_suffix(".json")
    for target, write in ((path, lambda f: Image.fromarray(image).save(f, format="PNG", pnginfo=info)),
                          (sidecar, lambda f: f.write(text.encode() + b"\n"))):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    return path, sidecar
