"""caphuman.runtime.outputs: the fast PNG encoder is lossless and keeps the parameters' text chunk."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from caphuman.runtime.outputs import encode_png, save_png_with_sidecar


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (33, 64, 4), (9, 17), (512, 512, 3)])
@pytest.mark.parametrize("level", [0, 1, 6])
def test_encode_png_is_lossless_with_text(shape, level):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(image, {"caphuman": json.dumps({"seed": 3}), "note": "é ☃"}, level=level)
    png = Image.open(io.BytesIO(data))
    png.load()
    np.testing.assert_array_equal(np.asarray(png), image)
    assert json.loads(png.text["caphuman"]) == {"seed": 3} and png.text["note"] == "é ☃"


def test_encode_png_rejects_what_it_cannot_write():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="level"):
        encode_png(np.zeros((4, 4, 3), np.uint8), level=10)


def test_encode_png_is_smaller_than_raw_on_a_smooth_image():
    y, x = np.mgrid[0:256, 0:256]
    image = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    assert len(encode_png(image)) < image.nbytes / 4


def test_save_png_with_sidecar(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    png, sidecar = save_png_with_sidecar(image, tmp_path / "out" / "a.png", {"prompt": "x", "seed": 7})
    with Image.open(png) as im:
        np.testing.assert_array_equal(np.asarray(im), image)
        assert json.loads(im.text["caphuman"]) == {"prompt": "x", "seed": 7}
    assert json.loads(sidecar.read_text()) == {"prompt": "x", "seed": 7}
    assert sorted(p.name for p in png.parent.iterdir()) == ["a.json", "a.png"]


def test_parallel_zlib_stream_is_one_valid_stream():
    import zlib

    from caphuman.runtime.outputs import _zlib_parallel
    raw = np.random.default_rng(2).integers(0, 256, 1 << 20, dtype=np.uint8)
    raw[::7] = 0  # some structure
    for level in (0, 1, 6):
        assert zlib.decompress(_zlib_parallel(raw, level)) == raw.tobytes()  # checks the Adler-32 too


def read_only_folder(tmp_path):
    """A folder that refuses new files: permission bits for ordinary users; root ignores those, so for root
    a folder under sysfs (which refuses new files to everyone)."""
    import os
    from pathlib import Path
    if os.geteuid() == 0:
        return Path("/sys/kernel/caphuman-outputs")
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "out"


def test_check_new_outputs_refuses_a_folder_that_takes_no_files(tmp_path):
    from caphuman.runtime.outputs import OutputFolderError, check_new_outputs
    with pytest.raises(OutputFolderError, match="cannot write into"):
        check_new_outputs([read_only_folder(tmp_path) / "a.png"], overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is not a folder"):
        check_new_outputs([tmp_path / "file" / "sub" / "a.png"], overwrite=False)
    check_new_outputs([tmp_path / "new" / "deeper" / "a.png"], overwrite=False)   # creatable: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "the probe leaves nothing behind"


def test_generate_refuses_a_read_only_out_folder_before_generating(tmp_path, capsys):
    import time
    from caphuman.runtime.cli import main
    t0 = time.monotonic()
    rc = main(["generate", "--out", str(read_only_folder(tmp_path)), "--steps", "2", "--resolution", "256"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot write into" in err[0], err
    assert time.monotonic() - t0 < 5, "refused before any model loads"
