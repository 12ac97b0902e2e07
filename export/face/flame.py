"""FLAME head model as DECA uses it (``libs/decalib/models/FLAME.py``, ``lbs.py``; spec section 6.4).

* `load_flame_model` reads ``generic_model.pkl`` (FLAME2020, a chumpy-era pickle) through the
  restricted unpickler of `safe_pickle`; nothing in the file can run code.
* `Flame` is the model: shapedirs = [shape 0:100 | expression 300:350], posedirs (36 x 15069),
  J_regressor (5 x 5023), LBS with the official Rodrigues (angle = ||r + 1e-8||), full pose
  [global, neck=0, jaw, eyes=0], 2D landmarks (17 dynamic contour + 51 static) and the 68 3D ones.
* `load_flame_texture` + `flame_albedo` give DECA's FLAMETex albedo: mean/255 + tex_dir/255 . tex,
  512x512x3 -> CHW -> nearest downsample to 256 -> channel reverse [2, 1, 0].
* `load_landmark_embedding` reads DECA's ``landmark_embedding.npy`` (pickled torch tensors) safely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .safe_pickle import load_flame_pickle, load_npy_object

N_SHAPE, N_EXP, N_TEX = 100, 50, 50
NUM_VERTS, NUM_FACES = 5023, 9976
_MAX_FILE_BYTES = 512 << 20


def _read(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size > _MAX_FILE_BYTES:
        raise ValueError(f"{what} {path} is larger than {_MAX_FILE_BYTES >> 20} MB")
    return path.read_bytes()


@dataclass
class FlameData:
    """The arrays of generic_model.pkl that DECA uses, as NumPy."""
    v_template: np.ndarray   # [V, 3]
    faces: np.ndarray        # [F, 3] int64
    shapedirs: np.ndarray    # [V, 3, >=350]
    posedirs: np.ndarray     # [V, 3, 36]
    J_regressor: np.ndarray  # [5, V] dense
    weights: np.ndarray      # [V, 5]
    kintree_table: np.ndarray  # [2, 5]


def load_flame_model(path: str | Path) -> FlameData:
    """Read FLAME ``generic_model.pkl``; a clear ValueError if keys or shapes do not match FLAME."""
    raw = load_flame_pickle(_read(path, "FLAME model"), what=f"FLAME model {path}")
    need = ["v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table"]
    missing = [k for k in need if k not in raw]
    if missing:
        raise ValueError(f"FLAME model {path}: missing keys {missing} (is this FLAME's generic_model.pkl?)")
    data = FlameData(
        v_template=np.asarray(raw["v_template"], dtype=np.float64),
        faces=np.asarray(raw["f"]).astype(np.int64),
        shapedirs=np.asarray(raw["shapedirs"], dtype=np.float64),
        posedirs=np.asarray(raw["posedirs"], dtype=np.float64),
        J_regressor=np.asarray(raw["J_regressor"], dtype=np.float64),
        weights=np.asarray(raw["weights"], dtype=np.float64),
        kintree_table=np.asarray(raw["kintree_table"]).astype(np.int64),
    )
    V = data.v_template.shape[0]
    checks = {
        "v_template": (data.v_template.shape, (V, 3)),
        "shapedirs": (data.shapedirs.shape[:2], (V, 3)),
        "posedirs": (data.posedirs.shape[:2], (V, 3)),
        "J_regressor": (data.J_regressor.shape[1:], (V,)),
        "weights": (data.weights.shape, (V, data.J_regressor.shape[0])),
        "kintree_table": (data.kintree_table.shape, (2, data.J_regressor.shape[0])),
    }
    for name, (got, want) in checks.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"FLAME model {path}: {name} has shape {got}, expected {want}")
    if data.shapedirs.shape[2] < 300 + N_EXP:
        raise ValueError(f"FLAME model {path}: shapedirs has {data.shapedirs.shape[2]} components, "
                         f"DECA needs 300 shape + {N_EXP} expression")
    if data.faces.ndim != 2 or data.faces.shape[1] != 3 or data.faces.min() < 0 or data.faces.max() >= V:
        raise ValueError(f"FLAME model {path}: faces 'f' must be [F, 3] indices into {V} vertices")
    return data


def load_landmark_embedding(path: str | Path) -> dict[str, np.ndarray]:
    """DECA ``landmark_embedding.npy`` -> dict of NumPy arrays (static/dynamic/full face indices + barycentrics)."""
    obj = load_npy_object(_read(path, "landmark embedding"), what=f"landmark embedding {path}")
    keys = ["static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx",
            "dynamic_lmk_bary_coords", "full_lmk_faces_idx", "full_lmk_bary_coords"]
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise ValueError(f"landmark embedding {path}: expected a dict with keys {keys}")
    out = {}
    for k in keys:
        v = obj[k]
        out[k] = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return out


def load_flame_texture(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``FLAME_texture.npz`` -> (mean [1, 512*512*3], tex_dir [512*512*3, 200]); no pickles allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLAME texture not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mean" not in z or "tex_dir" not in z:
                raise ValueError(f"FLAME texture {path}: expected keys 'mean' and 'tex_dir', got {list(z.keys())}")
            mean, tex_dir = z["mean"], z["tex_dir"]
    except (OSError, ValueError) as e:
        if "expected keys" in str(e):
            raise
        raise ValueError(f"FLAME texture {path} is not a readable .npz: {e}") from None
    mean = mean.reshape(1, -1).astype(np.float32)
    n = mean.shape[1]
    if n != 512 * 512 * 3 or tex_dir.size % n or tex_dir.size // n < N_TEX:
        raise ValueError(f"FLAME texture {path}: expected mean of 512*512*3 values and tex_dir with at least "
                         f"{N_TEX} components, got {n} and {tex_dir.size / max(n, 1):g}")
    return mean, tex_dir.reshape(n, -1).astype(np.float32)


def flame_albedo(mean: torch.Tensor, tex_dir: torch.Tensor, texcode: torch.Tensor) -> torch.Tensor:
    """DECA FLAMETex: [B, n_tex] texture code -> [B, 3, 256, 256] UV albedo (BGR->RGB reversed, ~[0, 1])."""
    n_tex = texcode.shape[1]
    if tex_dir.shape[1] < n_tex:
        raise ValueError(f"FLAME texture has {tex_dir.shape[1]} components, the texture code {n_tex}")
    # mean/255 + sum_k tex_dir[:, k]/255 * code[k] (the official elementwise-sum, as one matmul)
    tex = mean / 255.0 + texcode @ (tex_dir[:, :n_tex] / 255.0).T
    tex = tex.reshape(texcode.shape[0], 512, 512, 3).permute(0, 3, 1, 2)
    tex = F.interpolate(tex, size=(256, 256))  # mode 'nearest', the default, as the official code
    return tex[:, [2, 1, 0]]


# ----------------------------------------------------------------------------------------- LBS
def batch_rodrigues(rot_vecs: torch.Tensor) -> torch.Tensor:
    """Axis-angle [N, 3] -> rotation matrices [N, 3, 3]; angle = ||r + 1e-8|| as the official lbs.py."""
    angle = torch.norm(rot_vecs + 1e-8, dim=1, keepdim=True)
    axis = rot_vecs / angle
    cos, sin = torch.cos(angle)[:, :, None], torch.sin(angle)[:, :, None]
    rx, ry, rz = axis[:, 0:1], axis[:, 1:2], axis[:, 2:3]
    zeros = torch.zeros_like(rx)
    K = torch.cat([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], dim=1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device)[None]
    return eye + sin * K + (1 - cos) * torch.bmm(K, K)


def rot_mat_to_euler_y(rot: torch.Tensor) -> torch.Tensor:
    """The y-rotation the official dynamic-landmark lookup uses: atan2(-R20, sqrt(R00^2 + R10^2))."""
    sy = torch.sqrt(rot[:, 0, 0] ** 2 + rot[:, 1, 0] ** 2)
    return torch.atan2(-rot[:, 2, 0], sy)


def _rigid_transform(rot_mats: torch.Tensor, joints: torch.Tensor, parents: list[int]) -> torch.Tensor:
    """Relative (skinning) transforms [B, J, 4, 4] of the kinematic chain."""
    B, J = joints.shape[:2]
    rel = joints.clone()
    rel[:, 1:] = rel[:, 1:] - joints[:, parents[1:]]
    local = torch.zeros(B, J, 4, 4, dtype=joints.dtype, device=joints.device)
    local[:, :, :3, :3] = rot_mats
    local[:, :, :3, 3] = rel
    local[:, :, 3, 3] = 1
    chain = [local[:, 0]]
    for i in range(1, J):
        chain.append(chain[parents[i]] @ local[:, i])
    world = torch.stack(chain, dim=1)
    joints_h = torch.cat([joints, torch.zeros_like(joints[..., :1])], -1)[..., None]
    offset = world @ joints_h  # [B, J, 4, 1]
    out = world.clone()
    out[:, :, :, 3] = world[:, :, :, 3] - offset[..., 0]
    return out


class Flame(nn.Module):
    """FLAME as DECA decodes it: (shape 100, expression 50, pose 6) -> vertices and landmarks."""

    def __init__(self, data: FlameData, landmarks: dict[str, np.ndarray], n_shape: int = N_SHAPE, n_exp: int = N_EXP):
        super().__init__()
        f32 = torch.float32
        self.register_buffer("v_template", torch.tensor(data.v_template, dtype=f32))
        self.register_buffer("faces", torch.tensor(data.faces, dtype=torch.long))
        sd = np.concatenate([data.shapedirs[:, :, :n_shape], data.shapedirs[:, :, 300:300 + n_exp]], 2)
        self.register_buffer("shapedirs", torch.tensor(sd, dtype=f32))
        nb = data.posedirs.shape[-1]
        self.register_buffer("posedirs", torch.tensor(data.posedirs.reshape(-1, nb).T, dtype=f32))
        self.register_buffer("J_regressor", torch.tensor(data.J_regressor, dtype=f32))
        self.register_buffer("lbs_weights", torch.tensor(data.weights, dtype=f32))
        parents = data.kintree_table[0].astype(np.int64).copy()
        parents[0] = -1
        self.parents = [int(p) for p in parents]
        neck, chain = 1, []
        while neck != -1:
            chain.append(neck)
            neck = self.parents[neck]
        self.neck_kin_chain = chain
        lm = landmarks
        self.register_buffer("lmk_faces_idx", torch.tensor(lm["static_lmk_faces_idx"], dtype=torch.long).view(-1))
        self.register_buffer("lmk_bary", torch.tensor(lm["static_lmk_bary_coords"], dtype=f32).view(-1, 3))
        self.register_buffer("dyn_faces_idx", torch.tensor(lm["dynamic_lmk_faces_idx"], dtype=torch.long))
        self.register_buffer("dyn_bary", torch.tensor(lm["dynamic_lmk_bary_coords"], dtype=f32))
        self.register_buffer("full_faces_idx", torch.tensor(lm["full_lmk_faces_idx"], dtype=torch.long).view(-1))
        self.register_buffer("full_bary", torch.tensor(lm["full_lmk_bary_coords"], dtype=f32).view(-1, 3))

    def lbs(self, betas: torch.Tensor, full_pose: torch.Tensor) -> torch.Tensor:
        B = betas.shape[0]
        v_shaped = self.v_template[None] + torch.einsum("bl,mkl->bmk", betas, self.shapedirs)
        joints = torch.einsum("bik,ji->bjk", v_shaped, self.J_regressor)
        rot = batch_rodrigues(full_pose.reshape(-1, 3)).view(B, -1, 3, 3)
        eye = torch.eye(3, dtype=betas.dtype, device=betas.device)
        pose_feature = (rot[:, 1:] - eye).reshape(B, -1)
        v_posed = v_shaped + (pose_feature @ self.posedirs).view(B, -1, 3)
        A = _rigid_transform(rot, joints, self.parents)
        T = (self.lbs_weights[None] @ A.view(B, -1, 16)).view(B, -1, 4, 4)
        v_h = torch.cat([v_posed, torch.ones_like(v_posed[..., :1])], -1)
        return (T @ v_h[..., None])[..., :3, 0]

    def _landmarks(self, verts: torch.Tensor, face_idx: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
        """face_idx [B, L], bary [B, L, 3] -> [B, L, 3]."""
        tri = self.faces[face_idx]  # [B, L, 3]
        v = torch.stack([verts[b][tri[b]] for b in range(verts.shape[0])])  # [B, L, 3, 3]
        return torch.einsum("blfi,blf->bli", v, bary)

    def dynamic_contour_rows(self, full_pose: torch.Tensor) -> torch.Tensor:
        """LUT row per batch element from the neck chain's y rotation (degrees, rounded, clamped at 39)."""
        B = full_pose.shape[0]
        aa = full_pose.view(B, -1, 3)[:, self.neck_kin_chain]
        rots = batch_rodrigues(aa.reshape(-1, 3)).view(B, -1, 3, 3)
        rel = torch.eye(3, dtype=full_pose.dtype, device=full_pose.device).expand(B, 3, 3)
        for i in range(len(self.neck_kin_chain)):
            rel = torch.bmm(rots[:, i], rel)
        y = torch.round(torch.clamp(rot_mat_to_euler_y(rel) * 180.0 / math.pi, max=39)).long()
        neg = y < 0
        return torch.where(neg, torch.where(y < -39, torch.full_like(y, 78), 39 - y), y)

    def forward(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """shape [B,100], expression [B,50], pose [B,6] -> verts [B,V,3], landmarks2d [B,68,3], landmarks3d [B,68,3]."""
        B = shape.shape[0]
        zeros3 = pose.new_zeros(B, 3)
        full_pose = torch.cat([pose[:, :3], zeros3, pose[:, 3:6], pose.new_zeros(B, 6)], 1)
        verts = self.lbs(torch.cat([shape, expression], 1), full_pose)
        rows = self.dynamic_contour_rows(full_pose)
        f_idx = torch.cat([self.dyn_faces_idx[rows], self.lmk_faces_idx[None].expand(B, -1)], 1)
        bary = torch.cat([self.dyn_bary[rows], self.lmk_bary[None].expand(B, -1, -1)], 1)
        lmk2d = self._landmarks(verts, f_idx, bary)
        lmk3d = self._landmarks(verts, self.full_faces_idx[None].expand(B, -1), self.full_bary[None].expand(B, -1, -1))
        return verts, lmk2d, lmk3d


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """DECA util.vertex_normals: per-vertex sum of face cross products, F.normalize(eps=1e-6). [B,V,3]."""
    B, V = verts.shape[:2]
    tri = verts[:, faces]  # [B, F, 3, 3]
    normals = torch.zeros_like(verts)
    # Each corner gets cross(next - cur, prev - cur), accumulated in DECA's corner order 1, 2, 0.
    for k in (1, 2, 0):
        cur, nxt, prv = tri[:, :, k], tri[:, :, (k + 1) % 3], tri[:, :, (k + 2) % 3]
        normals.index_add_(1, faces[:, k], torch.cross(nxt - cur, prv - cur, dim=-1))
    return F.normalize(normals, eps=1e-6, dim=2)
