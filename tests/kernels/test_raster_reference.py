"""caphuman.kernels.raster_reference against an independent brute-force rasterizer (per pixel, over all faces)."""
from __future__ import annotations

import numpy as np
import pytest

from caphuman.kernels.raster_reference import SH_CONSTANTS, rasterize, render_hint



def brute_force(verts: np.ndarray, faces: np.ndarray, h: int, w: int):
    """Every pixel against every face, written from the pytorch3d rules, no bounding boxes."""
    fi = np.full((h, w), -1, dtype=np.int64)
    bary = np.zeros((h, w, 3))
    zbuf = np.full((h, w), np.inf)
    tri = verts[faces].astype(np.float64)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    # Signed double area of (a, b, c) and of the pixel against each edge.
    area = (a[:, 0] - b[:, 0]) * (c[:, 1] - b[:, 1]) - (a[:, 1] - b[:, 1]) * (c[:, 0] - b[:, 0])
    ok_face = (np.abs(area) > 1e-8) & (tri[:, :, 2].max(1) >= 0)
    denom = (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]) - (c[:, 1] - a[:, 1]) * (b[:, 0] - a[:, 0]) + 1e-8
    for i in range(h):
        py = (2 * i + 1) / h - 1
        for j in range(w):
            px = (2 * j + 1) / w - 1
            l0 = ((px - b[:, 0]) * (c[:, 1] - b[:, 1]) - (py - b[:, 1]) * (c[:, 0] - b[:, 0])) / denom
            l1 = ((px - c[:, 0]) * (a[:, 1] - c[:, 1]) - (py - c[:, 1]) * (a[:, 0] - c[:, 0])) / denom
            l2 = ((px - a[:, 0]) * (b[:, 1] - a[:, 1]) - (py - a[:, 1]) * (b[:, 0] - a[:, 0])) / denom
            z = l0 * a[:, 2] + l1 * b[:, 2] + l2 * c[:, 2]
            hit = ok_face & (l0 > 0) & (l1 > 0) & (l2 > 0) & (z >= 0)
            if hit.any():
                cand = np.nonzero(hit)[0]
                k = cand[np.argmin(z[cand])]  # argmin returns the first (smallest index) on ties
                fi[i, j], zbuf[i, j] = k, z[k]
                bary[i, j] = (l0[k], l1[k], l2[k])
    return fi, bary, zbuf


def _compare(verts, faces, h, w):
    fi, bary = rasterize(verts, faces, h, w)
    rfi, rbary, rz = brute_force(verts, faces, h, w)
    assert fi.dtype == np.int32 and fi.shape == (h, w) and bary.shape == (h, w, 3) and bary.dtype == np.float32
    diff = fi != rfi
    if diff.any():
        # Only exact depth ties may differ (both faces at the same depth): allowed, must be rare.
        tri = verts[faces]
        ii, jj = np.nonzero(diff)
        for i, j in zip(ii, jj):
            assert fi[i, j] >= 0 and rfi[i, j] >= 0, f"coverage differs at {(i, j)}"
            k = fi[i, j]
            z = float(np.dot(bary[i, j], tri[k, :, 2]))
            assert abs(z - rz[i, j]) < 1e-9, f"different face at {(i, j)} without a depth tie"
    same = ~diff & (fi >= 0)
    np.testing.assert_allclose(bary[same], rbary[same], atol=1e-4)
    return fi


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_meshes_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    h, w = 37, 53  # non-square, odd sizes
    n = 40
    centers = rng.uniform(-1.2, 1.2, size=(n, 1, 2))
    tri = centers + rng.normal(scale=0.35, size=(n, 3, 2))
    z = rng.uniform(-0.5, 3, size=(n, 3))  # some faces partly behind the image plane
    verts = np.concatenate([tri, z[..., None]], -1).reshape(-1, 3)
    faces = np.arange(3 * n).reshape(n, 3)
    faces[::2] = faces[::2, ::-1]  # both windings
    fi = _compare(verts, faces, h, w)
    assert (fi >= 0).mean() > 0.2


def test_shared_edges_and_ties():
    # Two triangles sharing the diagonal of a square through pixel centres, plus an exact duplicate
    # at the same depth (tie -> smaller index) and a degenerate face (skipped).
    verts = np.array([[-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1], [0, 0, 1]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 2], [0, 4, 2]])
    fi, bary = rasterize(verts, faces, 8, 8)
    rfi, _, _ = brute_force(verts, faces, 8, 8)
    np.testing.assert_array_equal(fi, rfi)
    assert not (fi == 2).any() and not (fi == 3).any()
    assert (fi[np.arange(8), np.arange(8)] == -1).all()  # centres exactly on the shared diagonal
    # Reversed winding of the same triangle at the same depth: pytorch3d's +1e-8 in the area makes the
    # barycentrics of the negatively wound face sum to slightly more than 1, so it is not a tie.
    fi2, _ = rasterize(verts, np.array([[0, 1, 2], [2, 1, 0]]), 8, 8)
    np.testing.assert_array_equal(fi2, brute_force(verts, np.array([[0, 1, 2], [2, 1, 0]]), 8, 8)[0])


