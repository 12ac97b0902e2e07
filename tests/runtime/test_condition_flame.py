"""The head condition with the FLAME model and DECA weights present (both synthesized in the official formats)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caphuman.export.face.deca_encoder import CODE_SIZES
from caphuman.runtime.condition import ConditionBuilder, HeadControls
from caphuman.runtime.condition.codes import HeadCode
from caphuman.runtime.condition.controls import light_sh
from caphuman.runtime.condition.head import FlameHead, TemplateHead
from caphuman.runtime.condition.hint import build_head_condition

from tests.paths import DATA, face_photo
from tests.export.test_face_flame import write_flame_pickle


@pytest.fixture(scope="module")
def flame_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("flame") / "generic_model.pkl"
    write_flame_pickle(path)
    return path


@pytest.fixture(scope="module")
def deca_path(tmp_path_factory):
    """deca_model.tar whose E_flame gives a sane code: bias = neutral head, cam s=8, light 'front'."""
    keys = json.loads((DATA / "deca_e_flame_keys.json").read_text())
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0)
        elif "running_var" in k:
            sd[k] = torch.ones(shape)
        elif "running_mean" in k or k.endswith("bn1.bias") or ".bn" in k and k.endswith("bias"):
            sd[k] = torch.zeros(shape)
        elif "bn" in k or "downsample.1" in k:
            sd[k] = torch.ones(shape) if k.endswith("weight") else torch.zeros(shape)
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.02
    bias = torch.zeros(236)
    bias[206:209] = torch.tensor([8.0, 0.0, 0.0])
    bias[209:236] = torch.from_numpy(light_sh("front").reshape(-1)).float()
    sd["layers.2.bias"] = bias
    sd["layers.2.weight"] = torch.randn(236, 1024, generator=g) * 1e-3
    path = tmp_path_factory.mktemp("deca") / "deca_model.tar"
    torch.save({"E_flame": sd, "E_detail": {}, "D_detail": {}}, path, _use_new_zipfile_serialization=False)
    return path


def test_flame_head_matches_template_at_neutral_and_jaw_opens(flame_path):
    flame, template = FlameHead(flame_path), TemplateHead()
    ctl = HeadControls(center=(0.5, 0.5), scale=0.4)
    code = HeadCode.neutral(light_sh("front"))
    a = build_head_condition(flame, code, controls=ctl)
    b = build_head_condition(template, code, controls=ctl)
    ma, mb = np.abs(a.hint).sum(0) > 0, np.abs(b.hint).sum(0) > 0
    assert (ma != mb).mean() < 0.002  # same geometry (v_template = the template) at zero codes
    opened = build_head_condition(flame, code, controls=HeadControls(center=(0.5, 0.5), scale=0.4, jaw=20))
    mo = np.abs(opened.hint).sum(0) > 0
    changed = np.nonzero((mo != ma).any(1))[0]
    assert len(changed) > 5
    lmk_y = (a.landmarks2d_ndc[:, 1] + 1) / 2 * 512
    assert changed.min() > lmk_y[30]  # only below the nose tip
    smile = build_head_condition(flame, code, controls=HeadControls(center=(0.5, 0.5), scale=0.4,
                                                                      expression=(3.0, -2.0)))
    assert not np.array_equal(smile.hint, a.hint)


def test_builder_with_deca_and_flame_mixes_codes(flame_path, deca_path):
    builder = ConditionBuilder(deca_model=deca_path, flame_model=flame_path)
    ref = builder.analyzer.analyze(face_photo("reference_196251.png"))
    pose = builder.analyzer.analyze(face_photo("pose2.png"))
    cond, _, _ = builder.build(ref, pose, modes="position,pose")
    c_ref, c_pose = cond.reference_code, cond.pose_code
    assert c_ref.estimated and c_ref.shape.shape == (CODE_SIZES["shape"],) and c_ref.light.shape == (9, 3)
    assert not np.allclose(c_ref.pose, c_pose.pose)  # the two photos give different codes
    np.testing.assert_allclose(cond.code.cam, c_pose.cam)
    np.testing.assert_allclose(cond.code.tform, c_pose.tform)
    np.testing.assert_allclose(cond.code.pose[:3], c_pose.pose[:3])
    np.testing.assert_allclose(cond.code.pose[3:], c_ref.pose[3:])
    np.testing.assert_allclose(cond.code.exp, c_ref.exp)
    np.testing.assert_allclose(cond.code.light, c_ref.light)
    assert np.all(np.isfinite(cond.hint))
    mask = np.abs(cond.hint).sum(0) > 0
    assert mask.mean() > 0.02
    # The official camera puts the head over the pose photo's face (crop centred on its MTCNN box).
    x1, y1, x2, y2 = pose.frame_detection.box
    ys, xs = np.nonzero(mask)
    assert x1 - 40 < xs.mean() < x2 + 40 and y1 - 80 < ys.mean() < y2 + 80
