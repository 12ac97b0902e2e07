"""The FLAME-topology head template (DECA ``head_template.obj``), its UVs, landmarks and mean texture.

Shipped copies live in ``runtime/condition/assets`` (from yfeng95/DECA's ``data/``): the template
mesh (5023 vertices, 9976 faces, 5118 UV vertices), ``landmark_embedding.npy`` and
``mean_texture.jpg``. With no FLAME model the head is this template, posed rigidly and coloured
with the mean texture; with ``generic_model.pkl`` the FLAME vertices replace it (same topology,
so faces, UVs and landmark embedding are shared).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from caphuman.export.face.flame import load_landmark_embedding

ASSETS = Path(__file__).parent / "assets"
TEMPLATE_OBJ = ASSETS / "head_template.obj"
LANDMARK_EMBEDDING = ASSETS / "landmark_embedding.npy"
MEAN_TEXTURE = ASSETS / "mean_texture.jpg"
UV_SIZE = 256


@dataclass(frozen=True)
class ObjMesh:
    vertices: np.ndarray   # [V, 3] float64
    faces: np.ndarray      # [F, 3] int64 vertex indices
    uvs: np.ndarray        # [T, 2] float64 texture coordinates (v up)
    uv_faces: np.ndarray   # [F, 3] int64 indices into uvs

    @property
    def face_uvs(self) -> np.ndarray:
        """[F, 3, 2] per-corner uv."""
        return self.uvs[self.uv_faces]


def load_obj(path: str | Path) -> ObjMesh:
    """Triangle .obj with ``v``, ``vt`` and ``f v/vt`` lines (DECA's template format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh not found: {path}")
    verts, uvs, faces, uv_faces = [], [], [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if parts[0] == "v":
                    verts.append([float(p) for p in parts[1:4]])
                elif parts[0] == "vt":
                    uvs.append([float(p) for p in parts[1:3]])
                elif parts[0] == "f":
                    corners = [p.split("/") for p in parts[1:]]
                    if len(corners) != 3:
                        raise ValueError("only triangles are supported")
                    faces.append([int(c[0]) - 1 for c in corners])
                    uv_faces.append([int(c[1]) - 1 if len(c) > 1 and c[1] else int(c[0]) - 1 for c in corners])
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{lineno}: cannot parse '{line.strip()[:60]}': {e}") from None
    mesh = ObjMesh(np.asarray(verts, dtype=np.float64), np.asarray(faces, dtype=np.int64),
                   np.asarray(uvs, dtype=np.float64), np.asarray(uv_faces, dtype=np.int64))
    if len(mesh.faces) == 0 or mesh.faces.max() >= len(mesh.vertices) or mesh.faces.min() < 0:
        raise ValueError(f"{path}: faces reference missing vertices")
    if len(mesh.uvs) and (mesh.uv_faces.max() >= len(mesh.uvs) or mesh.uv_faces.min() < 0):
        raise ValueError(f"{path}: faces reference missing texture coordinates")
    return mesh


@lru_cache(maxsize=2)
def head_template(path: str | None = None) -> ObjMesh:
    """The shipped (or given) FLAME-topology template, cached."""
    return load_obj(path or TEMPLATE_OBJ)


@lru_cache(maxsize=2)
def landmark_embedding(path: str | None = None) -> dict[str, np.ndarray]:
    return load_landmark_embedding(path or LANDMARK_EMBEDDING)


def mean_texture_albedo(path: str | Path | None = None, uv_size: int = UV_SIZE) -> np.ndarray:
    """DECA's mean texture as a [3, uv_size, uv_size] UV albedo in [0, 1] (nearest resize, as DECA's F.interpolate).
    Read once per (path, size); each call returns a fresh copy."""
    return _mean_texture(str(path or MEAN_TEXTURE), uv_size).copy()


@lru_cache(maxsize=4)
def _mean_texture(path: str, uv_size: int) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    h, w = img.shape[:2]
    rows = np.floor(np.arange(uv_size) * (h / uv_size)).astype(np.int64)  # torch 'nearest' index rule
    cols = np.floor(np.arange(uv_size) * (w / uv_size)).astype(np.int64)
    return img[rows][:, cols].transpose(2, 0, 1).copy()


def landmarks_from_vertices(verts: np.ndarray, faces: np.ndarray, face_idx: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Barycentric landmarks: verts [V, 3], face_idx [L], bary [L, 3] -> [L, 3]."""
    tri = verts[faces[face_idx.reshape(-1)]]  # [L, 3, 3]
    return np.einsum("lfi,lf->li", tri, bary.reshape(-1, 3))


def template_landmarks68(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """The 68 3D landmarks (``full_lmk_*``, DECA's landmarks3d) of a FLAME-topology mesh."""
    emb = landmark_embedding()
    return landmarks_from_vertices(verts, faces, emb["full_lmk_faces_idx"], emb["full_lmk_bary_coords"])


def five_points(lmk68: np.ndarray) -> np.ndarray:
    """MTCNN's five points from 68 landmarks: eye centres (subject's right eye first = image left), nose tip, mouth corners."""
    return np.stack([lmk68[36:42].mean(0), lmk68[42:48].mean(0), lmk68[30], lmk68[48], lmk68[54]])
