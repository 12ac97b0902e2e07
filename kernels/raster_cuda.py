"""CUDA condition rasterizer: CapHuman's 9-channel head hint [normal | albedo | SH shading].

The same function as ``kernels/raster_reference.py`` (pytorch3d ``rasterize_meshes`` semantics with
faces_per_pixel=1, blur_radius=0, perspective_correct=False, no culling, as DECA's renderer uses
it), for a batch of heads, compiled at run time by NVRTC through CuPy (no build step).

Two kernels, one launch each:
1. ``raster_faces``: one warp per (head, face). Its lanes walk the pixel centres of the face's
   bounding box and, for each covered pixel, do ONE 64-bit ``atomicMin`` on a per-pixel key that packs the
   depth above the face index: the smallest depth wins and, at equal depth, the smallest face index
   (pytorch3d's per-face loop keeps the first face on ties). No second launch, no race.
2. ``shade_pixels``: one thread per (head, pixel). It decodes the winning face, recomputes its
   barycentrics, interpolates the world normals and UVs, samples the UV albedo (grid_sample
   bilinear, zeros padding, align_corners=False) and applies DECA's 9-band SH shading.

Numerics (chosen to equal the float64 CPU reference, not pytorch3d's float32):
* coverage math runs in float64 with FMA contraction off (``--fmad=false``), in the same operation
  order as the reference, so every inside/outside decision is bit-identical to it;
* the key is the float64 depth's bit pattern (monotone for depth >= 0, and depth < 0 is rejected)
  with its low ``FACE_BITS`` bits replaced by the face index: depth resolution ~2^-(52-FACE_BITS)
  relative (2^-38 for FLAME's 9976 faces), far below any depth gap of a real mesh; depths equal to
  that resolution count as ties and go to the smaller face index;
* barycentrics are rounded to float32 before interpolation, as the reference stores them.

The pixel centre of (row i, col j) is x = (2j+1)/W - 1, y = (2i+1)/H - 1 (x right, y down).
A face's warp loops over its whole bounding box, which suits FLAME's small faces (tens of pixels
each at 512x512); a mesh of screen-sized triangles would be correct but slow.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

from .raster_reference import SH_CONSTANTS as _REFERENCE_SH

__all__ = ["CUDA_SOURCE", "SH_CONSTANTS", "face_bits", "rasterize_cuda", "render_hint_cuda", "value_problem"]

SH_CONSTANTS = tuple(float(c) for c in _REFERENCE_SH)  # DECA SRenderY.constant_factor, one definition
_EMPTY_KEY = 0xFFFFFFFFFFFFFFFF  # larger than every packed key (finite depths stay below 0x7FF0...)
_NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")

_CUDA_TEMPLATE = r"""
typedef unsigned long long u64;
#define K_EPSILON 1e-8  /* pytorch3d kEpsilon */
#define EMPTY_KEY 0xFFFFFFFFFFFFFFFFull

/* pytorch3d EdgeFunctionForward: (p - a) x (b - a), same operation order as the reference. */
__device__ __forceinline__ double edge(double px, double py, double ax, double ay, double bx, double by) {
  return (px - ax) * (by - ay) - (py - ay) * (bx - ax);
}

struct Tri { double x0, y0, z0, x1, y1, z1, x2, y2, z2; };

__device__ __forceinline__ Tri load_tri(const float* __restrict__ verts, const int* __restrict__ faces,
                                        long long vbase, int f) {
  const int a = faces[3 * f + 0], b = faces[3 * f + 1], c = faces[3 * f + 2];
  Tri t;
  t.x0 = verts[vbase + 3 * a + 0]; t.y0 = verts[vbase + 3 * a + 1]; t.z0 = verts[vbase + 3 * a + 2];
  t.x1 = verts[vbase + 3 * b + 0]; t.y1 = verts[vbase + 3 * b + 1]; t.z1 = verts[vbase + 3 * b + 2];
  t.x2 = verts[vbase + 3 * c + 0]; t.y2 = verts[vbase + 3 * c + 1]; t.z2 = verts[vbase + 3 * c + 2];
  return t;
}

