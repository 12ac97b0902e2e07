"""Head hint geometry on the template head: silhouette, centroid, normals toward the camera, symmetry."""
from __future__ import annotations

import numpy as np
import pytest

from caphuman.runtime.condition.codes import HeadCode, mix_codes, parse_modes
from caphuman.runtime.condition.controls import (LIGHT_PRESETS, HeadControls, axis_angle_to_matrix, euler_to_matrix, light_sh,
                                        matrix_to_axis_angle, matrix_to_euler)
from caphuman.runtime.condition.head import TemplateHead
from caphuman.runtime.condition.hint import build_head_condition
from caphuman.runtime.condition.template import five_points

SIZE = 512


@pytest.fixture(scope="module")
def head():
    return TemplateHead()


def render(head, **controls):
    ctl = HeadControls(**{"center": (0.5, 0.5), "scale": 0.4, **controls})
    return build_head_condition(head, HeadCode.neutral(light_sh("front")), controls=ctl)


@pytest.fixture(scope="module")
def frontal(head):
    return render(head)


def _mask(cond):
    return np.abs(cond.hint).sum(0) > 0


def _face_normal(cond, channel: int) -> float:
    """Mean normal component at the inner-face landmarks (17..67): the visible silhouette's mean
    normal of a convex head is the view direction whatever the pose, the face's is not."""
    px = np.clip(((cond.landmarks2d_ndc[17:] + 1) / 2 * SIZE).astype(int), 0, SIZE - 1)
    return float(cond.hint[channel][px[:, 1], px[:, 0]].mean())


def test_frontal_silhouette_centroid_normals(frontal):
    hint = frontal.hint
    assert hint.shape == (9, SIZE, SIZE) and hint.dtype == np.float32
    m = _mask(frontal)
    area = m.mean()
    assert 0.15 < area < 0.45, area
    ys, xs = np.nonzero(m)
    # The face centre (68-landmark mean) is at the frame centre; the head extends more above it.
    lmk_center = frontal.landmarks2d_ndc.mean(0)
    assert np.abs(lmk_center).max() < 0.06
    assert abs(xs.mean() / SIZE - 0.5) < 0.01
    normal = hint[0:3][:, m]
    assert normal[2].mean() > 0.6  # toward the camera (+z)
    assert (normal[2] > 0).mean() > 0.85
    n = np.linalg.norm(normal, axis=0)
    assert 0.8 < n.mean() <= 1.0 + 1e-6  # interpolated unit normals, not re-normalised
    # Albedo in [0, 1] on the head, rendered = albedo * shading.
    assert 0 <= hint[3:6].min() and hint[3:6].max() <= 1
    assert hint[6:9][:, m].mean() > 0.2


def test_left_right_symmetry_at_zero_yaw(frontal):
    m = _mask(frontal)
    flipped = m[:, ::-1]
    iou = (m & flipped).sum() / (m | flipped).sum()
    assert iou > 0.97, iou
    # Normal x is antisymmetric, y and z symmetric (about the centre column).
    nx = frontal.hint[0]
    both = m & flipped
    assert np.abs(nx[both] + nx[:, ::-1][both]).mean() < 0.05
    assert np.abs(frontal.hint[2][both] - frontal.hint[2][:, ::-1][both]).mean() < 0.05


def test_yaw_turns_the_face(head, frontal):
    right, left = render(head, yaw=40), render(head, yaw=-40)
    m_r, m_l = _mask(right), _mask(left)
    # +yaw: the face points to the image's right: normal x > 0 on the inner-face landmarks.
    assert _face_normal(right, 0) > 0.3 and _face_normal(left, 0) < -0.3
    # Mirror images of each other.
    iou = (m_r & m_l[:, ::-1]).sum() / (m_r | m_l[:, ::-1]).sum()
    assert iou > 0.95
    # The nose tip moves right of the face centre.
    nose = right.landmarks2d_ndc[30, 0] - right.landmarks2d_ndc.mean(0)[0]
    assert nose > 0.05
    assert right.euler[0] == pytest.approx(40, abs=1e-6)


def test_pitch_and_roll(head, frontal):
    down = render(head, pitch=30)
    assert _face_normal(down, 1) < _face_normal(frontal, 1) - 0.3  # face normals tilt down (world y)
    assert _face_normal(frontal, 2) > 0.5 and abs(_face_normal(frontal, 0)) < 0.05
    rolled = render(head, roll=90)
    m0, m90 = _mask(frontal), _mask(rolled)
    def axis(mask):
        ys, xs = np.nonzero(mask)
        cov = np.cov(np.stack([xs, ys]))
        w, v = np.linalg.eigh(cov)
        return v[:, -1]
    # The long axis of the head turns from vertical to horizontal.
    assert abs(axis(m0)[1]) > 0.9 and abs(axis(m90)[0]) > 0.9
    # +roll is counter-clockwise in the image about the face centre: (dx, dy) -> (dy, -dx), so the
    # top of the head goes to the left and the neck to the right.
    c = (frontal.landmarks2d_ndc.mean(0) + 1) / 2 * SIZE - 0.5
    ys0, xs0 = np.nonzero(m0)
    ys1, xs1 = np.nonzero(m90)
    assert xs1.mean() - c[0] == pytest.approx(ys0.mean() - c[1], abs=3)
    assert ys1.mean() - c[1] == pytest.approx(-(xs0.mean() - c[0]), abs=3)
    top = np.nonzero(m0.any(1))[0][0]  # crown row in the frontal view
    assert np.nonzero(m90.any(0))[0][0] == pytest.approx(top - c[1] + c[0], abs=3)


