"""MTCNN and the FaceNet crop on every real photo, against golden outputs of facenet-pytorch 2.5.3.

tests/data/mtcnn_facenet_pytorch_2.5.3.json was produced by facenet-pytorch 2.5.3's own
``MTCNN(image_size=160).detect(img, landmarks=True)`` and ``MTCNN(...)(img)`` (torchvision's NMS
replaced by an equivalent pure-torch NMS, torchvision being unavailable) on these photos.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from caphuman.export.face.mtcnn import MTCNN, WEIGHTS_DIR
from caphuman.runtime.condition.faces import FaceAnalyzer

from tests.paths import DATA, face_photo, face_photos

GOLDEN = json.loads((DATA / "mtcnn_facenet_pytorch_2.5.3.json").read_text())


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer()


# sha256 of pnet.pt, rnet.pt and onet.pt as facenet-pytorch 2.5.3 ships them (facenet_pytorch/data/)
FACENET_PYTORCH_2_5_3_SHA256 = {
    "pnet": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}


def test_shipped_weights_are_facenet_pytorchs():
    for name, digest in FACENET_PYTORCH_2_5_3_SHA256.items():
        shipped = (WEIGHTS_DIR / f"{name}.pt").read_bytes()
        assert len(shipped) < 2 << 20
        assert hashlib.sha256(shipped).hexdigest() == digest, f"{name}.pt is not facenet-pytorch 2.5.3's"


@pytest.mark.parametrize("photo", face_photos(),
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
    src = face_photo("reference_196251.png")
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


def test_area_crops_equal_per_box_interpolation():
    """The summed-area-table crops are F.interpolate(mode='area') of each box, bit for bit."""
    import torch.nn.functional as F

    from caphuman.export.face.mtcnn import _area_crops, _integral
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 97, 131), generator=g).float()
    sat = _integral(img)
    boxes = [(0, 97, 0, 131), (5, 6, 7, 8), (10, 60, 3, 120), (40, 97, 100, 131), (1, 30, 2, 11)]
    for size in (24, 48):  # down- and up-sampling
        got = _area_crops(sat, np.array(boxes).T, size)
        want = torch.cat([F.interpolate(img[:, :, a:b, c:d], size=(size, size), mode="area") for a, b, c, d in boxes])
        assert torch.equal(got, want)


def test_frame_detection_reused_only_when_the_frame_is_the_photo(analyzer):
    from caphuman.runtime.condition.images import resize_like_deca
    ph = analyzer.analyze(face_photo("reference_196251.png"))  # 512x512: the frame is the photo
    assert np.array_equal(ph.frame, np.asarray(ph.image))
    assert ph.frame_detection is ph.detection
    again = analyzer.mtcnn.detect(ph.frame)[0]
    np.testing.assert_array_equal(again.box, ph.detection.box)
    np.testing.assert_array_equal(again.landmarks, ph.detection.landmarks)
    small = analyzer.analyze(face_photo("image02673.png"))  # 224x224: the frame is resized
    assert small.frame.shape == (512, 512, 3) and small.frame_detection is not small.detection
    np.testing.assert_array_equal(small.frame, resize_like_deca(np.asarray(small.image)))
    np.testing.assert_array_equal(small.frame_detection.box, analyzer.mtcnn.detect(small.frame)[0].box)


@pytest.mark.gpu
def test_mtcnn_on_the_gpu_matches_the_cpu(analyzer):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from caphuman.runtime.condition.graphs import CudaGraphed
    gpu = FaceAnalyzer(device="cuda")
    assert isinstance(gpu.mtcnn.pyramid, CudaGraphed)
    photos = face_photos()
    if not photos:
        pytest.skip("no shared photos")
    for photo in photos:
        cpu_ph = analyzer.analyze(photo)
        for _ in range(3):  # eager, then captured, then replayed
            ph = gpu.analyze(photo)
            for a, b in ((ph.detection, cpu_ph.detection), (ph.frame_detection, cpu_ph.frame_detection)):
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_allclose(a.box, b.box, atol=1e-3)
                    np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
                    assert abs(a.prob - b.prob) < 1e-5
    assert gpu.mtcnn.pyramid.failed is None and gpu.mtcnn.pyramid.captured_shapes