/* Screen-space barycentrics of (px, py) (pytorch3d BarycentricCoordsForward, area + kEpsilon). */
__device__ __forceinline__ void bary(const Tri& t, double px, double py, double& w0, double& w1, double& w2) {
  const double denom = edge(t.x2, t.y2, t.x0, t.y0, t.x1, t.y1) + K_EPSILON;
  w0 = edge(px, py, t.x1, t.y1, t.x2, t.y2) / denom;
  w1 = edge(px, py, t.x2, t.y2, t.x0, t.y0) / denom;
  w2 = edge(px, py, t.x0, t.y0, t.x1, t.y1) / denom;
}

extern "C" __global__ void raster_faces(
    const float* __restrict__ verts,  /* [B, V, 3] image NDC, x right, y down, z near = small */
    const int* __restrict__ faces,    /* [F, 3] */
    u64* __restrict__ zbuf,           /* [B, H, W] packed (depth | face), EMPTY_KEY = background */
    int B, int V, int F, int H, int W, int face_bits) {
  /* One warp per (head, face): the lanes stride over the face's bounding-box pixels, so a large
     face costs ceil(pixels / 32) steps instead of `pixels` steps on one thread. */
  const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= (long long)B * F) return;
  const int b = (int)(warp / F), f = (int)(warp % F);
  const int fa = faces[3 * f + 0], fb = faces[3 * f + 1], fc = faces[3 * f + 2];
  if (fa < 0 || fa >= V || fb < 0 || fb >= V || fc < 0 || fc >= V) return;  /* never read out of bounds */
  const Tri t = load_tri(verts, faces, (long long)b * V * 3, f);

  /* pytorch3d skips: zero-area faces (|area| <= kEpsilon) and faces with max z < 0. */
  const double area = edge(t.x0, t.y0, t.x1, t.y1, t.x2, t.y2);
  if (area <= K_EPSILON && area >= -K_EPSILON) return;
  if (fmax(t.z0, fmax(t.z1, t.z2)) < 0.0) return;

  /* Pixel-centre range of the bounding box, widened by one pixel against rounding; the exact
     inside test below decides. column = (x + 1) * W / 2 - 0.5. */
  const double xmin = fmin(t.x0, fmin(t.x1, t.x2)), xmax = fmax(t.x0, fmax(t.x1, t.x2));
  const double ymin = fmin(t.y0, fmin(t.y1, t.y2)), ymax = fmax(t.y0, fmax(t.y1, t.y2));
  const double jlo = floor((xmin + 1.0) * W * 0.5 - 0.5) - 1.0, jhi = ceil((xmax + 1.0) * W * 0.5 - 0.5) + 1.0;
  const double ilo = floor((ymin + 1.0) * H * 0.5 - 0.5) - 1.0, ihi = ceil((ymax + 1.0) * H * 0.5 - 0.5) + 1.0;
  const int j0 = (int)fmax(jlo, 0.0), j1 = (int)fmin(jhi, (double)(W - 1));
  const int i0 = (int)fmax(ilo, 0.0), i1 = (int)fmin(ihi, (double)(H - 1));
  if (j0 > j1 || i0 > i1) return;

  /* w_k = e_k / denom > 0  <=>  e_k has denom's sign (denom = +0 counts as positive: e / +0 = +inf).
     So the divisions, the costly part in float64, run only for covered pixels; results unchanged. */
  const double denom = edge(t.x2, t.y2, t.x0, t.y0, t.x1, t.y1) + K_EPSILON;
  const double sgn = denom >= 0.0 ? 1.0 : -1.0;
  u64* zb = zbuf + (long long)b * H * W;
  const u64 face_mask = (1ull << face_bits) - 1ull;
  const int bw = j1 - j0 + 1;
  const int n_pix = bw * (i1 - i0 + 1);
  for (int p = lane; p < n_pix; p += 32) {
    const int i = i0 + p / bw, j = j0 + p % bw;
    const double py = (2.0 * i + 1.0) / H - 1.0;
    const double px = (2.0 * j + 1.0) / W - 1.0;
    const double e0 = edge(px, py, t.x1, t.y1, t.x2, t.y2);
    const double e1 = edge(px, py, t.x2, t.y2, t.x0, t.y0);
    const double e2 = edge(px, py, t.x0, t.y0, t.x1, t.y1);
    if (!(sgn * e0 > 0.0 && sgn * e1 > 0.0 && sgn * e2 > 0.0)) continue;  /* strictly inside */
    const double w0 = e0 / denom, w1 = e1 / denom, w2 = e2 / denom;
    if (!(w0 > 0.0 && w1 > 0.0 && w2 > 0.0)) continue;  /* the reference's own test (underflow guard) */
    double pz = w0 * t.z0 + w1 * t.z1 + w2 * t.z2;
    if (pz < 0.0) continue;                               /* behind the image plane */
    pz = pz + 0.0;                                        /* -0.0 -> +0.0: bits stay monotone */
    const u64 key = ((u64)__double_as_longlong(pz) & ~face_mask) | (u64)f;
    atomicMin(zb + (long long)i * W + j, key);
  }
}

