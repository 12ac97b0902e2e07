"""FaceNet, BiSeNet and DECA's E_flame: loaders on files synthesized in the official formats.

The key lists in tests/data were dumped from the official module definitions
(facenet-pytorch 2.5.3 InceptionResnetV1 + its VGGFace2 ``logits`` head; CapHuman's
libs/face_parsing BiSeNet(19); DECA's ResnetEncoder(236)). During development the networks here
were also checked against those definitions with random weights: identical outputs.
"""
from __future__ import annotations

import io
import json
import os

import pytest
import torch

from caphuman.export.face.bisenet import BiSeNet, load_bisenet
from caphuman.export.face.deca_encoder import CODE_DIM, DecaEncoder, decompose_code, load_deca_encoder
from caphuman.export.face.facenet import InceptionResnetV1, load_facenet

from tests.paths import DATA


def _keys(name: str) -> dict[str, list[int]]:
    return json.loads((DATA / name).read_text())


def _synth(keys: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(0)
        elif "running_var" in k:
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g) * 0.05
    return out


def _own_keys(module: torch.nn.Module) -> set[str]:
    return {k for k in module.state_dict() if not k.endswith("num_batches_tracked")}


def test_key_layouts_match_official_files():
    fn = {k for k in _keys("facenet_vggface2_keys.json") if not k.endswith("num_batches_tracked")}
    assert fn - {"logits.weight", "logits.bias"} == _own_keys(InceptionResnetV1())
    bi = {k for k in _keys("bisenet_79999_iter_keys.json") if not k.endswith("num_batches_tracked")}
    assert bi == _own_keys(BiSeNet())
    de = {k for k in _keys("deca_e_flame_keys.json") if not k.endswith("num_batches_tracked")}
    assert de == _own_keys(DecaEncoder())


def test_facenet_loads_vggface2_layout(tmp_path):
    sd = _synth(_keys("facenet_vggface2_keys.json"))
    assert sd["logits.weight"].shape == (8631, 512)
    torch.save(sd, tmp_path / "20180402-114759-vggface2.pt")
    model = load_facenet(tmp_path / "20180402-114759-vggface2.pt")
    with torch.no_grad():
        emb = model(torch.randn(2, 3, 160, 160))
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    sd.pop("last_bn.running_mean")
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="last_bn.running_mean"):
        load_facenet(tmp_path / "bad.pt")


def test_bisenet_loads_79999_iter_layout(tmp_path):
    sd = _synth(_keys("bisenet_79999_iter_keys.json"))
    torch.save(sd, tmp_path / "79999_iter.pth")
    model = load_bisenet(tmp_path / "79999_iter.pth")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 67, 90))
    assert out.shape == (1, 19, 67, 90)
    sd["conv_out.conv_out.weight"] = torch.zeros(18, 256, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="conv_out.conv_out.weight"):
        load_bisenet(tmp_path / "bad.pth")


@pytest.mark.parametrize("legacy", [True, False])
def test_deca_loads_e_flame_from_tar(tmp_path, legacy):
    ckpt = {"E_flame": _synth(_keys("deca_e_flame_keys.json")),
            "E_detail": {"layers.2.weight": torch.zeros(128, 1024)}, "D_detail": {"x": torch.zeros(1)}}
    path = tmp_path / "deca_model.tar"
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    model = load_deca_encoder(path)
    with torch.no_grad():
        code = model(torch.rand(1, 3, 224, 224))
    assert code.shape == (1, CODE_DIM)
    parts = decompose_code(code)
    assert [tuple(v.shape) for v in parts.values()] == [(1, 100), (1, 50), (1, 50), (1, 6), (1, 3), (1, 9, 3)]
    torch.testing.assert_close(parts["light"][0, 2, 1], code[0, 209 + 3 * 2 + 1])
    torch.save({"E_detail": {}}, tmp_path / "no_flame.tar")
    with pytest.raises(ValueError, match="E_flame"):
        load_deca_encoder(tmp_path / "no_flame.tar")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_weight_files_with_code_are_refused(tmp_path):
    import pickle
    buf = io.BytesIO()
    pickle.dump({"E_flame": _RunsCode()}, buf)
    (tmp_path / "evil.tar").write_bytes(buf.getvalue())
    for loader in (load_deca_encoder, load_facenet, load_bisenet):
        with pytest.raises(ValueError, match="evil.tar"):
            loader(tmp_path / "evil.tar")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_facenet(tmp_path / "nope.pt")
