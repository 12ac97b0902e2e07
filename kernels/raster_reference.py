"""CPU reference rasterizer and CapHuman head-hint shading (NumPy).

This is the function the official DECA renderer computes with pytorch3d's ``rasterize_meshes``
(``libs/decalib/utils/renderer.py``: ``Pytorch3dRasterizer`` + ``SRenderY.forward`` +
``add_SHlight``), written as the reference that the CUDA rasterizer is tested against.

Conventions (all inputs already in *image* NDC, i.e. after DECA's projection and +10 z offset):

* ``verts_ndc[:, 0]`` is x, right positive; ``verts_ndc[:, 1]`` is y, DOWN positive; both span
  [-1, 1] over the image. DECA negates x and y before calling pytorch3d (whose NDC is +X left,
  +Y up), so the two conventions describe the same pixels.
* pixel (row i, col j) has its centre at ``x = (2j+1)/W - 1``, ``y = (2i+1)/H - 1``
  (align_corners=False).
* ``verts_ndc[:, 2]`` is depth; the nearest surface has the SMALLEST z.

Rules, as in pytorch3d ``csrc/rasterize_meshes`` (``CheckPixelInsideFace``, ``BarycentricCoordsForward``)
with ``faces_per_pixel=1, blur_radius=0, perspective_correct=False, cull_backfaces=False``:

* barycentrics are 2D screen-space: ``w0 = E(p, v1, v2) / (E(v2, v0, v1) + 1e-8)`` and cyclic,
  with the edge function ``E(p, a, b) = (p.x-a.x)(b.y-a.y) - (p.y-a.y)(b.x-a.x)``; no clipping;
* a pixel is covered only if all three barycentrics are STRICTLY > 0 (with blur_radius 0 a pixel
  on an edge has distance 0 >= blur_radius and is rejected), so a pixel centre exactly on a shared
  edge belongs to neither face;
* faces whose signed NDC area ``E(v0, v1, v2)`` is within +-1e-8 (kEpsilon) are skipped, so are
  faces with max z < 0, and pixels whose interpolated z is < 0;
* depth is the barycentric interpolation of z; the smallest depth wins; on equal depth the face
  seen first wins, which in pytorch3d's per-face loop is the smallest face index;
* no backface culling: both windings rasterize. (The +1e-8 in the area makes the barycentrics of a
  negatively wound face sum to slightly more than 1; two copies of one triangle with opposite
  windings are therefore not an exact depth tie. This reference keeps that, as pytorch3d does.)

pytorch3d computes in float32; this reference computes in float64 (so pixels within ~1e-7 of an
edge, and exact depth ties, may differ from a float32 implementation).

The rasterizer works per face bounding box: faces are sorted by box size and processed in chunks
whose candidate pixels are evaluated as one array, so a 512x512 render of FLAME's 9976-face head
takes well under a second.
"""
from __future__ import annotations

import math

import numpy as np

K_EPSILON = 1e-8  # pytorch3d kEpsilon
_MAX_CANDIDATES = 1 << 22  # candidate pixels evaluated per chunk (memory bound: ~40 bytes each)

# SH basis constants of DECA's SRenderY.constant_factor (spec section 6.6).
SH_CONSTANTS = np.array([
    1 / math.sqrt(4 * math.pi),
    (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi)),
    (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi)),
    (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi)),
    (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * (3 / 2) * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * (1 / 2) * math.sqrt(5 / (4 * math.pi)),
])


