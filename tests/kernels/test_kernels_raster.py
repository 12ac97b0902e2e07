"""CUDA condition rasterizer (kernels/raster_cuda.py).

On the CPU (CI): the module imports without CuPy or a GPU, its CUDA source compiles with nvcc (the
compiler NVRTC wraps, with the same options), and input validation. On a GPU (``-m gpu``): the
kernel against the NumPy reference ``kernels/raster_reference.py`` on random meshes, exact depth
ties, and the FLAME template head at 512x512 for a batch of posed, lit heads.
"""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from caphuman.kernels import raster_cuda
from caphuman.runtime.condition.template import ASSETS as TEMPLATE_ASSETS


def _nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc is not on PATH: cannot compile-check the CUDA source")
    return path


def test_cuda_source_compiles_with_nvcc(tmp_path: Path) -> None:
    src = tmp_path / "raster.cu"
    src.write_text(raster_cuda.CUDA_SOURCE)
    ptx = tmp_path / "raster.ptx"
    opts = [o.replace("--std=", "-std=") for o in raster_cuda._NVRTC_OPTIONS]
    proc = subprocess.run([_nvcc(), "--ptx", "-arch=sm_90", *opts, str(src), "-o", str(ptx)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = ptx.read_text()
    for entry in ("raster_faces", "shade_pixels", "resolve_pixels"):
        assert f".entry {entry}(" in text, f"kernel {entry} missing from the PTX"
    # depth races are resolved by one 64-bit atomic min per covered pixel, nothing else
    assert "atom.global.min.u64" in text
    assert "atom.global.cas" not in text
    # --fmad=false: no contracted multiply-adds, so coverage math rounds like the NumPy reference
    assert "fma.rn" not in text


@pytest.mark.parametrize("n, bits", [(1, 1), (2, 1), (3, 2), (9976, 14), (16384, 14), (16385, 15)])
def test_face_bits(n: int, bits: int) -> None:
    assert raster_cuda.face_bits(n) == bits
    assert (1 << raster_cuda.face_bits(n)) >= n


def test_face_bits_rejects_empty() -> None:
    with pytest.raises(ValueError, match="num_faces"):
        raster_cuda.face_bits(0)


def test_sh_constants_match_spec() -> None:
    spec = [0.28209479, 1.02332671, 1.02332671, 1.02332671, 0.85808553, 0.85808553, 0.85808553, 0.42904277,
            0.24770796]
    np.testing.assert_allclose(raster_cuda.SH_CONSTANTS, spec, atol=1e-8)


def test_rejects_cpu_tensors() -> None:
    v = torch.zeros(1, 3, 3)
    with pytest.raises(ValueError, match="CUDA"):
        raster_cuda.render_hint_cuda(v, np.array([[0, 1, 2]]), v, np.zeros((1, 3, 2)), np.zeros((1, 3, 4, 4)),
                                     np.zeros((1, 9, 3)), 8, 8)
    with pytest.raises(ValueError, match="CUDA"):
        raster_cuda.rasterize_cuda(v, np.array([[0, 1, 2]]), 8, 8)


@pytest.mark.parametrize("verts, faces, match", [
    (torch.zeros(1, 3, 3), torch.tensor([[0, 1, 3]]), "outside"),
    (torch.zeros(1, 3, 3), torch.tensor([[0, -1, 2]]), "outside"),
    (torch.tensor([[[0.0, 0.0, 1.0], [float("nan"), 0.0, 1.0], [1.0, 1.0, 1.0]]]), torch.tensor([[0, 1, 2]]), "NaN"),
    (torch.zeros(2, 3, 3), torch.tensor([[0, 1, 2]]), None),
])
def test_value_problem(verts, faces, match) -> None:
    problem = raster_cuda.value_problem(verts, faces)
    if match is None:
        assert problem is None
    else:
        assert match in problem


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------
def _need_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("cupy", reason="the CUDA rasterizer compiles through CuPy's NVRTC")


def _ref():
    return pytest.importorskip("caphuman.kernels.raster_reference", reason="the NumPy reference is not in this checkout")


def _random_mesh(seed: int, n_faces: int = 60):
    rng = np.random.default_rng(seed)
    verts = np.concatenate([rng.uniform(-1.1, 1.1, (3 * n_faces, 2)), rng.uniform(0.5, 2.0, (3 * n_faces, 1))], 1)
    centres = rng.uniform(-0.9, 0.9, (n_faces, 1, 2))
    verts[:, :2] = (verts[:, :2].reshape(n_faces, 3, 2) * rng.uniform(0.05, 0.5, (n_faces, 1, 1)) + centres).reshape(-1, 2)
    faces = np.arange(3 * n_faces).reshape(n_faces, 3)
    return verts.astype(np.float32).astype(np.float64), faces


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rasterize_matches_reference_random(seed: int) -> None:
    _need_gpu()
    ref = _ref()
    verts, faces = _random_mesh(seed)
    h, w = 37, 53  # non-square, odd
    r_idx, r_bary = ref.rasterize(verts, faces, h, w)
    idx, bary = raster_cuda.rasterize_cuda(torch.tensor(verts[None], dtype=torch.float32, device="cuda"), faces, h, w)
    idx, bary = idx[0].cpu().numpy(), bary[0].cpu().numpy()
    assert (r_idx >= 0).sum() > 100
    np.testing.assert_array_equal(idx, r_idx)
    np.testing.assert_allclose(bary, r_bary, atol=1e-6)


@pytest.mark.gpu
def test_depth_ties_go_to_smallest_face_index() -> None:
    _need_gpu()
    ref = _ref()
    # faces 0 and 1: the same triangle (vertex order rotated) at depth exactly 0, so every covered
    # pixel is an exact tie; face 2: farther, partly outside them, so it shows only there
    tri = np.array([[-0.8, -0.7, 0.0], [0.9, -0.6, 0.0], [0.0, 0.8, 0.0]])
    far = np.array([[0.3, 0.3, 0.5], [1.0, 0.5, 0.5], [1.0, 1.0, 0.5]])
    verts = np.concatenate([tri, tri[[1, 2, 0]], far])
    faces = np.array([[3, 4, 5], [0, 1, 2], [6, 7, 8]])
    idx, _ = raster_cuda.rasterize_cuda(torch.tensor(verts[None], dtype=torch.float32, device="cuda"), faces, 32, 32)
    idx = idx[0].cpu().numpy()
    r_idx, _ = ref.rasterize(verts, faces, 32, 32)
    np.testing.assert_array_equal(idx, r_idx)
    assert set(np.unique(idx)) == {-1, 0, 2}  # face 1 ties face 0 everywhere and loses on index
    assert (idx == 2).sum() > 10 and (idx == 0).sum() > 100


def _load_obj(path: Path):
    v, vt, f, ft = [], [], [], []
    for line in path.read_text().splitlines():
        p = line.split()
        if p and p[0] == "v":
            v.append([float(x) for x in p[1:4]])
        elif p and p[0] == "vt":
            vt.append([float(x) for x in p[1:3]])
        elif p and p[0] == "f":
            c = [s.split("/") for s in p[1:4]]
            f.append([int(x[0]) - 1 for x in c])
            ft.append([int(x[1]) - 1 for x in c])
    return np.array(v), np.array(vt), np.array(f), np.array(ft)


@pytest.mark.gpu
def test_flame_hint_batch_matches_reference() -> None:
    _need_gpu()
    ref = _ref()
    v, vt, f, ft = _load_obj(TEMPLATE_ASSETS / "head_template.obj")
    rng = np.random.default_rng(0)
    centre = (v.max(0) + v.min(0)) / 2
    s = 0.85 / np.abs(v - centre).max()
    heads, normals, lights = [], [], []
    for yaw in (0.0, 0.5, -0.4):
        c, si = math.cos(yaw), math.sin(yaw)
        world = (v - centre) @ np.array([[c, 0, si], [0, 1, 0], [-si, 0, c]]).T
        heads.append(np.stack([world[:, 0] * s, -world[:, 1] * s, -world[:, 2] * s + 10], 1))
        tri = world[f]
        fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n = np.zeros_like(world)
        for k in range(3):
            np.add.at(n, f[:, k], fn)
        normals.append(n / np.linalg.norm(n, axis=1, keepdims=True))
        lights.append(np.concatenate([np.full((1, 3), 3.0), rng.normal(0, 0.4, (8, 3))]))
    albedo = rng.uniform(0, 1, (3, 256, 256))
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)  # noqa: E731
    cu = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32, device="cuda")  # noqa: E731
    out = raster_cuda.render_hint_cuda(cu(heads), f, cu(normals), cu(vt[ft]), cu(albedo[None]), cu(lights), 512, 512)
    assert out.shape == (3, 9, 512, 512) and out.dtype == torch.float32 and out.is_cuda
    out = out.cpu().numpy()
    for i in range(3):
        expect = ref.render_hint(f32(heads[i]), f, f32(normals[i]), f32(vt[ft]), f32(albedo), f32(lights[i]), 512, 512)
        cov, r_cov = np.abs(out[i]).sum(0) > 0, np.abs(expect).sum(0) > 0
        assert r_cov.sum() > 50_000
        np.testing.assert_array_equal(cov, r_cov)
        np.testing.assert_allclose(out[i], expect, atol=1e-4, rtol=0)
