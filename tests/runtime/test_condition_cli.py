"""`caphuman condition`: outputs, and bad input (clear error, exit 2, nothing half-written)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from caphuman.runtime.cli import main

from tests.paths import face_photo


def test_condition_writes_pngs_and_hint(tmp_path):
    out = tmp_path / "cond"
    ref, pose = face_photo("reference_196251.png"), face_photo("pose2.png")
    rc = main(["condition", "--reference", str(ref), "--pose", str(pose), "--yaw", "20", "--roll", "-10",
               "--light", "left", "--out", str(out)])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["albedo.png", "condition.json", "hint.npy", "normal.png", "overlay.png", "shading.png"]
    hint = np.load(out / "hint.npy")
    assert hint.shape == (9, 512, 512) and hint.dtype == np.float32
    for name in ("normal.png", "albedo.png", "shading.png", "overlay.png"):
        assert Image.open(out / name).size == (512, 512)
    meta = json.loads((out / "condition.json").read_text())
    assert meta["euler_degrees"]["yaw"] == pytest.approx(20) and meta["euler_degrees"]["roll"] == pytest.approx(-10)
    assert meta["overlay_photo"].endswith("pose2.png") and meta["head"] == "TemplateHead"
    # Existing non-empty folder: refused unless --overwrite.
    assert main(["condition", "--reference", str(ref), "--out", str(out)]) == 2
    assert main(["condition", "--reference", str(ref), "--out", str(out), "--overwrite", "--scale", "0.3"]) == 0
    assert json.loads((out / "condition.json").read_text())["pose"] is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("extra, needle", [
    (["--yaw", "120"], "yaw"),
    (["--center", "0.5", "2"], "center"),
    (["--jaw", "10"], "FLAME"),
    (["--modes", "position,smile"], "smile"),
    (["--light", "disco"], "disco"),
])
def test_bad_controls(tmp_path, capsys, extra, needle):
    out = tmp_path / "o"
    rc = main(["condition", "--reference", str(face_photo("alfw1.png")), "--out", str(out)] + extra)
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_photos(tmp_path, capsys):
    blank = tmp_path / "wall.png"
    Image.new("RGB", (120, 90), (200, 190, 180)).save(blank)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(face_photo("exp_3.jpg").read_bytes()[:3000])
    for photo, needle in ((blank, "no face found in"), (cut, "cut.jpg"), (tmp_path / "none.png", "none.png")):
        out = tmp_path / f"out_{photo.stem}"
        assert main(["condition", "--reference", str(photo), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and str(photo.name) in err
        assert not out.exists()
    # The official fallback, only when asked for.
    out = tmp_path / "fallback"
    assert main(["condition", "--reference", str(blank), "--allow-no-face", "--out", str(out)]) == 0
    assert (out / "hint.npy").is_file()