extern "C" __global__ void resolve_pixels(
    const float* __restrict__ verts, const int* __restrict__ faces, const u64* __restrict__ zbuf,
    int* __restrict__ face_index,     /* [B, H, W], -1 background */
    float* __restrict__ bary_out,     /* [B, H, W, 3] */
    int B, int V, int F, int H, int W, int face_bits) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (tid >= (long long)B * H * W) return;
  const int b = (int)(tid / ((long long)H * W));
  const int pix = (int)(tid % ((long long)H * W));
  const u64 key = zbuf[tid];
  if (key == EMPTY_KEY) {
    face_index[tid] = -1;
    bary_out[3 * tid + 0] = 0.f; bary_out[3 * tid + 1] = 0.f; bary_out[3 * tid + 2] = 0.f;
    return;
  }
  const int f = (int)(key & ((1ull << face_bits) - 1ull));
  const Tri t = load_tri(verts, faces, (long long)b * V * 3, f);
  const double px = (2.0 * (pix % W) + 1.0) / W - 1.0, py = (2.0 * (pix / W) + 1.0) / H - 1.0;
  double w0, w1, w2;
  bary(t, px, py, w0, w1, w2);
  face_index[tid] = f;
  bary_out[3 * tid + 0] = (float)w0; bary_out[3 * tid + 1] = (float)w1; bary_out[3 * tid + 2] = (float)w2;
}

/* DECA SRenderY.constant_factor, spelled out to 17 significant digits by the Python side */
__device__ const double SH_C[9] = {SH_C_VALUES};

