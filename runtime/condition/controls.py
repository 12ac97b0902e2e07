"""Explicit head controls: pose, jaw, expression, framing and lighting without a driving photo.

Angles are degrees in FLAME's world frame (x right, y up, z toward the camera), seen from the
camera:
* ``yaw`` > 0 turns the face toward the image's right (rotation about +y);
* ``pitch`` > 0 tilts the face down (rotation about +x);
* ``roll`` > 0 tilts the head counter-clockwise in the image (rotation about +z).
The global rotation is R = Rz(roll) . Rx(pitch) . Ry(yaw), stored as FLAME's axis-angle pose[:3].
``jaw`` opens the mouth (jaw pose = rotation about +x, FLAME pose[3:6]).
``center`` is the face centre (mean of the 68 landmarks) in the frame, (x, y) in [0, 1] from the
top-left; ``scale`` is the face size (the larger side of the unposed 68-landmark box) as a
fraction of the frame height.
Lighting is 27 SH coefficients (9 bands x RGB, DECA's layout) or a named preset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from caphuman.kernels.raster_reference import SH_CONSTANTS

LIMITS = {"yaw": 90.0, "pitch": 60.0, "roll": 90.0}
JAW_RANGE = (0.0, 40.0)
EXPRESSION_LIMIT = 4.0
N_EXPRESSION = 50
SCALE_RANGE = (0.05, 2.0)
LIGHT_LIMIT = 20.0


def _preset(ambient: float, direction: tuple[float, float, float], strength: float) -> np.ndarray:
    """SH light for shading(N) = ambient + strength * dot(N, d), white, in DECA's [9, 3] layout."""
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    light = np.zeros((9, 3))
    light[0] = ambient / SH_CONSTANTS[0]
    light[1:4] = (strength * d / SH_CONSTANTS[1])[:, None]
    return light


# Directions in FLAME world coordinates (x right, y up, z toward the camera).
LIGHT_PRESETS: dict[str, np.ndarray] = {
    "front": _preset(0.75, (0.0, 0.2, 1.0), 0.35),
    "left": _preset(0.6, (-1.0, 0.2, 0.6), 0.5),
    "right": _preset(0.6, (1.0, 0.2, 0.6), 0.5),
    "top": _preset(0.6, (0.0, 1.0, 0.5), 0.5),
    "bottom": _preset(0.6, (0.0, -1.0, 0.5), 0.5),
    "flat": _preset(1.0, (0.0, 0.0, 1.0), 0.0),
}
DEFAULT_LIGHT = "front"


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


@dataclass(frozen=True)
class HeadControls:
    """Explicit overrides; None keeps what the photos (or the defaults) give."""
    yaw: float | None = None
    pitch: float | None = None
    roll: float | None = None
    jaw: float | None = None
    expression: tuple[float, ...] | None = None
    center: tuple[float, float] | None = None
    scale: float | None = None
    light: str | tuple[float, ...] | None = None

    def __post_init__(self):
        for name, lim in LIMITS.items():
            v = getattr(self, name)
            if v is not None and not -lim <= _finite(name, v) <= lim:
                raise ValueError(f"{name}={v} is out of range [-{lim:g}, {lim:g}] degrees")
        if self.jaw is not None and not JAW_RANGE[0] <= _finite("jaw", self.jaw) <= JAW_RANGE[1]:
            raise ValueError(f"jaw={self.jaw} is out of range [{JAW_RANGE[0]:g}, {JAW_RANGE[1]:g}] degrees")
        if self.expression is not None:
            exp = [_finite("expression", v) for v in self.expression]
            if not 0 < len(exp) <= N_EXPRESSION:
                raise ValueError(f"expression takes 1 to {N_EXPRESSION} coefficients, got {len(exp)}")
            if any(abs(v) > EXPRESSION_LIMIT for v in exp):
                raise ValueError(f"expression coefficients must be within +-{EXPRESSION_LIMIT:g}, got {exp}")
        if self.center is not None:
            if len(self.center) != 2 or not all(0.0 <= _finite("center", v) <= 1.0 for v in self.center):
                raise ValueError(f"center must be two numbers in [0, 1] (x, y of the frame), got {self.center}")
        if self.scale is not None and not SCALE_RANGE[0] <= _finite("scale", self.scale) <= SCALE_RANGE[1]:
            raise ValueError(f"scale={self.scale} is out of range [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] "
                             "(face size as a fraction of the frame height)")
        if self.light is not None:
            light_sh(self.light)  # validates

    @property
    def sets_rotation(self) -> bool:
        return any(getattr(self, n) is not None for n in ("yaw", "pitch", "roll"))


def light_sh(light: str | tuple[float, ...] | np.ndarray) -> np.ndarray:
    """A preset name or 27 values -> SH light [9, 3]."""
    if isinstance(light, str):
        if light not in LIGHT_PRESETS:
            raise ValueError(f"unknown light preset '{light}'; choose one of {sorted(LIGHT_PRESETS)} or give 27 SH values")
        return LIGHT_PRESETS[light].copy()
    arr = np.asarray(light, dtype=np.float64).reshape(-1)
    if arr.size != 27:
        raise ValueError(f"SH light takes 27 values (9 bands x RGB), got {arr.size}")
    if not np.all(np.isfinite(arr)) or np.abs(arr).max() > LIGHT_LIMIT:
        raise ValueError(f"SH light values must be finite and within +-{LIGHT_LIMIT:g}")
    return arr.reshape(9, 3)


def euler_to_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Degrees -> R = Rz(roll) . Rx(pitch) . Ry(yaw) (see the module docstring for the signs)."""
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def matrix_to_axis_angle(R: np.ndarray) -> np.ndarray:
    """Rotation matrix -> axis-angle vector (FLAME pose layout)."""
    cos = np.clip((np.trace(R) - 1) / 2, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-8:
        return np.zeros(3)
    if math.pi - angle < 1e-6:
        # Near 180 degrees: axis from the symmetric part.
        axis = np.sqrt(np.clip((np.diag(R) + 1) / 2, 0, None))
        axis = axis * np.sign(np.where(np.abs(R[[2, 0, 1], [1, 2, 0]] - R[[1, 2, 0], [2, 0, 1]]) > 0,
                                       R[[2, 0, 1], [1, 2, 0]] - R[[1, 2, 0], [2, 0, 1]], 1.0))
        return axis / np.linalg.norm(axis) * angle
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / (2 * math.sin(angle))
    return axis * angle


def axis_angle_to_matrix(aa: np.ndarray) -> np.ndarray:
    """Rodrigues, as FLAME's batch_rodrigues (angle = ||aa + 1e-8||)."""
    aa = np.asarray(aa, dtype=np.float64)
    angle = np.linalg.norm(aa + 1e-8)
    k = aa / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def matrix_to_euler(R: np.ndarray) -> tuple[float, float, float]:
    """Inverse of `euler_to_matrix` (degrees), for reporting what a photo's pose means."""
    # R = Rz Rx Ry: R[2,1] = sin(pitch); R[2,0] = -cos(p) sin(y); R[2,2] = cos(p) cos(y); R[0,1] = -sin(r) cos(p)
    pitch = math.asin(np.clip(R[2, 1], -1, 1))
    yaw = math.atan2(-R[2, 0], R[2, 2])
    roll = math.atan2(-R[0, 1], R[1, 1])
    return math.degrees(yaw), math.degrees(pitch), math.degrees(roll)