def test_scale_and_center_place_the_head(head):
    small = render(head, scale=0.2, center=(0.3, 0.7))
    big = render(head, scale=0.3, center=(0.3, 0.4))
    assert _mask(big).sum() / _mask(small).sum() == pytest.approx(2.25, rel=0.03)
    c = small.landmarks2d_ndc.mean(0)
    np.testing.assert_allclose((c + 1) / 2, [0.3, 0.7], atol=0.02)


def test_light_controls_change_only_the_rendered_channels(head, frontal):
    lit = render(head, light="left")
    np.testing.assert_array_equal(lit.hint[:6], frontal.hint[:6])
    m = _mask(lit)
    xs = np.nonzero(m)[1]
    left_half = m & (np.arange(SIZE)[None] < xs.mean())
    right_half = m & ~left_half
    assert lit.hint[6:9][:, left_half].mean() > lit.hint[6:9][:, right_half].mean()
    raw = render(head, light=tuple(np.arange(27) * 0.0 + 1.0))
    assert raw.code.light.shape == (9, 3)
    assert set(LIGHT_PRESETS) >= {"front", "left", "right", "top", "flat"}


@pytest.mark.parametrize("kwargs, match", [
    ({"yaw": 91}, "yaw"), ({"pitch": -61}, "pitch"), ({"roll": float("nan")}, "roll"), ({"jaw": -1}, "jaw"),
    ({"scale": 0}, "scale"), ({"center": (0.5, 1.5)}, "center"), ({"expression": (9.0,)}, "expression"),
    ({"expression": tuple([0.0] * 51)}, "expression"), ({"light": "disco"}, "disco"), ({"light": (1.0, 2.0)}, "27"),
])
def test_out_of_range_controls(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeadControls(**kwargs)


def test_jaw_needs_flame_model(head):
    with pytest.raises(ValueError, match="FLAME model"):
        render(head, jaw=10)


def test_euler_axis_angle_roundtrip():
    for ypr in [(10, 20, 30), (-80, 50, -85), (0, 0, 0)]:
        R = euler_to_matrix(*ypr)
        np.testing.assert_allclose(axis_angle_to_matrix(matrix_to_axis_angle(R)), R, atol=1e-7)
        np.testing.assert_allclose(matrix_to_euler(R), ypr, atol=1e-6)


def test_official_mode_mixing():
    a = HeadCode(np.full(100, 1.0), np.full(50, 1.0), np.full(50, 1.0), np.arange(6.0), np.full((9, 3), 1.0),
                 np.array([1.0, 0, 0]), np.eye(3), True)
    b = HeadCode(np.full(100, 2.0), np.full(50, 2.0), np.full(50, 2.0), np.arange(6.0) + 10, np.full((9, 3), 2.0),
                 np.array([2.0, 0, 0]), 2 * np.eye(3), True)
    m = mix_codes(a, b, parse_modes("position,pose"))
    assert m.cam[0] == 2 and m.tform[0, 0] == 2 and list(m.pose) == [10, 11, 12, 3, 4, 5]
    assert m.exp[0] == 1 and m.light[0, 0] == 1 and m.shape[0] == 1 and m.tex[0] == 1
    m = mix_codes(a, b, parse_modes("expression,lighting"))
    assert list(m.pose) == [0, 1, 2, 13, 14, 15] and m.exp[0] == 2 and m.light[0, 0] == 2 and m.cam[0] == 1
    m = mix_codes(a, b, parse_modes("all"))
    assert list(m.pose) == list(b.pose) and m.cam[0] == 2 and m.shape[0] == 1 and m.tex[0] == 1
    assert list(a.pose) == list(range(6))  # inputs untouched
    with pytest.raises(ValueError, match="posing"):
        parse_modes("position,posing")


def test_landmark_fit_places_head_on_the_points(head):
    # Synthetic MTCNN points: the template's own five points placed with a known similarity.
    frontal = render(head, scale=0.5, center=(0.4, 0.55))
    pts_ndc = five_points(np.c_[frontal.landmarks2d_ndc, np.zeros(68)])[:, :2]
    px = (pts_ndc + 1) / 2 * SIZE - 0.5
    fitted = build_head_condition(head, HeadCode.neutral(light_sh("front")), position_five_points=px)
    iou = (_mask(fitted) & _mask(frontal)).sum() / (_mask(fitted) | _mask(frontal)).sum()
    assert iou > 0.9, iou
