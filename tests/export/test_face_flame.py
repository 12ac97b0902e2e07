"""FLAME: the restricted unpickler on a synthesized chumpy-era generic_model.pkl, LBS, landmarks, texture."""
from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

from caphuman.export.face.flame import Flame, flame_albedo, load_flame_model, load_flame_texture, load_landmark_embedding
from caphuman.export.face.safe_pickle import UnsafePickleError, load_flame_pickle
from caphuman.runtime.condition.template import LANDMARK_EMBEDDING, head_template

N_COMPONENTS = 400  # FLAME2020: 300 shape + 100 expression


def _fake_chumpy():
    """A stand-in `chumpy.ch.Ch` so the pickle stream names the same global as FLAME's file."""
    ch_mod = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x
            self._dirty_vars = set()
    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch_mod.Ch = Ch
    pkg = types.ModuleType("chumpy")
    pkg.ch = ch_mod
    return pkg, ch_mod


def flame_arrays(seed: int = 0, jaw_weight: bool = True) -> dict:
    """FLAME-shaped arrays on the template topology: v_template = template, small random bases."""
    rng = np.random.default_rng(seed)
    mesh = head_template()
    V = len(mesh.vertices)
    v = mesh.vertices - (mesh.vertices.min(0) + mesh.vertices.max(0)) / 2  # FLAME's head sits near the origin
    weights = np.zeros((V, 5))
    weights[:, 0] = 1.0
    if jaw_weight:  # lower face follows the jaw joint
        low = v[:, 1] < np.percentile(v[:, 1], 30)
        weights[low] = 0
        weights[low, 2] = 1.0
    J = np.zeros((5, V))
    centre = np.argsort(np.linalg.norm(v - v.mean(0), axis=1))[:10]
    J[0, centre] = 0.1
    J[1, centre] = 0.1
    jaw_pt = np.argsort(np.linalg.norm(v - (v.mean(0) + [0, -0.05, 0]), axis=1))[:4]
    J[2, jaw_pt] = 0.25
    J[3, 0] = J[4, 1] = 1.0
    posedirs = rng.standard_normal((V, 3, 36)) * 1e-3
    posedirs[weights[:, 2] == 0] = 0  # pose correctives on the jaw region only
    return {
        "v_template": v, "f": mesh.faces.astype(np.uint32),
        "shapedirs": (rng.standard_normal((V, 3, N_COMPONENTS)) * 1e-3).astype(np.float32),
        "posedirs": posedirs.astype(np.float32),
        "J_regressor": scipy.sparse.csc_matrix(J), "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "bs_style": "lbs", "bs_type": "lrotmin",
    }


def write_flame_pickle(path: Path, arrays: dict | None = None) -> dict:
    """generic_model.pkl as FLAME ships it: protocol-2 dict with chumpy Ch arrays and a scipy csc J_regressor."""
    arrays = arrays or flame_arrays()
    pkg, ch_mod = _fake_chumpy()
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    sys.modules.update({"chumpy": pkg, "chumpy.ch": ch_mod})
    try:
        obj = dict(arrays)
        for k in ("v_template", "shapedirs", "posedirs", "weights"):
            if k in arrays:
                obj[k] = ch_mod.Ch(arrays[k])
        data = pickle.dumps(obj, protocol=2)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert b"chumpy.ch\nCh" in data
    data = data.replace(b"scipy.sparse._csc\ncsc_matrix", b"scipy.sparse.csc\ncsc_matrix")  # the Python 2-era name
    path.write_bytes(data)
    return arrays


@pytest.fixture(scope="module")
def flame_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("flame") / "generic_model.pkl"
    arrays = write_flame_pickle(path)
    return path, arrays


def test_chumpy_pickle_loads_as_arrays(flame_file):
    path, arrays = flame_file
    data = load_flame_model(path)
    np.testing.assert_array_equal(data.v_template, arrays["v_template"])
    np.testing.assert_array_equal(data.shapedirs, arrays["shapedirs"])
    np.testing.assert_allclose(data.J_regressor, arrays["J_regressor"].toarray())
    assert data.faces.dtype == np.int64 and data.faces.shape == (9976, 3)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    for payload in ({"v_template": _Evil(marker)}, _Evil(marker)):
        data = pickle.dumps(payload, protocol=2)
        (tmp_path / "evil.pkl").write_bytes(data)
        with pytest.raises(UnsafePickleError, match="system"):
            load_flame_model(tmp_path / "evil.pkl")
    assert not marker.exists()
    # Other globals are refused too, even harmless-looking ones.
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_flame_pickle(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(UnsafePickleError, match="chumpy.ch_ops"):
        load_flame_pickle(b"\x80\x02cchumpy.ch_ops\nadd\n)\x81.")


def test_wrong_flame_file_errors(tmp_path, flame_file):
    _, arrays = flame_file
    bad = dict(arrays)
    bad.pop("posedirs")
    write_flame_pickle(tmp_path / "m.pkl", bad)
    with pytest.raises(ValueError, match="posedirs"):
        load_flame_model(tmp_path / "m.pkl")
    (tmp_path / "t.pkl").write_bytes(b"not a pickle")
    with pytest.raises(Exception, match="t.pkl|pickle|load"):
        load_flame_model(tmp_path / "t.pkl")


def _rot(axis: str, deg: float) -> np.ndarray:
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]), "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])}[axis]


