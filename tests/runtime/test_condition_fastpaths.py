"""The fast paths of the condition stages compute what the plain ones compute: the DECA crop, the
512 frame, the cached mean texture, batched DECA codes, cached prompt embeddings, CUDA-graph replays."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from caphuman.runtime.condition.faces import _warp_bilinear
from caphuman.runtime.condition.graphs import CudaGraphed
from caphuman.runtime.condition.images import resize_like_deca
from caphuman.runtime.condition.projection import CROP_SIZE, similarity_crop


def test_separable_deca_crop_equals_map_coordinates():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    img = frame.astype(np.float64) / 255.0
    rows, cols = np.mgrid[0:CROP_SIZE, 0:CROP_SIZE].astype(np.float64)
    for center, size in [((256, 256), 300), ((30.5, 480.2), 257), ((-40, 600), 700), ((400, 100), 21)]:
        Tinv = np.linalg.inv(similarity_crop(center, size))
        src_x = Tinv[0, 0] * cols + Tinv[0, 2]
        src_y = Tinv[1, 1] * rows + Tinv[1, 2]
        want = np.clip(np.stack([ndimage.map_coordinates(img[..., c], [src_y, src_x], order=1, mode="grid-constant")
                                 for c in range(3)]), 0, 1)
        got = _warp_bilinear(frame, Tinv, CROP_SIZE).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="axis-aligned"):
        _warp_bilinear(frame, np.array([[1.0, 0.1, 0], [0, 1, 0], [0, 0, 1]]), CROP_SIZE)


def test_512_photo_frame_is_the_photo():
    rng = np.random.default_rng(1)
    photo = rng.integers(3, 250, (512, 512, 3), dtype=np.uint8)
    frame = resize_like_deca(photo)
    # The general path at scale 1: no filter, no zoom, clip to the input range, *255 truncated.
    img = np.clip(photo / 255.0, photo.min() / 255.0, photo.max() / 255.0)
    np.testing.assert_array_equal(frame, (img * 255.0).astype(np.uint8))
    assert frame is not photo
    other = resize_like_deca(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    assert other.shape == (512, 512, 3) and other.dtype == np.uint8


def test_mean_texture_is_read_once_and_copied():
    from caphuman.runtime.condition.template import _mean_texture, mean_texture_albedo
    a = mean_texture_albedo()
    a[:] = -1
    b = mean_texture_albedo()
    assert b.shape == (3, 256, 256) and 0 <= b.min() and b.max() <= 1
    assert _mean_texture.cache_info().hits >= 1


def test_batched_deca_codes_equal_one_at_a_time():
    from caphuman.export.face.deca_encoder import DecaEncoder
    from caphuman.runtime.condition import ConditionBuilder

    from tests.paths import face_photo
    torch.manual_seed(0)
    builder = ConditionBuilder()
    builder.deca = DecaEncoder().eval()
    photos = [builder.analyzer.analyze(face_photo(n)) for n in ("reference_196251.png", "pose1.png")]
    batched = builder.codes_of(photos)
    for ph, code in zip(photos, batched):
        single = builder.code_of(ph)
        for k in ("shape", "tex", "exp", "pose", "light", "cam"):
            np.testing.assert_allclose(getattr(code, k), getattr(single, k), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(code.tform, single.tform)


def test_prompt_encoder_caches_only_constant_prompts(tiny_config, caplog):
    from caphuman.export.clip import TextEncoder
    from caphuman.runtime.condition.text import PromptEncoder
    torch.manual_seed(0)
    text = TextEncoder(tiny_config.text_clip).eval()
    prompts = PromptEncoder(text)
    with torch.no_grad():
        fresh_u, fresh_c = text([""]), text(["a photo of a person"])
    u1 = prompts("")
    u1.add_(1)  # callers get copies: the cache is not touched
    torch.testing.assert_close(prompts(""), fresh_u, rtol=0, atol=0)
    torch.testing.assert_close(prompts("a photo of a person"), fresh_c, rtol=0, atol=0)
    assert set(prompts._cache) == {""}
    with caplog.at_level(logging.WARNING):
        prompts("word " * 100)
    assert "truncated" in caplog.text


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return y.mean((2, 3)), (y.amax((2, 3)), {"sum": y.sum()})


class _Syncs(nn.Module):  # reads a value back: cannot be captured
    def forward(self, x):
        return x * float(x.sum().item())


def test_cuda_graphed_is_the_module_on_the_cpu():
    torch.manual_seed(0)
    net = _Net().eval()
    wrapped = CudaGraphed(net)
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        a, b = net(x), wrapped(x)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert wrapped.captured_shapes == [] and next(wrapped.parameters()) is next(net.parameters())


@pytest.mark.gpu
def test_cuda_graphed_replays_match_eager_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    net = _Net().eval().cuda()
    wrapped = CudaGraphed(net, capture_after=2)
    xs = [torch.randn(1, 3, 16, 16, device="cuda") for _ in range(4)]
    with torch.no_grad():
        want = [net(x) for x in xs]
        got = [wrapped(x) for x in xs]  # eager, capture, replay, replay
        assert len(wrapped.captured_shapes) == 1 and wrapped.failed is None
        for g, w in zip(got, want):  # earlier results survive later replays (outputs are copied)
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wrapped(torch.randn(3, 3, 5, 7, device="cuda"))[0].shape, torch.Size([3, 8]))
        bad = CudaGraphed(_Syncs())
        x = torch.ones(4, device="cuda")
        torch.testing.assert_close(bad(x), x * 4)
        assert bad.failed is not None
        torch.testing.assert_close(bad(x), x * 4)  # eager from then on


@pytest.mark.gpu
def test_identity_context_from_graphs_matches_eager_on_the_gpu(tiny_config):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from caphuman.export.clip import ImageEncoder
    from caphuman.export.face.bisenet import BiSeNet
    from caphuman.export.face.facenet import InceptionResnetV1
    from caphuman.export.models import CapHumanDenoiser
    from caphuman.runtime.condition import FaceAnalyzer
    from caphuman.runtime.condition.identity import identity_context

    from tests.paths import face_photo
    torch.manual_seed(0)
    nets = [m.eval().cuda() for m in (CapHumanDenoiser(tiny_config), InceptionResnetV1(), BiSeNet(),
                                       ImageEncoder(tiny_config.vision_clip))]
    photo = FaceAnalyzer(device="cuda").analyze(face_photo("reference_196251.png"))
    with torch.no_grad():
        want = identity_context(*nets, photo)
        graphed = [nets[0]] + [CudaGraphed(m) for m in nets[1:]]
        for _ in range(2):
            got = identity_context(*graphed, photo)
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert all(g.failed is None and g.captured_shapes for g in graphed[1:])


@pytest.mark.gpu
def test_deca_crop_on_the_gpu_equals_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    frame = np.random.default_rng(2).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    for center, size in [((256, 256), 300), ((-40, 600), 700)]:
        Tinv = np.linalg.inv(similarity_crop(center, size))
        torch.testing.assert_close(_warp_bilinear(frame, Tinv, CROP_SIZE, "cuda").cpu(),
                                   _warp_bilinear(frame, Tinv, CROP_SIZE), rtol=0, atol=1e-12)


def test_text_tower_equals_the_transformers_forward(tiny_config):
    from caphuman.export.clip import TextEncoder
    from caphuman.runtime.condition.text import PromptEncoder, _graphable_tower, _TextTower
    torch.manual_seed(0)
    text = TextEncoder(tiny_config.text_clip).eval()
    ids = text.tokenize(["a photo of a person, best quality", ""]).input_ids
    with torch.no_grad():
        want = text.model(input_ids=ids).last_hidden_state
        got = _TextTower(text.model)(ids)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert isinstance(_graphable_tower(text.model), _TextTower)
    prompts = PromptEncoder(text, graph=True)  # on the CPU the graph wrapper runs the tower eagerly
    torch.testing.assert_close(prompts("a photo of a person, best quality"), want[:1], rtol=1e-6, atol=1e-6)


def test_exact_prompt_encoder_uses_the_tower_only_when_bit_identical(tiny_config, monkeypatch):
    from caphuman.export.clip import TextEncoder
    from caphuman.runtime.condition.text import PromptEncoder, _LastHiddenState, _TextTower
    torch.manual_seed(0)
    text = TextEncoder(tiny_config.text_clip).eval()
    with torch.no_grad():
        want = text(["a photo of a person"])
    prompts = PromptEncoder(text, graph=True, exact=True)
    assert isinstance(prompts._tower.module, _TextTower)  # equal bit for bit on the CPU
    torch.testing.assert_close(prompts("a photo of a person"), want, rtol=0, atol=0)
    forward = _TextTower.forward
    monkeypatch.setattr(_TextTower, "forward", lambda self, ids: forward(self, ids) * (1 + 1e-6))
    assert isinstance(PromptEncoder(text, graph=True)._tower.module, _TextTower)  # within the tolerance
    prompts = PromptEncoder(text, graph=True, exact=True)
    assert isinstance(prompts._tower.module, _LastHiddenState)  # the transformers forward
    torch.testing.assert_close(prompts("a photo of a person"), want, rtol=0, atol=0)
