"""Head conditions from the real photos, and bad photos: missing, unreadable, truncated, huge, faceless."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from caphuman.runtime.condition import ConditionBuilder, FaceAnalyzer, NoFaceError, PhotoError, load_photo
from caphuman.runtime.condition.template import five_points

from tests.paths import face_photo, face_photos


@pytest.fixture(scope="module")
def builder():
    return ConditionBuilder()


@pytest.mark.parametrize("photo", face_photos()[::2],
                         ids=lambda p: p.name if p else "none")
def test_hint_lands_on_the_face(builder, photo):
    cond, ph, _ = builder.build(photo, modes="position")
    det = ph.frame_detection
    mask = np.abs(cond.hint).sum(0) > 0
    # The rendered head's five landmarks land on MTCNN's five points (in the 512 frame).
    pts = (five_points(np.c_[cond.landmarks2d_ndc, np.zeros(68)])[:, :2] + 1) / 2 * 512 - 0.5
    face_size = det.box[2] - det.box[0]
    err = np.linalg.norm(pts - det.landmarks, axis=1)
    assert err.max() < 0.25 * face_size, err
    # Most of the detected face box is covered by the head.
    x1, y1, x2, y2 = np.clip(det.box, 0, 511).astype(int)
    assert mask[y1:y2, x1:x2].mean() > 0.6
    assert cond.hint[2][mask].mean() > 0.3  # facing the camera


def _blank(path, size=(200, 160)):
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    Image.fromarray(np.tile(x, (size[1], 1))).convert("RGB").save(path)
    return path


def test_no_face_is_an_error_naming_the_file(builder, tmp_path):
    blank = _blank(tmp_path / "wall.png")
    ph = builder.analyzer.analyze(blank)
    with pytest.raises(NoFaceError, match="wall.png"):
        builder.build(ph)
    with pytest.raises(NoFaceError, match="wall.png"):
        FaceAnalyzer.facenet_crop(ph)
    # The official fallbacks, only when asked for.
    crop = FaceAnalyzer.facenet_crop(ph, fallback=True)
    assert crop.shape == (3, 160, 160) and 0 <= crop.min() and crop.max() <= 1  # [0, 1], not standardised
    cond, _, _ = builder.build(ph, allow_no_face=True)
    assert (np.abs(cond.hint).sum(0) > 0).mean() > 0.05
    deca = FaceAnalyzer.deca_crop(ph)
    assert deca.box_source == "whole-image"
    # A pose photo without a face is named too.
    ref = builder.analyzer.analyze(face_photo("alfw1.png"))
    with pytest.raises(NoFaceError, match="wall.png"):
        builder.build(ref, ph)


def test_unreadable_truncated_and_huge_photos(tmp_path):
    with pytest.raises(PhotoError, match="missing.jpg"):
        load_photo(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("this is not an image")
    with pytest.raises(PhotoError, match="notes.jpg"):
        load_photo(tmp_path / "notes.jpg")
    data = face_photo("exp_2.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(PhotoError, match="cut.jpg"):
        load_photo(tmp_path / "cut.jpg")
    big = tmp_path / "big.png"
    Image.new("L", (4100, 4100)).save(big)
    with pytest.raises(PhotoError, match="big.png.*4100x4100"):
        load_photo(big)
    with pytest.raises(PhotoError, match="MB"):
        load_photo(face_photo("exp_2.jpg"), max_bytes=1000)
    # RGBA and grey photos become RGB.
    Image.new("RGBA", (50, 40), (10, 20, 30, 0)).save(tmp_path / "a.png")
    Image.new("L", (50, 40), 7).save(tmp_path / "g.png")
    assert load_photo(tmp_path / "a.png").mode == "RGB" and load_photo(tmp_path / "g.png").mode == "RGB"


def test_deca_resize_matches_skimage_rules():
    from caphuman.runtime.condition.images import resize_like_deca
    img = np.asarray(load_photo(face_photo("reference_196251.png")))
    assert img.shape == (512, 512, 3)
    np.testing.assert_array_equal(resize_like_deca(img, 512), img)  # identity at 512 (no truncation loss)
    small = np.asarray(load_photo(face_photo("alfw1.png")))
    up = resize_like_deca(small, 512)
    assert up.shape == (512, 512, 3) and up.dtype == np.uint8
    assert abs(up.astype(float).mean() - small.astype(float).mean()) < 2


def test_exif_orientation_is_applied(tmp_path):
    """A phone portrait stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view") reads upright."""
    upright = Image.open(face_photo("pose1.png")).convert("RGB")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)   # what the sensor stored
    exif = Image.Exif()
    exif[0x0112] = 6                                            # Orientation
    path = tmp_path / "phone.jpg"
    sideways.save(path, quality=95, exif=exif)
    got = load_photo(path)
    assert got.size == upright.size
    diff = np.abs(np.asarray(got, dtype=int) - np.asarray(upright, dtype=int))
    assert diff.mean() < 4, diff.mean()                         # JPEG loss only
    assert FaceAnalyzer().analyze(path).has_face


def test_16_bit_greyscale_is_scaled_to_8_bits(tmp_path):
    grey8 = np.asarray(Image.open(face_photo("pose1.png")).convert("L"))
    path = tmp_path / "grey16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)     # the same picture in 16 bits
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(load_photo(path))
    assert got.shape == (*grey8.shape, 3) and np.array_equal(got[..., 0], grey8)
    assert FaceAnalyzer().analyze(path).has_face


def test_modes_without_an_8_bit_reading_are_refused_clearly(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)).save(path)
    with pytest.raises(PhotoError, match="pixel mode 'F'"):
        load_photo(path)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (32, 32), (10, 20, 30, 0)).save(rgba)
    assert load_photo(rgba).getpixel((0, 0)) == (10, 20, 30)
