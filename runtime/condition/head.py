"""Head geometry for the hint: the FLAME model when its files are given, else the rigid template.

Both expose `pose_vertices(shape, exp, pose) -> (verts [V,3], landmarks68 [68,3])` in FLAME's
world frame (x right, y up, z toward the camera), plus faces, per-face UVs and an albedo source.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from caphuman.export.face.flame import Flame, flame_albedo, load_flame_model, load_flame_texture, vertex_normals

from .controls import axis_angle_to_matrix
from .template import (head_template, landmark_embedding, landmarks_from_vertices, mean_texture_albedo,
                       template_landmarks68)

log = logging.getLogger(__name__)


@dataclass
class PosedHead:
    verts: np.ndarray        # [V, 3] world
    landmarks3d: np.ndarray  # [68, 3] world (DECA landmarks3d)
    landmarks2d: np.ndarray  # [68, 3] world (DECA landmarks2d: dynamic contour + 51 static)
    normals: np.ndarray      # [V, 3] world vertex normals (DECA util.vertex_normals)


class HeadModel(abc.ABC):
    """Shared parts: FLAME-topology faces and UVs, albedo from FLAME_texture.npz or the mean texture."""

    deforms = False

    def __init__(self, texture_path: str | Path | None = None):
        mesh = head_template()
        self.faces = mesh.faces
        self.face_uvs = mesh.face_uvs
        self.texture = load_flame_texture(texture_path) if texture_path else None

    def albedo(self, tex: np.ndarray) -> np.ndarray:
        """[50] texture code -> [3, 256, 256] UV albedo (FLAMETex with the .npz, else the mean texture)."""
        if self.texture is None:
            return mean_texture_albedo()
        mean, tex_dir = (torch.from_numpy(a) for a in self.texture)
        with torch.no_grad():
            out = flame_albedo(mean, tex_dir, torch.as_tensor(tex, dtype=torch.float32)[None])
        return out[0].numpy()

    @abc.abstractmethod
    def pose_vertices(self, shape: np.ndarray, exp: np.ndarray, pose: np.ndarray) -> PosedHead:
        """Vertices, normals and landmarks of the head for these codes (world space)."""


class TemplateHead(HeadModel):
    """DECA's head template, rotated rigidly about its bounding-box centre; shape/expression/jaw ignored."""

    def __init__(self, texture_path: str | Path | None = None):
        super().__init__(texture_path)
        self.vertices = head_template().vertices
        self.center = (self.vertices.min(0) + self.vertices.max(0)) / 2
        # Template normals once (rigid rotation rotates them).
        v = torch.as_tensor(self.vertices, dtype=torch.float32)[None]
        self._normals = vertex_normals(v, torch.as_tensor(self.faces))[0].double().numpy()
        emb = landmark_embedding()
        self._lmk3d = template_landmarks68(self.vertices, self.faces)
        # Neutral pose: the dynamic contour row for yaw 0 is row 0.
        self._lmk2d = np.concatenate([
            landmarks_from_vertices(self.vertices, self.faces, emb["dynamic_lmk_faces_idx"][0], emb["dynamic_lmk_bary_coords"][0]),
            landmarks_from_vertices(self.vertices, self.faces, emb["static_lmk_faces_idx"], emb["static_lmk_bary_coords"])])

    def pose_vertices(self, shape, exp, pose) -> PosedHead:
        R = axis_angle_to_matrix(np.asarray(pose[:3], dtype=np.float64))
        def rot(p):
            return (p - self.center) @ R.T + self.center
        return PosedHead(rot(self.vertices), rot(self._lmk3d), rot(self._lmk2d), self._normals @ R.T)


class FlameHead(HeadModel):
    """FLAME (generic_model.pkl): shape, expression, jaw and global pose deform the mesh (DECA decode)."""

    deforms = True

    def __init__(self, model_path: str | Path, texture_path: str | Path | None = None):
        super().__init__(texture_path)
        data = load_flame_model(model_path)
        if data.faces.shape != self.faces.shape or not np.array_equal(data.faces, self.faces):
            raise ValueError(f"FLAME model {model_path}: faces differ from the FLAME head template topology")
        self.flame = Flame(data, landmark_embedding()).eval()

    def pose_vertices(self, shape, exp, pose) -> PosedHead:
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)[None]  # noqa: E731
        with torch.no_grad():
            verts, lmk2d, lmk3d = self.flame(t(shape), t(exp), t(pose))
            normals = vertex_normals(verts, self.flame.faces)
        return PosedHead(verts[0].double().numpy(), lmk3d[0].double().numpy(), lmk2d[0].double().numpy(),
                         normals[0].double().numpy())


def load_head_model(flame_model: str | Path | None = None, flame_texture: str | Path | None = None) -> HeadModel:
    """FlameHead when generic_model.pkl is given, else the rigid TemplateHead."""
    if flame_model:
        return FlameHead(flame_model, flame_texture)
    return TemplateHead(flame_texture)
