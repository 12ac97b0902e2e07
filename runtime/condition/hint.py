"""The head condition: FLAME codes -> posed head -> 512 frame -> 9-channel hint (spec 6.3-6.6).

`build_head_condition` takes the codes of the reference and (optionally) the pose photo, mixes
them by the official modes, applies explicit `HeadControls`, frames the head and renders
``caphuman.kernels.raster_reference.render_hint`` -> [9, H, W] = [normal | albedo | rendered], raw values.

Framing, in order of precedence:
1. explicit ``center``/``scale`` controls (the head is placed in the frame directly);
2. DECA's camera + crop transform when the FLAME model is loaded (the official path);
3. otherwise a fit of the head's five landmarks (eye centres, nose tip, mouth corners) to MTCNN's
   five points on the position photo (similarity: scale, translation and, unless ``roll`` is
   given, in-plane rotation folded into the head's roll);
4. with no face at all: the face centred, 45% of the frame height.
"""
from __future__ import annotations

import logging
from typing import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from caphuman.kernels.raster_reference import render_hint

from .codes import HeadCode, mix_codes
from .controls import HeadControls, axis_angle_to_matrix, euler_to_matrix, light_sh, matrix_to_axis_angle, matrix_to_euler
from .head import HeadModel, PosedHead
from .projection import Z_OFFSET, full_frame_tform, project
from .template import five_points

log = logging.getLogger(__name__)


def cuda_renderer(device="cuda") -> Callable:
    """`render_hint` on the GPU (caphuman.kernels.raster_cuda, same semantics): returns a [9, H, W] CUDA tensor."""
    import torch

    from caphuman.kernels.raster_cuda import render_hint_cuda
    cache: dict = {}

    def render(verts, faces, normals, face_uvs, albedo, light, height, width):
        key = (id(faces), id(face_uvs))  # topology is constant: upload it once
        if key not in cache:
            cache.clear()
            cache[key] = (torch.as_tensor(np.asarray(faces), device=device),
                          torch.as_tensor(np.asarray(face_uvs, dtype=np.float32), device=device))
        f, uv = cache[key]
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)[None]
        return render_hint_cuda(t(verts), f, t(normals), uv, t(albedo), t(light), height, width)[0]
    return render

HINT_SIZE = 512
DEFAULT_CENTER = (0.5, 0.5)
DEFAULT_SCALE = 0.45


@dataclass
class HeadCondition:
    hint: np.ndarray              # [9, H, W] float32: normal | albedo | rendered (a CUDA tensor with cuda_renderer)
    verts_ndc: np.ndarray         # [V, 3] image NDC (x right, y down), z with the +10 offset
    landmarks2d_ndc: np.ndarray   # [68, 2] image NDC
    code: HeadCode                # the final code (after mixing, controls and framing)
    euler: tuple[float, float, float]  # yaw, pitch, roll (degrees) of the final global rotation
    notes: list[str] = field(default_factory=list)
    reference_code: HeadCode | None = None  # the codes before mixing (set by ConditionBuilder)
    pose_code: HeadCode | None = None


def _fit_similarity(src: np.ndarray, dst: np.ndarray, rotation: bool) -> tuple[float, float, np.ndarray]:
    """Least-squares dst ~ s R(phi) src + t (2D). Returns (s, phi, t)."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    if rotation:
        num = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum()
        den = (a * b).sum()
        phi = float(np.arctan2(num, den))
    else:
        phi = 0.0
    R = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
    ra = a @ R.T
    s = float((ra * b).sum() / max((ra * ra).sum(), 1e-12))
    return s, phi, md - s * (ms @ R.T)


def _frame_points(points_px: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frame pixels (x, y down) -> world-aligned 2D NDC (x right, y UP)."""
    x = (points_px[:, 0] + 0.5) / width * 2 - 1  # pixel centres: pixel j spans [j, j+1)
    y = (points_px[:, 1] + 0.5) / height * 2 - 1
    return np.stack([x, -y], 1)


def _fit_framing(head: HeadModel, code: HeadCode, five_px: np.ndarray, height: int, width: int,
                 roll_fixed: bool) -> tuple[HeadCode, PosedHead]:
    """Place the head so its five landmarks fit MTCNN's five points (frame pixels)."""
    target = _frame_points(five_px, height, width)
    posed = head.pose_vertices(code.shape, code.exp, code.pose)
    if not roll_fixed:
        _, phi, _ = _fit_similarity(five_points(posed.landmarks3d)[:, :2], target, rotation=True)
        R = euler_to_matrix(0, 0, np.degrees(phi)) @ axis_angle_to_matrix(code.pose[:3])
        pose = code.pose.copy()
        pose[:3] = matrix_to_axis_angle(R)
        code = replace(code, pose=pose)
        posed = head.pose_vertices(code.shape, code.exp, code.pose)
    s, _, t = _fit_similarity(five_points(posed.landmarks3d)[:, :2], target, rotation=False)
    cam = np.array([s, t[0] / s, t[1] / s])
    return replace(code, cam=cam, tform=full_frame_tform(height, width)), posed