extern "C" __global__ void shade_pixels(
    const float* __restrict__ verts,     /* [B, V, 3] */
    const int* __restrict__ faces,       /* [F, 3] */
    const u64* __restrict__ zbuf,        /* [B, H, W] */
    const float* __restrict__ normals,   /* [B, V, 3] world vertex normals */
    const float* __restrict__ face_uvs,  /* [F, 3, 2] uv in [0, 1], v up */
    const float* __restrict__ albedo,    /* [Ba, 3, Hu, Wu], Ba = 1 or B */
    const float* __restrict__ light,     /* [B, 9, 3] */
    float* __restrict__ out,             /* [B, 9, H, W] */
    int B, int V, int F, int H, int W, int Hu, int Wu, int albedo_batched, int face_bits) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long hw = (long long)H * W;
  if (tid >= (long long)B * hw) return;
  const int b = (int)(tid / hw);
  const int pix = (int)(tid % hw);
  float* o = out + (long long)b * 9 * hw + pix;
  const u64 key = zbuf[tid];
  if (key == EMPTY_KEY) {
#pragma unroll
    for (int c = 0; c < 9; ++c) o[c * hw] = 0.f;
    return;
  }
  const int f = (int)(key & ((1ull << face_bits) - 1ull));
  const Tri t = load_tri(verts, faces, (long long)b * V * 3, f);
  const double px = (2.0 * (pix % W) + 1.0) / W - 1.0, py = (2.0 * (pix / W) + 1.0) / H - 1.0;
  double w0d, w1d, w2d;
  bary(t, px, py, w0d, w1d, w2d);
  /* the reference stores barycentrics as float32, then interpolates in float64 */
  const double w[3] = {(double)(float)w0d, (double)(float)w1d, (double)(float)w2d};

  const float* nb = normals + (long long)b * V * 3;
  double n[3] = {0.0, 0.0, 0.0}, uv[2] = {0.0, 0.0};
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const int vi = faces[3 * f + k];
    n[0] += w[k] * nb[3 * vi + 0];
    n[1] += w[k] * nb[3 * vi + 1];
    n[2] += w[k] * nb[3 * vi + 2];
    uv[0] += w[k] * face_uvs[6 * f + 2 * k + 0];
    uv[1] += w[k] * face_uvs[6 * f + 2 * k + 1];
  }

  /* grid_sample(bilinear, zeros, align_corners=False) at grid (u*2-1, -(v*2-1)) */
  const double gx = uv[0] * 2.0 - 1.0, gy = -(uv[1] * 2.0 - 1.0);
  const double ix = ((gx + 1.0) * Wu - 1.0) / 2.0, iy = ((gy + 1.0) * Hu - 1.0) / 2.0;
  const double fx0 = floor(ix), fy0 = floor(iy);
  const int x0 = (int)fx0, y0 = (int)fy0;
  const double fx = ix - fx0, fy = iy - fy0;
  const float* ab = albedo + (albedo_batched ? (long long)b * 3 * Hu * Wu : 0ll);
  double alb[3] = {0.0, 0.0, 0.0};