def test_lbs_shape_expression_pose(flame_file):
    path, arrays = flame_file
    data = load_flame_model(path)
    flame = Flame(data, load_landmark_embedding(LANDMARK_EMBEDDING))
    rng = np.random.default_rng(1)
    shape, exp = rng.standard_normal(100), rng.standard_normal(50)
    t = lambda a: torch.tensor(a, dtype=torch.float32)[None]  # noqa: E731
    with torch.no_grad():
        v0, _, _ = flame(t(np.zeros(100)), t(np.zeros(50)), t(np.zeros(6)))
        v1, _, lmk3d = flame(t(shape), t(exp), t(np.zeros(6)))
    np.testing.assert_allclose(v0[0].numpy(), arrays["v_template"], atol=1e-6)
    sd = arrays["shapedirs"].astype(np.float64)
    expected = arrays["v_template"] + sd[:, :, :100] @ shape + sd[:, :, 300:350] @ exp
    np.testing.assert_allclose(v1[0].numpy(), expected, atol=1e-5)

    # Global yaw: rigid rotation about the root joint, plus the pose-corrective blendshapes of the
    # other joints (zero here: their rotations are identity).
    pose = np.zeros(6)
    pose[1] = np.radians(25)
    with torch.no_grad():
        v2, lmk2d, lmk3d2 = flame(t(np.zeros(100)), t(np.zeros(50)), t(pose))
    J = arrays["J_regressor"].toarray() @ arrays["v_template"]
    R = _rot("y", 25)
    low = arrays["weights"][:, 2] == 1
    exp_v = (arrays["v_template"] - J[0]) @ R.T + J[0]
    np.testing.assert_allclose(v2[0].numpy()[~low], exp_v[~low], atol=1e-5)
    # The jaw joint's chain: global rotation applied to the jaw subtree as well.
    np.testing.assert_allclose(v2[0].numpy()[low], exp_v[low], atol=1e-5)
    # Landmarks follow the vertices (full 68 embedding).
    emb = load_landmark_embedding(LANDMARK_EMBEDDING)
    tri = v2[0].numpy()[arrays["f"].astype(np.int64)[emb["full_lmk_faces_idx"][0]]]
    np.testing.assert_allclose(lmk3d2[0].numpy(), np.einsum("lfi,lf->li", tri, emb["full_lmk_bary_coords"][0]), atol=1e-6)
    assert lmk2d.shape == (1, 68, 3)

    # Jaw opening: rotation of the jaw subtree about joint 2, with pose correctives (posedirs).
    pose = np.zeros(6)
    pose[3] = np.radians(15)
    with torch.no_grad():
        v3, _, _ = flame(t(np.zeros(100)), t(np.zeros(50)), t(pose))
    Rj = _rot("x", 15)
    feat = np.zeros(36)
    feat[9:18] = (Rj - np.eye(3)).reshape(-1)  # joint 2 is the second non-root joint
    posed = arrays["v_template"] + (arrays["posedirs"].astype(np.float64).reshape(-1, 36) @ feat).reshape(-1, 3)
    exp_jaw = np.where(low[:, None], (posed - J[2]) @ Rj.T + J[2], posed)
    np.testing.assert_allclose(v3[0].numpy(), exp_jaw, atol=1e-5)


def test_dynamic_contour_rows(flame_file):
    path, _ = flame_file
    flame = Flame(load_flame_model(path), load_landmark_embedding(LANDMARK_EMBEDDING))
    for deg, row in ((0, 0), (20, 20), (50, 39), (-20, 59), (-45, 78)):
        full = torch.zeros(1, 15)
        full[0, 1] = np.radians(deg)
        assert int(flame.dynamic_contour_rows(full)[0]) == row, deg


def test_flame_texture(tmp_path):
    n = 512 * 512 * 3
    mean = np.zeros((1, n), dtype=np.float32)
    mean[0, 0::3] = 255  # channel 0 of the stored (BGR) texture
    tex_dir = np.zeros((n, 50), dtype=np.float16)
    tex_dir[1::3, 0] = 255  # component 0 drives channel 1
    np.savez_compressed(tmp_path / "FLAME_texture.npz", mean=mean, tex_dir=tex_dir)
    m, d = load_flame_texture(tmp_path / "FLAME_texture.npz")
    code = torch.zeros(1, 50)
    code[0, 0] = 0.5
    alb = flame_albedo(torch.from_numpy(m), torch.from_numpy(d), code)
    assert alb.shape == (1, 3, 256, 256)
    torch.testing.assert_close(alb[0, 2], torch.ones(256, 256))  # channel reversed: stored 0 -> output 2
    torch.testing.assert_close(alb[0, 1], torch.full((256, 256), 0.5))
    torch.testing.assert_close(alb[0, 0], torch.zeros(256, 256))
    np.savez(tmp_path / "obj.npz", mean=np.array([object()], dtype=object), tex_dir=tex_dir)
    with pytest.raises(ValueError, match="obj.npz"):
        load_flame_texture(tmp_path / "obj.npz")
