"""Where the shared test data lives (``../shared`` beside the repository), and a skip if it is absent."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
TESTDATA = SHARED_DIR / "testdata"
FACES_DIR = TESTDATA / "faces"
FLAME_DIR = TESTDATA / "flame"
WEIGHTS_DIR = TESTDATA / "weights"


def shared_path(*parts: str) -> Path:
    """Path under shared/testdata, or skip the test with a reason naming what is missing."""
    path = TESTDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found: {path} (clone the shared/ folder beside the repository)")
    return path


def face_photos() -> list[Path]:
    """Every real photo in shared/testdata/faces (empty if the folder is absent)."""
    if not FACES_DIR.is_dir():
        return []
    return sorted(p for p in FACES_DIR.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
