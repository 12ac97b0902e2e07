"""DECA's orthographic camera and crop-to-image mapping (spec 6.5; ``deca.py`` L198-219).

1. p = s * ([x + tx, y + ty], z), then y and z negated: crop NDC of the 224 crop;
2. crop pixels u = (p_x * 0.5 + 0.5) * 224, v likewise;
3. original pixels [X, Y, 1] = [u, v, 1] . tform, with tform = inv(T)^T of the crop's similarity T;
4. image NDC x = X / w * 2 - 1, y = Y / h * 2 - 1, z kept; the renderer adds +10 to z.
"""
from __future__ import annotations

import numpy as np

CROP_SIZE = 224
Z_OFFSET = 10.0


def orth_project(points: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """batch_orth_proj + the y/z flip: world [N, 3] -> crop NDC [N, 3]."""
    s, tx, ty = (float(c) for c in cam)
    out = np.empty_like(points, dtype=np.float64)
    out[:, 0] = s * (points[:, 0] + tx)
    out[:, 1] = -s * (points[:, 1] + ty)
    out[:, 2] = -s * points[:, 2]
    return out


def crop_to_image(points: np.ndarray, tform_rows: np.ndarray, height: int, width: int,
                  crop_size: int = CROP_SIZE) -> np.ndarray:
    """transform_points: crop NDC -> image NDC through the row-vector 3x3 `tform_rows`; z kept."""
    uv = (points[:, :2] * 0.5 + 0.5) * crop_size
    xy = np.concatenate([uv, np.ones((len(uv), 1))], 1) @ tform_rows
    out = points.astype(np.float64).copy()
    out[:, 0] = xy[:, 0] / width * 2 - 1
    out[:, 1] = xy[:, 1] / height * 2 - 1
    return out


def project(points: np.ndarray, cam: np.ndarray, tform_rows: np.ndarray, height: int, width: int) -> np.ndarray:
    """World points -> image NDC (x right, y down), z = DECA's depth (no +10)."""
    return crop_to_image(orth_project(points, cam), tform_rows, height, width)


def full_frame_tform(height: int, width: int, crop_size: int = CROP_SIZE) -> np.ndarray:
    """Row-vector tform for a 'crop' that is the whole frame: crop NDC equals image NDC."""
    return np.diag([width / crop_size, height / crop_size, 1.0])


def similarity_crop(center: tuple[float, float], size: int, crop_size: int = CROP_SIZE) -> np.ndarray:
    """DECA's T: the square (center, size) -> [0, crop_size-1]^2, as estimate_transform('similarity') of the
    three corner points gives (scale (crop_size-1)/size, no rotation). Returns the 3x3 matrix T."""
    cx, cy = center
    scale = (crop_size - 1) / size
    return np.array([[scale, 0.0, -scale * (cx - size / 2)],
                     [0.0, scale, -scale * (cy - size / 2)],
                     [0.0, 0.0, 1.0]])


def tform_rows_from_T(T: np.ndarray) -> np.ndarray:
    """The official `inv(T)^T`, mapping crop pixels -> original pixels as row vectors."""
    return np.linalg.inv(T).T
