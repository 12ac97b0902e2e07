"""FLAME codes of a photo and the official mixing by modes (spec 6.2-6.3, ``inference.py`` L62-151)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

MODES = ("position", "pose", "expression", "lighting", "all")


@dataclass(frozen=True)
class HeadCode:
    """DECA's code dict for one image, as NumPy (no batch axis), plus the crop transform.

    cam/tform may be None when the framing is not known yet (no DECA estimate): `fit_framing`
    then places the head from the photo's face landmarks.
    """
    shape: np.ndarray            # [100]
    tex: np.ndarray              # [50]
    exp: np.ndarray              # [50]
    pose: np.ndarray             # [6] global rotation (axis-angle) | jaw (axis-angle)
    light: np.ndarray            # [9, 3]
    cam: np.ndarray | None       # [3] s, tx, ty (crop NDC)
    tform: np.ndarray | None     # [3, 3] row-vector crop pixels -> frame pixels (inv(T)^T)
    estimated: bool = False      # from DECA (True) or neutral defaults (False)

    @staticmethod
    def neutral(light: np.ndarray) -> "HeadCode":
        return HeadCode(np.zeros(100), np.zeros(50), np.zeros(50), np.zeros(6), np.asarray(light, dtype=np.float64),
                        None, None, False)

    @staticmethod
    def from_deca(code: dict, tform_rows: np.ndarray) -> "HeadCode":
        """From `caphuman.export.face.deca_encoder.decompose_code` output (batch 1 tensors)."""
        g = lambda k: code[k][0].detach().double().cpu().numpy()  # noqa: E731
        return HeadCode(g("shape"), g("tex"), g("exp"), g("pose"), g("light"), g("cam"), np.asarray(tform_rows), True)


def parse_modes(modes: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'position,pose' -> ('position', 'pose'); unknown tokens are an error."""
    tokens = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    bad = [m for m in tokens if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; modes are {list(MODES)}")
    return tuple(tokens)


def mix_codes(ref: HeadCode, pose: HeadCode, modes: tuple[str, ...]) -> HeadCode:
    """The official mixing: start from the reference, take from the pose image per mode.

    position: cam + tform; pose: pose[:3]; lighting: light; expression: exp + pose[3:];
    all: pose (6), light, exp, tform, cam. Shape and texture always come from the reference.
    """
    out = replace(ref, pose=ref.pose.copy())
    if "position" in modes:
        out = replace(out, cam=pose.cam, tform=pose.tform)
    if "pose" in modes:
        out.pose[:3] = pose.pose[:3]
    if "lighting" in modes:
        out = replace(out, light=pose.light)
    if "expression" in modes:
        out = replace(out, exp=pose.exp)
        out.pose[3:] = pose.pose[3:]
    if "all" in modes:
        out = replace(out, pose=pose.pose.copy(), light=pose.light, exp=pose.exp, tform=pose.tform, cam=pose.cam)
    return out