def _place(code: HeadCode, posed: PosedHead, head: HeadModel, center, scale, height: int, width: int) -> HeadCode:
    """Explicit framing: face centre (mean of the 68 landmarks) at `center`, face size `scale` of the frame height.

    The anchor is taken with the global rotation but a closed jaw and neutral expression, so opening
    the jaw or changing the expression does not move the head."""
    rigid_pose = np.concatenate([code.pose[:3], np.zeros(3)])
    anchor = head.pose_vertices(code.shape, np.zeros_like(code.exp), rigid_pose).landmarks3d.mean(0)
    neutral = head.pose_vertices(code.shape, np.zeros_like(code.exp), np.zeros(6)).landmarks3d
    size = float(max(np.ptp(neutral[:, 0]), np.ptp(neutral[:, 1])))
    if code.cam is not None:
        p0 = project(anchor[None], code.cam, code.tform, height, width)[0]
        p1 = project((anchor + [0, 1, 0])[None], code.cam, code.tform, height, width)[0]
        cur_center = ((p0[0] + 1) / 2, (p0[1] + 1) / 2)
        cur_scale = abs(p1[1] - p0[1]) * size / 2
    else:
        cur_center, cur_scale = DEFAULT_CENTER, DEFAULT_SCALE
    cx, cy = center if center is not None else cur_center
    sc = scale if scale is not None else cur_scale
    s = 2 * sc / size
    cam = np.array([s, (2 * cx - 1) / s - anchor[0], -(2 * cy - 1) / s - anchor[1]])
    return replace(code, cam=cam, tform=full_frame_tform(height, width))


def apply_controls(code: HeadCode, controls: HeadControls, head: HeadModel) -> HeadCode:
    """Override pose / jaw / expression / light from explicit controls (framing is done later)."""
    pose = code.pose.copy()
    if controls.sets_rotation:
        cur = matrix_to_euler(axis_angle_to_matrix(pose[:3])) if np.any(pose[:3]) else (0.0, 0.0, 0.0)
        yaw, pitch, roll = (v if v is not None else c for v, c in zip((controls.yaw, controls.pitch, controls.roll), cur))
        pose[:3] = matrix_to_axis_angle(euler_to_matrix(yaw, pitch, roll))
    exp = code.exp
    if controls.jaw is not None or controls.expression is not None:
        if not head.deforms:
            raise ValueError("jaw and expression controls deform the face and need the FLAME model "
                             "(generic_model.pkl); the template head is rigid")
        if controls.jaw is not None:
            pose[3:] = [np.radians(controls.jaw), 0.0, 0.0]
        if controls.expression is not None:
            exp = np.zeros(50)
            exp[:len(controls.expression)] = controls.expression
    light = light_sh(controls.light) if controls.light is not None else code.light
    return replace(code, pose=pose, exp=exp, light=light)


def build_head_condition(head: HeadModel, ref: HeadCode, pose_code: HeadCode | None = None,
                         modes: tuple[str, ...] = ("position", "pose"), controls: HeadControls | None = None,
                         position_five_points: np.ndarray | None = None, size: int = HINT_SIZE,
                         renderer: Callable = render_hint) -> HeadCondition:
    """Mix, control, frame and render. `position_five_points`: MTCNN's 5 points (frame pixels) of the
    photo that gives the position (the pose photo under 'position'/'all', else the reference).
    `renderer`: the CPU reference rasterizer by default; `cuda_renderer()` renders on the GPU."""
    controls = controls or HeadControls()
    notes: list[str] = []
    code = mix_codes(ref, pose_code, modes) if pose_code is not None else ref
    code = apply_controls(code, controls, head)
    if not head.deforms and (np.any(code.exp) or np.any(code.pose[3:]) or np.any(code.shape)):
        notes.append("template head is rigid: estimated shape, expression and jaw are not shown (needs the FLAME model)")

    use_deca_camera = code.cam is not None and head.deforms
    if use_deca_camera:
        posed = head.pose_vertices(code.shape, code.exp, code.pose)
    elif position_five_points is not None:
        code, posed = _fit_framing(head, replace(code, cam=None, tform=None), position_five_points, size, size,
                                   roll_fixed=controls.roll is not None)
        notes.append("framing: head landmarks fitted to the photo's MTCNN five points")
    else:
        code = replace(code, cam=None, tform=None)
        posed = head.pose_vertices(code.shape, code.exp, code.pose)
        notes.append("framing: no face position known, head centred")
    if controls.center is not None or controls.scale is not None or code.cam is None:
        code = _place(code, posed, head, controls.center, controls.scale, size, size)

    verts = project(posed.verts, code.cam, code.tform, size, size)
    verts[:, 2] += Z_OFFSET
    lmk = project(posed.landmarks2d, code.cam, code.tform, size, size)[:, :2]
    albedo = head.albedo(code.tex)
    hint = renderer(verts, head.faces, posed.normals, head.face_uvs, albedo, code.light, size, size)
    euler = matrix_to_euler(axis_angle_to_matrix(code.pose[:3]))
    return HeadCondition(hint, verts, lmk, code, euler, notes)
