"""Where the tests' files are: the checkout, and the real photos and reference data under tests/data."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
FACES = DATA / "faces"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


def face_photo(name: str) -> Path:
    """One of the real face photos under tests/data/faces."""
    path = FACES / name
    if not path.is_file():
        raise FileNotFoundError(f"test photo {path} is missing from the checkout")
    return path


def face_photos() -> list[Path]:
    """Every real face photo under tests/data/faces, in name order."""
    photos = sorted(p for p in FACES.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise FileNotFoundError(f"no test photos in {FACES}")
    return photos