def _check_mesh(verts: np.ndarray, faces: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces)
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise ValueError(f"verts_ndc must be [V, 3], got {verts.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must be an integer [F, 3] array, got {faces.dtype} {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(verts)):
        raise ValueError(f"faces index vertices outside [0, {len(verts)})")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not np.all(np.isfinite(verts)):
        raise ValueError("verts_ndc contains NaN or inf")
    return verts, faces.astype(np.int64)


def _edge(px, py, ax, ay, bx, by):
    return (px - ax) * (by - ay) - (py - ay) * (bx - ax)


def rasterize(verts_ndc: np.ndarray, faces: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterize a triangle mesh, one face per pixel.

    Args:
        verts_ndc: [V, 3] float, image NDC (x right, y down, in [-1, 1]) and depth z (near = small).
        faces: [F, 3] int vertex indices.
        height, width: output size in pixels.

    Returns:
        face_index: [H, W] int32, the visible face per pixel, -1 for background.
        bary: [H, W, 3] float32 screen-space barycentrics of that face (0 on background).
    """
    verts, faces = _check_mesh(verts_ndc, faces, height, width)
    H, W = int(height), int(width)
    best_z = np.full(H * W, np.inf)
    best_f = np.full(H * W, -1, dtype=np.int64)
    best_b = np.zeros((H * W, 3))
    if len(faces) == 0:
        return best_f.reshape(H, W).astype(np.int32), best_b.reshape(H, W, 3).astype(np.float32)

    tri = verts[faces]  # [F, 3, 3]
    x, y, z = tri[..., 0], tri[..., 1], tri[..., 2]
    area = _edge(x[:, 0], y[:, 0], x[:, 1], y[:, 1], x[:, 2], y[:, 2])
    keep = (np.abs(area) > K_EPSILON) & (z.max(1) >= 0)
    # Pixel ranges of each face's bounding box, widened by one pixel against rounding.
    j0 = np.floor((x.min(1) + 1) * W / 2 - 0.5).astype(np.int64) - 1
    j1 = np.ceil((x.max(1) + 1) * W / 2 - 0.5).astype(np.int64) + 1
    i0 = np.floor((y.min(1) + 1) * H / 2 - 0.5).astype(np.int64) - 1
    i1 = np.ceil((y.max(1) + 1) * H / 2 - 0.5).astype(np.int64) + 1
    j0, j1 = np.clip(j0, 0, W - 1), np.clip(j1, 0, W - 1)
    i0, i1 = np.clip(i0, 0, H - 1), np.clip(i1, 0, H - 1)
    keep &= (x.max(1) >= -1 - 2 / W) & (x.min(1) <= 1 + 2 / W) & (y.max(1) >= -1 - 2 / H) & (y.min(1) <= 1 + 2 / H)
    ids = np.nonzero(keep)[0]
    bw, bh = (j1 - j0 + 1)[ids], (i1 - i0 + 1)[ids]
    order = np.lexsort((bw, bh))
    ids, bw, bh = ids[order], bw[order], bh[order]

    start = 0
    while start < len(ids):
        # Grow the chunk while the padded candidate grid stays under the budget.
        end = start + 1
        mh, mw = bh[start], bw[start]
        while end < len(ids):
            nh, nw = max(mh, bh[end]), max(mw, bw[end])
            if (end - start + 1) * nh * nw > _MAX_CANDIDATES:
                break
            mh, mw, end = nh, nw, end + 1
        chunk = ids[start:end]
        start = end
        _raster_chunk(chunk, tri, area, i0, j0, i1, j1, int(mh), int(mw), H, W, best_z, best_f, best_b)

    return best_f.reshape(H, W).astype(np.int32), best_b.reshape(H, W, 3).astype(np.float32)


def _raster_chunk(chunk, tri, area, i0, j0, i1, j1, mh, mw, H, W, best_z, best_f, best_b) -> None:
    """Evaluate every pixel of the padded [mh, mw] box of each face in `chunk`; merge into the buffers."""
    di, dj = np.meshgrid(np.arange(mh), np.arange(mw), indexing="ij")
    rows = i0[chunk, None, None] + di  # [n, mh, mw]
    cols = j0[chunk, None, None] + dj
    valid = (rows <= i1[chunk, None, None]) & (cols <= j1[chunk, None, None])
    px = (2 * cols + 1) / W - 1.0
    py = (2 * rows + 1) / H - 1.0
    t = tri[chunk]
    x0, y0, z0 = (t[:, 0, k][:, None, None] for k in range(3))
    x1, y1, z1 = (t[:, 1, k][:, None, None] for k in range(3))
    x2, y2, z2 = (t[:, 2, k][:, None, None] for k in range(3))
    denom = _edge(x2, y2, x0, y0, x1, y1) + K_EPSILON
    w0 = _edge(px, py, x1, y1, x2, y2) / denom
    w1 = _edge(px, py, x2, y2, x0, y0) / denom
    w2 = _edge(px, py, x0, y0, x1, y1) / denom
    pz = w0 * z0 + w1 * z1 + w2 * z2
    inside = valid & (w0 > 0) & (w1 > 0) & (w2 > 0) & (pz >= 0)
    n_idx, r_idx, c_idx = np.nonzero(inside)
    if len(n_idx) == 0:
        return
    pix = rows[n_idx, r_idx, c_idx] * W + cols[n_idx, r_idx, c_idx]
    zc = pz[n_idx, r_idx, c_idx]
    fc = chunk[n_idx]
    bc = np.stack([w0[n_idx, r_idx, c_idx], w1[n_idx, r_idx, c_idx], w2[n_idx, r_idx, c_idx]], 1)
    # Per pixel: nearest z, then smallest face index.
    o = np.lexsort((fc, zc, pix))
    pix, zc, fc, bc = pix[o], zc[o], fc[o], bc[o]
    first = np.ones(len(pix), dtype=bool)
    first[1:] = pix[1:] != pix[:-1]
    pix, zc, fc, bc = pix[first], zc[first], fc[first], bc[first]
    better = (zc < best_z[pix]) | ((zc == best_z[pix]) & (fc < best_f[pix]))
    pix = pix[better]
    best_z[pix] = zc[better]
    best_f[pix] = fc[better]
    best_b[pix] = bc[better]


def interpolate_face_attributes(face_index: np.ndarray, bary: np.ndarray, face_attrs: np.ndarray) -> np.ndarray:
    """Barycentric interpolation of per-face-vertex attributes [F, 3, D] -> [D, H, W], 0 on background."""
    fi = face_index.astype(np.int64)
    mask = fi >= 0
    vals = face_attrs[np.where(mask, fi, 0)]  # [H, W, 3, D]
    out = np.einsum("hwk,hwkd->dhw", bary.astype(np.float64), vals.astype(np.float64))
    return out * mask[None]


def grid_sample_bilinear(image: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """torch grid_sample(image [C,Hi,Wi], grid (gx, gy) [H,W], bilinear, zeros padding, align_corners=False)."""
    C, Hi, Wi = image.shape
    ix = ((gx + 1) * Wi - 1) / 2
    iy = ((gy + 1) * Hi - 1) / 2
    x0 = np.floor(ix).astype(np.int64)
    y0 = np.floor(iy).astype(np.int64)
    fx, fy = ix - x0, iy - y0
    out = np.zeros((C,) + gx.shape)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xx, yy = x0 + dx, y0 + dy
            ok = (xx >= 0) & (xx < Wi) & (yy >= 0) & (yy < Hi)
            v = image[:, np.clip(yy, 0, Hi - 1), np.clip(xx, 0, Wi - 1)]
            out += v * (wx * wy * ok)[None]
    return out


def sh_shading(normals: np.ndarray, sh_light: np.ndarray) -> np.ndarray:
    """DECA add_SHlight: normals [3,H,W], light [9,3] -> shading [3,H,W] (not clamped)."""
    nx, ny, nz = normals
    basis = np.stack([np.ones_like(nx), nx, ny, nz, nx * ny, nx * nz, ny * nz, nx ** 2 - ny ** 2, 3 * nz ** 2 - 1])
    basis = basis * SH_CONSTANTS[:, None, None]
    return np.einsum("kc,khw->chw", np.asarray(sh_light, dtype=np.float64), basis)


def render_hint(verts_ndc: np.ndarray, faces: np.ndarray, vertex_normals: np.ndarray, face_uvs: np.ndarray,
                uv_albedo: np.ndarray, sh_light: np.ndarray, height: int, width: int) -> np.ndarray:
    """CapHuman's 9-channel head hint: [normal | albedo | rendered], raw values, all masked.

    Args:
        verts_ndc: [V, 3] image NDC as in `rasterize` (DECA trans_verts after the +10 z offset).
        faces: [F, 3] int.
        vertex_normals: [V, 3] world-space vertex normals (interpolated, not re-normalised).
        face_uvs: [F, 3, 2] texture uv in [0, 1] with v up, as in the .obj.
        uv_albedo: [3, Hu, Wu] UV albedo map (row 0 = top of the texture image).
        sh_light: [9, 3] SH coefficients (band k, RGB c).
        height, width: output size.

    Returns:
        hint: [9, H, W] float32.
    """
    verts, faces = _check_mesh(verts_ndc, faces, height, width)
    vn = np.asarray(vertex_normals, dtype=np.float64)
    uvs = np.asarray(face_uvs, dtype=np.float64)
    alb = np.asarray(uv_albedo, dtype=np.float64)
    light = np.asarray(sh_light, dtype=np.float64)
    if vn.shape != verts.shape:
        raise ValueError(f"vertex_normals must be {verts.shape}, got {vn.shape}")
    if uvs.shape != (len(faces), 3, 2):
        raise ValueError(f"face_uvs must be [{len(faces)}, 3, 2], got {uvs.shape}")
    if alb.ndim != 3 or alb.shape[0] != 3:
        raise ValueError(f"uv_albedo must be [3, Hu, Wu], got {alb.shape}")
    if light.shape != (9, 3):
        raise ValueError(f"sh_light must be [9, 3], got {light.shape}")

    face_index, bary = rasterize(verts, faces, height, width)
    mask = (face_index >= 0).astype(np.float64)[None]
    normal = interpolate_face_attributes(face_index, bary, vn[faces])  # already 0 on background
    uv = interpolate_face_attributes(face_index, bary, uvs)
    gx, gy = uv[0] * 2 - 1, -(uv[1] * 2 - 1)
    gx, gy = gx * mask[0], gy * mask[0]  # background uv attributes are 0 in DECA
    albedo = grid_sample_bilinear(alb, gx, gy) * mask
    rendered = albedo * sh_shading(normal, light) * mask
    return np.concatenate([normal * mask, albedo, rendered]).astype(np.float32)