#pragma unroll
  for (int dy = 0; dy < 2; ++dy) {
#pragma unroll
    for (int dx = 0; dx < 2; ++dx) {
      const int xx = x0 + dx, yy = y0 + dy;
      if (xx < 0 || xx >= Wu || yy < 0 || yy >= Hu) continue;
      const double wt = (dx ? fx : 1.0 - fx) * (dy ? fy : 1.0 - fy);
      const long long off = (long long)yy * Wu + xx;
#pragma unroll
      for (int c = 0; c < 3; ++c) alb[c] += wt * ab[(long long)c * Hu * Wu + off];
    }
  }

  /* DECA add_SHlight: shading_c = sum_k light[k, c] * c_k * Y_k(N), N not re-normalised */
  const double Y[9] = {1.0, n[0], n[1], n[2], n[0] * n[1], n[0] * n[2], n[1] * n[2],
                       n[0] * n[0] - n[1] * n[1], 3.0 * n[2] * n[2] - 1.0};
  const float* lb = light + (long long)b * 27;
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < 9; ++k) s += (double)lb[3 * k + c] * (SH_C[k] * Y[k]);
    o[c * hw] = (float)n[c];
    o[(3 + c) * hw] = (float)alb[c];
    o[(6 + c) * hw] = (float)(alb[c] * s);
  }
}
"""


CUDA_SOURCE = _CUDA_TEMPLATE.replace("SH_C_VALUES", ", ".join(f"{c:.17g}" for c in SH_CONSTANTS))


def face_bits(num_faces: int) -> int:
    """Low key bits that hold the face index (the rest hold the float64 depth's top bits)."""
    if num_faces < 1 or num_faces > (1 << 31) - 1:
        raise ValueError(f"num_faces={num_faces} must be in [1, 2^31 - 1]")
    return max(1, int(num_faces - 1).bit_length())


_modules: dict[int, object] = {}
_modules_lock = threading.Lock()


def _module(device_index: int):
    """The compiled CuPy RawModule for one device (NVRTC at first use, then cached)."""
    with _modules_lock:
        mod = _modules.get(device_index)
        if mod is None:
            try:
                import cupy  # lazily: this module must import on machines without CUDA
            except ImportError as exc:  # pragma: no cover - depends on the machine
                raise RuntimeError("the CUDA rasterizer needs CuPy (pip install cupy-cuda12x or cupy-cuda13x)") from exc
            with cupy.cuda.Device(device_index):
                mod = cupy.RawModule(code=CUDA_SOURCE, options=_NVRTC_OPTIONS)
                for name in ("raster_faces", "resolve_pixels", "shade_pixels"):
                    mod.get_function(name)  # compile now, not inside a timed or captured launch
            _modules[device_index] = mod
        return mod


def _external_stream(cupy, ptr: int):
    """CuPy view of torch's current stream (ExternalStream; deprecated in CuPy 14 but still there)."""
    if hasattr(cupy.cuda, "ExternalStream"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return cupy.cuda.ExternalStream(ptr)
    return cupy.cuda.Stream.from_external(ptr)  # pragma: no cover - CuPy without ExternalStream


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _launch(name: str, device: torch.device, n_threads: int, args: tuple) -> None:
    """Launch `name` with `n_threads` threads in blocks of 256 on torch's current stream."""
    import cupy

    mod = _module(device.index)
    kernel = mod.get_function(name)
    block = 256
    grid = (n_threads + block - 1) // block
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), _external_stream(cupy, stream.cuda_stream):
        kernel((grid,), (block,), args)


def _as(t, dtype: torch.dtype, device: torch.device, name: str, shape_hint: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(np.asarray(t))
    if t.is_complex() or (t.is_floating_point() != dtype.is_floating_point):
        raise ValueError(f"{name} must be a {'float' if dtype.is_floating_point else 'integer'} {shape_hint} tensor, "
                         f"got {t.dtype}")
    return t.to(device=device, dtype=dtype).contiguous()


def value_problem(verts: torch.Tensor, faces: torch.Tensor) -> str | None:
    """None if faces index inside [0, V) and every vertex is finite, else what is wrong (one sync)."""
    V = verts.shape[-2]
    flags = torch.stack([(faces < 0).any() | (faces >= V).any(), ~torch.isfinite(verts).all()]).cpu()
    if bool(flags[0]):
        return f"faces index vertices outside [0, {V})"
    if bool(flags[1]):
        return "verts_ndc contains NaN or inf"
    return None


def _check_geometry(verts_ndc, faces, height: int, width: int,
                    check_values: bool) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    if not isinstance(verts_ndc, torch.Tensor) or not verts_ndc.is_cuda:
        raise ValueError("verts_ndc must be a CUDA torch tensor [B, V, 3]")
    device = verts_ndc.device
    verts = _as(verts_ndc, torch.float32, device, "verts_ndc", "[B, V, 3]")
    if verts.ndim != 3 or verts.shape[2] != 3:
        raise ValueError(f"verts_ndc must be [B, V, 3], got {tuple(verts.shape)}")
    f = _as(faces, torch.int32, device, "faces", "[F, 3]")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] < 1:
        raise ValueError(f"faces must be [F, 3] with F >= 1, got {tuple(f.shape)}")
    if int(height) < 1 or int(width) < 1 or int(height) * int(width) > (1 << 28):
        raise ValueError(f"image size {height}x{width} must be positive and at most 2^28 pixels")
    if check_values:  # one host sync; the kernel itself skips faces with out-of-range indices
        problem = value_problem(verts, f)
        if problem is not None:
            raise ValueError(problem)
    return verts, f, device


def _zbuffer(verts: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int]:
    B, V, F = verts.shape[0], verts.shape[1], faces.shape[0]
    bits = face_bits(F)
    zbuf = torch.full((B, height, width), -1, dtype=torch.int64, device=verts.device)  # all ones = empty
    _launch("raster_faces", verts.device, 32 * B * F,  # one warp per (head, face)
            (_ptr(verts), _ptr(faces), _ptr(zbuf), np.int32(B), np.int32(V), np.int32(F),
             np.int32(height), np.int32(width), np.int32(bits)))
    return zbuf, bits


def rasterize_cuda(verts_ndc: torch.Tensor, faces, height: int, width: int, *,
                   check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``raster_reference.rasterize``.

    Args:
        verts_ndc: [B, V, 3] CUDA float tensor, image NDC (x right, y down), z near = small.
        faces: [F, 3] integer vertex indices (tensor or array).
        check_values: raise ValueError on out-of-range face indices or non-finite vertices (costs
            one host sync; pass False on a hot path whose inputs are known good).
    Returns:
        face_index [B, H, W] int32 (-1 background) and bary [B, H, W, 3] float32, on verts' device.
    """
    verts, f, device = _check_geometry(verts_ndc, faces, height, width, check_values)
    zbuf, bits = _zbuffer(verts, f, height, width)
    B, V, F = verts.shape[0], verts.shape[1], f.shape[0]
    face_index = torch.empty((B, height, width), dtype=torch.int32, device=device)
    bary = torch.empty((B, height, width, 3), dtype=torch.float32, device=device)
    _launch("resolve_pixels", device, B * height * width,
            (_ptr(verts), _ptr(f), _ptr(zbuf), _ptr(face_index), _ptr(bary), np.int32(B), np.int32(V),
             np.int32(F), np.int32(height), np.int32(width), np.int32(bits)))
    return face_index, bary


def render_hint_cuda(verts_ndc: torch.Tensor, faces, vertex_normals, face_uvs, uv_albedo, sh_light,
                     height: int, width: int, *, check_values: bool = True) -> torch.Tensor:
    """Batched ``raster_reference.render_hint`` on the GPU, on torch's current stream.

    Args:
        verts_ndc: [B, V, 3] CUDA float tensor, image NDC (x right, y down), z near = small.
        faces: [F, 3] int.
        vertex_normals: [B, V, 3] world-space vertex normals (interpolated, not re-normalised).
        face_uvs: [F, 3, 2] texture uv in [0, 1], v up (as in the .obj).
        uv_albedo: [B or 1, 3, Hu, Wu] UV albedo maps.
        sh_light: [B, 9, 3] SH coefficients (band k, RGB c).
        height, width: output size.
        check_values: as in ``rasterize_cuda``.
    Returns:
        [B, 9, H, W] float32 CUDA tensor: normal(3) | albedo(3) | albedo * SH shading(3), 0 on background.
    """
    verts, f, device = _check_geometry(verts_ndc, faces, height, width, check_values)
    B, V, F = verts.shape[0], verts.shape[1], f.shape[0]
    normals = _as(vertex_normals, torch.float32, device, "vertex_normals", "[B, V, 3]")
    if tuple(normals.shape) != (B, V, 3):
        raise ValueError(f"vertex_normals must be {(B, V, 3)}, got {tuple(normals.shape)}")
    uvs = _as(face_uvs, torch.float32, device, "face_uvs", "[F, 3, 2]")
    if tuple(uvs.shape) != (F, 3, 2):
        raise ValueError(f"face_uvs must be {(F, 3, 2)}, got {tuple(uvs.shape)}")
    alb = _as(uv_albedo, torch.float32, device, "uv_albedo", "[B or 1, 3, Hu, Wu]")
    if alb.ndim != 4 or alb.shape[1] != 3 or alb.shape[0] not in (1, B) or alb.shape[2] < 1 or alb.shape[3] < 1:
        raise ValueError(f"uv_albedo must be [1 or {B}, 3, Hu, Wu], got {tuple(alb.shape)}")
    light = _as(sh_light, torch.float32, device, "sh_light", "[B, 9, 3]")
    if tuple(light.shape) != (B, 9, 3):
        raise ValueError(f"sh_light must be {(B, 9, 3)}, got {tuple(light.shape)}")

    zbuf, bits = _zbuffer(verts, f, height, width)
    out = torch.empty((B, 9, height, width), dtype=torch.float32, device=device)
    _launch("shade_pixels", device, B * height * width,
            (_ptr(verts), _ptr(f), _ptr(zbuf), _ptr(normals), _ptr(uvs), _ptr(alb), _ptr(light), _ptr(out),
             np.int32(B), np.int32(V), np.int32(F), np.int32(height), np.int32(width), np.int32(alb.shape[2]),
             np.int32(alb.shape[3]), np.int32(1 if alb.shape[0] == B and B > 1 else 0), np.int32(bits)))
    return out
