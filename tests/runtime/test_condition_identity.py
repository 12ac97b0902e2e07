"""Identity context: FaceNet + parsed-face CLIP tokens through the projections, [1, 258, ctx]."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from caphuman.export.clip import ImageEncoder, clip_preprocess
from caphuman.export.face.bisenet import KEPT_LABELS, BiSeNet
from caphuman.export.face.facenet import InceptionResnetV1
from caphuman.export.models import CapHumanDenoiser
from caphuman.runtime.condition import FaceAnalyzer
from caphuman.runtime.condition.identity import identity_context, parse_labels, whiten_non_face

from tests.paths import face_photo


def test_whitening_keeps_only_face_labels():
    img = Image.fromarray(np.full((4, 5, 3), 40, dtype=np.uint8))
    labels = np.arange(20).reshape(4, 5) % 19
    out = np.asarray(whiten_non_face(img, labels))
    keep = np.isin(labels, KEPT_LABELS)
    assert (out[keep] == 40).all() and (out[~keep] == 255).all()
    assert set(KEPT_LABELS) == {1, 2, 3, 4, 5, 6, 10, 11, 12, 13}


def test_identity_context_shape(tiny_config):
    torch.manual_seed(0)
    den = CapHumanDenoiser(tiny_config).eval()
    facenet = InceptionResnetV1().eval()
    bisenet = BiSeNet().eval()
    clip = ImageEncoder(tiny_config.vision_clip).eval()
    photo = FaceAnalyzer().analyze(face_photo("image02673.png"))
    labels = parse_labels(bisenet, photo.image)
    assert labels.shape == photo.image.size[::-1] and labels.max() < 19
    ctx = identity_context(den, facenet, bisenet, clip, photo)
    assert ctx.shape == (1, 258, tiny_config.context_dim)
    # The last token is id_linear of the FaceNet embedding.
    emb = facenet(FaceAnalyzer.facenet_crop(photo)[None])
    torch.testing.assert_close(ctx[0, -1], den.id_linear(emb)[0])
    pix = clip_preprocess(whiten_non_face(photo.image, labels))
    torch.testing.assert_close(ctx[0, :-1], den.img_linear(clip(pix))[0])


def test_clip_preprocess_matches_clip_feature_extractor_4_24():
    """transformers 4.24 CLIPFeatureExtractor = ImageFeatureExtractionMixin: convert_rgb, resize (short side
    224, bicubic, unchanged when already 224), centre crop with top = (H - 224) // 2, /255, mean/std."""
    import pytest
    image_utils = pytest.importorskip("transformers.image_utils")
    mixin = getattr(image_utils, "ImageFeatureExtractionMixin", None)
    if mixin is None:
        pytest.skip("this transformers no longer has ImageFeatureExtractionMixin (4.24's CLIPFeatureExtractor base)")
    from caphuman.export.clip import CLIP_MEAN, CLIP_STD
    m = mixin()
    rng = np.random.default_rng(0)
    for w, h in [(224, 224), (224, 301), (301, 224), (225, 400), (640, 427), (97, 131), (224, 225)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = m.resize(m.convert_rgb(img), size=224, resample=Image.BICUBIC, default_to_square=False)
        ref = m.normalize(m.center_crop(ref, 224), mean=list(CLIP_MEAN), std=list(CLIP_STD))
        got = clip_preprocess(img)[0].numpy()
        # x/255 here vs x*(1/255) there: 1-2 float32 ulps.
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_parse_face_is_whitening_of_the_labels():
    from caphuman.runtime.condition.identity import parse_face
    torch.manual_seed(0)
    bisenet = BiSeNet().eval()
    photo = Image.open(face_photo("image02673.png")).convert("RGB")
    with torch.no_grad():
        want = whiten_non_face(photo, parse_labels(bisenet, photo))
        got = parse_face(bisenet, photo)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
