"""MTCNN and the FaceNet crop on every real photo, against golden outputs of facenet-pytorch 2.5.3.

tests/data/mtcnn_facenet_pytorch_2.5.3.json was produced by facenet-pytorch 2.5.3's own
``MTCNN(image_size=160).detect(img, landmarks=True)`` and ``MTCNN(...)(img)`` (torchvision's NMS
replaced by an equivalent pure-torch NMS, torchvision being unavailable) on these photos.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.face.mtcnn import MTCNN, WEIGHTS_DIR
from runtime.condition.faces import FaceAnalyzer

from ._shared_data import face_photos, shared_path

GOLDEN = json.loads((Path(__file__).parent / "data" / "mtcnn_facenet_pytorch_2.5.3.json").read_text())


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer()


def test_shipped_weights_match_shared_copies():
    for name in ("pnet", "rnet", "onet"):
        shipped = (WEIGHTS_DIR / f"{name}.pt").read_bytes()
        assert len(shipped) < 2 << 20
        assert shipped == shared_path("weights", f"{name}.pt").read_bytes()


@pytest.mark.parametrize("photo", face_photos() or [pytest.param(None, marks=pytest.mark.skip("no shared photos"))],
                         ids=lambda p: p.name if p else "none")
def test_detection_and_facenet_crop_match_facenet_pytorch(analyzer, photo):
    gold = GOLDEN[photo.name]
    ph = analyzer.analyze(photo)
    assert ph.detection is not None, f"no face in {photo.name}"
    np.testing.assert_allclose(ph.detection.box, gold["box"], atol=2e-3)
    np.testing.assert_allclose(ph.detection.landmarks, gold["landmarks"], atol=2e-3)
    assert abs(ph.detection.prob - gold["prob"]) < 1e-4
    crop = FaceAnalyzer.facenet_crop(ph)
    assert crop.shape == (3, 160, 160) and crop.dtype == torch.float32
    assert abs(crop.mean().item() - gold["crop_mean"]) < 1e-5
    assert abs(crop.std().item() - gold["crop_std"]) < 1e-5
    np.testing.assert_allclose(crop[:, 0, 0].numpy(), gold["crop_00"], atol=1e-6)
    # DECA crop: 224x224 in [0, 1], the face box inside it.
    deca = FaceAnalyzer.deca_crop(ph)
    assert deca.image.shape == (3, 224, 224) and 0 <= deca.image.min() and deca.image.max() <= 1
    assert deca.box_source == "mtcnn"
    eyes = ph.frame_detection.landmarks[:2]
    crop_eyes = np.c_[eyes, np.ones(2)] @ deca.T.T
    assert np.all((crop_eyes[:, :2] > 40) & (crop_eyes[:, :2] < 184))


def test_landmarks_txt_overrides_detector(tmp_path, analyzer):
    src = shared_path("faces", "reference_196251.png")
    photo = tmp_path / "face.png"
    photo.write_bytes(src.read_bytes())
    pts = np.stack([np.linspace(150, 350, 68), np.linspace(160, 420, 68)], 1)
    np.savetxt(tmp_path / "face.txt", pts)
    ph = analyzer.analyze(photo)
    old, center, source = FaceAnalyzer.deca_box(ph)
    assert source == "landmarks-txt"
    assert old == pytest.approx((200 + 260) / 2 * 1.1)
    np.testing.assert_allclose(center, [250, 290])
    (tmp_path / "face.txt").write_text("1 2\n3 4\n")
    with pytest.raises(ValueError, match="face.txt"):
        FaceAnalyzer.deca_crop(analyzer.analyze(photo))


def test_weight_file_errors(tmp_path):
    for name in ("pnet", "rnet", "onet"):
        (tmp_path / f"{name}.pt").write_bytes((WEIGHTS_DIR / f"{name}.pt").read_bytes())
    sd = torch.load(tmp_path / "rnet.pt", weights_only=True)
    sd.pop("dense4.weight")
    torch.save(sd, tmp_path / "rnet.pt")
    with pytest.raises(ValueError, match="dense4.weight"):
        MTCNN(tmp_path)
    with pytest.raises(FileNotFoundError, match="P-Net"):
        MTCNN(tmp_path / "missing")