def _template_ndc(yaw_deg: float = 0.0):
    from caphuman.runtime.condition.template import ASSETS, load_obj
    mesh = load_obj(ASSETS / "head_template.obj")
    v = mesh.vertices - (mesh.vertices.min(0) + mesh.vertices.max(0)) / 2
    a = np.radians(yaw_deg)
    v = v @ np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]).T
    v = v / np.abs(v).max() * 0.9
    return np.stack([v[:, 0], -v[:, 1], -v[:, 2] + 10], 1), mesh


@pytest.mark.parametrize("yaw", [0.0, 70.0])
def test_flame_template_matches_brute_force(yaw):
    verts, mesh = _template_ndc(yaw)
    fi = _compare(verts, mesh.faces, 72, 72)
    assert (fi >= 0).sum() > 1000


def test_flame_template_512_is_fast():
    import time
    verts, mesh = _template_ndc()
    t = time.perf_counter()
    fi, _ = rasterize(verts, mesh.faces, 512, 512)
    assert time.perf_counter() - t < 10
    assert 0.2 < (fi >= 0).mean() < 0.8


def test_render_hint_channels():
    verts = np.array([[-0.8, -0.8, 10], [0.8, -0.8, 10], [0.0, 0.8, 10]])
    faces = np.array([[0, 1, 2]])
    normals = np.tile([0.0, 0.0, 1.0], (3, 1))
    uvs = np.array([[[0.25, 0.25], [0.75, 0.25], [0.5, 0.75]]])
    albedo = np.ones((3, 4, 4)) * np.array([0.2, 0.5, 0.8])[:, None, None]
    light = np.zeros((9, 3))
    light[0] = 1.0
    light[3] = 0.5
    hint = render_hint(verts, faces, normals, uvs, albedo, light, 16, 16)
    assert hint.shape == (9, 16, 16) and hint.dtype == np.float32
    mask = hint[2] != 0
    assert mask.sum() > 50 and not mask[0, 0]
    np.testing.assert_allclose(hint[2][mask], 1.0, atol=1e-6)
    np.testing.assert_allclose(hint[3:6][:, mask], np.array([0.2, 0.5, 0.8])[:, None] * np.ones(mask.sum()), atol=1e-6)
    shade = SH_CONSTANTS[0] * 1.0 + SH_CONSTANTS[3] * 0.5 - 0 * SH_CONSTANTS[8]  # basis 8 = 3*1-1 = 2 but light[8]=0
    np.testing.assert_allclose(hint[6:9][:, mask], hint[3:6][:, mask] * shade, atol=1e-6)
    assert (hint[:, ~mask] == 0).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="faces"):
        rasterize(np.zeros((3, 3)), np.array([[0, 1, 3]]), 4, 4)
    with pytest.raises(ValueError, match="NaN"):
        rasterize(np.full((3, 3), np.nan), np.array([[0, 1, 2]]), 4, 4)


def test_render_hint_attributes_match_brute_force_and_torch_grid_sample():
    """Normals from brute-force barycentrics, albedo from torch's grid_sample, SH from the spec's formula."""
    import torch
    import torch.nn.functional as F

    verts, mesh = _template_ndc(30.0)
    h = w = 48
    rng = np.random.default_rng(3)
    normals = rng.normal(size=(len(verts), 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    uvs = mesh.face_uvs
    albedo = rng.uniform(size=(3, 16, 16))
    light = rng.normal(size=(9, 3))
    hint = render_hint(verts, mesh.faces, normals, uvs, albedo, light, h, w)
    fi, bary, _ = brute_force(verts, mesh.faces, h, w)
    m = fi >= 0
    f = np.where(m, fi, 0)
    n_ref = np.einsum("hwk,hwkc->chw", bary, normals[mesh.faces[f]]) * m
    np.testing.assert_allclose(hint[0:3], n_ref, atol=1e-4)
    uv = np.einsum("hwk,hwkc->hwc", bary, uvs[f])
    grid = torch.from_numpy(np.stack([uv[..., 0] * 2 - 1, -(uv[..., 1] * 2 - 1)], -1)[None])
    a_ref = F.grid_sample(torch.from_numpy(albedo)[None], grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)[0].numpy() * m
    np.testing.assert_allclose(hint[3:6], a_ref, atol=1e-4)
    nx, ny, nz = n_ref
    basis = np.stack([np.ones_like(nx), nx, ny, nz, nx * ny, nx * nz, ny * nz, nx ** 2 - ny ** 2, 3 * nz ** 2 - 1])
    consts = [0.28209479, 1.02332671, 1.02332671, 1.02332671, 0.85808553, 0.85808553, 0.85808553, 0.42904277, 0.24770796]
    shading = np.einsum("kc,khw->chw", light, basis * np.array(consts)[:, None, None])
    np.testing.assert_allclose(hint[6:9], a_ref * shading * m, atol=1e-4)
