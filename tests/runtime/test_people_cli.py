"""Several people from the command line: `caphuman generate --person ...` and `caphuman condition --person ...`
(the tiny random-weight demo, real photos): outputs, the layout rule, and clear errors with nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from caphuman.runtime.cli import main
from caphuman.runtime.condition import ConditionBuilder, HeadControls
from caphuman.runtime.condition.people import (MAX_COVERED, MIN_IN_FRAME, LayoutError, Person, build_people,
                                               check_layout, head_silhouette, in_frame_fraction, spread_controls)
from caphuman.runtime.people_cli import parse_person
from tests.paths import face_photo

ANNA, BEN = face_photo("reference_196251.png"), face_photo("IMG_0392_inputs.jpg")


def _generate(tmp_path, *args) -> int:
    return main(["generate", *args, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "out")])


def test_generate_two_people_writes_one_image_with_both_recorded(tmp_path):
    assert _generate(tmp_path, "--person", f"reference={ANNA}", "center=0.3,0.5",
                     "--person", f"reference={BEN}", "center=0.7,0.5", "yaw=-20", "strength=0.8") == 0
    meta = json.loads((tmp_path / "out" / "caphuman_12345.json").read_text())
    assert meta["people"] == 2 and meta["person_strength"] == [1.0, 0.8]
    assert len(meta["hint_sha256"]) == 2 and len(set(meta["identity_sha256"])) == 2  # two identities
    inputs = meta["inputs"]["people"]
    assert [p["reference"]["path"] for p in inputs] == [str(ANNA), str(BEN)]
    assert inputs[1]["controls"] == {"yaw": -20.0, "center": [0.7, 0.5]} and inputs[1]["yaw_pitch_roll"][0] == -20.0
    assert np.asarray(Image.open(tmp_path / "out" / "caphuman_12345.png")).shape == (512, 512, 3)


@pytest.mark.parametrize("people, error", [
    ([["center=0.5,0.5"], ["center=0.52,0.5"]], "covered by the other heads"),
    ([["center=1.0,0.5", "scale=0.6"], ["center=0.3,0.5"]], "outside the frame"),
    ([[f"center=0.{i},0.5"] for i in range(1, 6)], "1 to 4 people per image, got 5"),
    ([["center=0.3,0.5", "size=2"], ["center=0.7,0.5"]], "'size=2' is not KEY=VALUE"),
    ([["pose=" + str(ANNA)], ["center=0.7,0.5"]], "pose= needs reference="),
])
def test_generate_bad_people_is_one_clear_error_and_writes_nothing(tmp_path, capsys, people, error):
    args = [a for words in people for a in ("--person", *words)]
    assert _generate(tmp_path, *args) != 0
    assert error in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_person_with_no_face_is_refused_naming_the_way_out(tmp_path, capsys):
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(blank)
    assert _generate(tmp_path, "--person", f"reference={ANNA}", "center=0.3,0.5",
                     "--person", f"reference={blank}", "center=0.7,0.5") != 0
    err = capsys.readouterr().err
    assert "--allow-no-face" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_one_person_is_the_one_person_path(tmp_path):
    """One --person gives the image of the same photo and controls given as one-person options."""
    assert _generate(tmp_path / "a", "--person", f"reference={ANNA}", "yaw=20", "strength=0.5") == 0
    assert _generate(tmp_path / "b", "--reference", str(ANNA), "--yaw", "20", "--strength", "0.5") == 0
    meta = [json.loads((tmp_path / d / "out" / "caphuman_12345.json").read_text()) for d in "ab"]
    assert meta[0]["people"] == meta[1]["people"] == 1 and meta[0]["strength"] == 0.5
    assert meta[0]["hint_sha256"] == meta[1]["hint_sha256"] and meta[0]["identity_sha256"] == meta[1]["identity_sha256"]
    images = [np.asarray(Image.open(tmp_path / d / "out" / "caphuman_12345.png")) for d in "ab"]
    np.testing.assert_array_equal(images[0], images[1])


def test_single_person_options_beside_person_are_refused(tmp_path, capsys):
    assert _generate(tmp_path, "--reference", str(ANNA), "--person", f"reference={BEN}") != 0
    assert "--reference is for one person" in capsys.readouterr().err


def test_condition_draws_every_head_and_each_hint_is_the_one_person_hint(tmp_path):
    out = tmp_path / "cond"
    assert main(["condition", "--person", f"reference={ANNA}", "center=0.3,0.5", "--person", "center=0.7,0.5",
                 "yaw=30", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["condition.json", "hint_1.npy", "hint_2.npy", "overlay.png"]
    meta = json.loads((out / "condition.json").read_text())
    assert [p["hint"]["file"] for p in meta["people"]] == ["hint_1.npy", "hint_2.npy"]
    hints = [np.load(out / f"hint_{i}.npy") for i in (1, 2)]
    # each person's hint is what one-person `condition` gives with the controls the layout assigned
    fit = spread_controls([Person(reference=ANNA, controls=HeadControls(center=(0.3, 0.5))),
                           Person(controls=HeadControls(center=(0.7, 0.5), yaw=30.0))])
    assert fit[0].scale == fit[1].scale < 0.45
    single = tmp_path / "single"
    assert main(["condition", "--reference", str(ANNA), "--center", "0.3", "0.5", "--scale", str(fit[0].scale),
                 "--out", str(single)]) == 0
    np.testing.assert_array_equal(hints[0], np.load(single / "hint.npy"))
    # the overlay shows both heads: pixels on each head differ from the grey background
    overlay = np.asarray(Image.open(out / "overlay.png")).astype(int)
    for hint in hints:
        sil = np.abs(hint).sum(0) > 0
        assert sil.sum() > 1000 and (np.abs(overlay[sil] - 128).sum(-1) > 0).mean() > 0.9
    assert (np.abs(overlay[~(np.abs(hints[0]).sum(0) > 0) & ~(np.abs(hints[1]).sum(0) > 0)] - 128).max() == 0)


def test_condition_layout_error_writes_nothing(tmp_path, capsys):
    out = tmp_path / "cond"
    assert main(["condition", "--person", "center=0.5,0.5", "--person", "center=0.5,0.5", "--out", str(out)]) != 0
    assert "covered by the other heads" in capsys.readouterr().err and not out.exists()


def test_layout_rule_thresholds():
    """check_layout refuses exactly past its documented thresholds."""
    square = np.zeros((100, 100), bool)
    square[20:60, 20:60] = True
    shifted = np.roll(square, 4, axis=1)            # covers 90% of `square`
    apart = np.roll(square, 45, axis=1)
    check_layout([1.0, 1.0], [square, apart])
    with pytest.raises(LayoutError, match="covered"):
        check_layout([1.0, 1.0], [square, shifted])
    with pytest.raises(LayoutError, match="outside the frame"):
        check_layout([MIN_IN_FRAME - 0.01, 1.0], [square, apart])
    assert 0.5 < MAX_COVERED < 1


def test_people_build_in_one_frame_and_parse_person_checks_words():
    builder = ConditionBuilder()
    conds = build_people(builder, [Person(controls=HeadControls()), Person(controls=HeadControls(yaw=20.0))])
    xs = [np.nonzero(head_silhouette(pc.condition))[1].mean() for pc in conds]
    assert xs[0] < 256 < xs[1]                       # spread left to right
    assert all(in_frame_fraction(pc.condition) == 1.0 for pc in conds)
    p = parse_person(["reference=a.jpg", "yaw=10", "center=0.2,0.4", "expression=0.5,-1", "strength=0.5"], 1)
    assert p.controls.yaw == 10.0 and p.controls.center == (0.2, 0.4) and p.strength == 0.5
    for bad in (["yaw=abc"], ["center=0.2"], ["yaw=1", "yaw=2"]):
        with pytest.raises(ValueError, match="--person 1"):
            parse_person(bad, 1)


def _client_args(*argv):
    from caphuman.runtime.cli import build_parser
    return build_parser().parse_args(["client", "--prompt", "two friends", *argv])


def test_client_person_options_become_the_requests_people_fields():
    from caphuman.runtime.cli import UserError
    from caphuman.runtime.people_cli import request_people
    fields = request_people(_client_args("--person", f"reference={ANNA}", "center=0.3,0.5",
                                         "--person", f"reference={BEN}", "yaw=-20", "strength=0.8"))
    assert fields["reference"] == [ANNA, BEN] and fields["pose_image"] is None and fields["modes"] == "position,pose"
    assert fields["people"] == [{"center": [0.3, 0.5], "strength": 1.0}, {"yaw": -20.0, "strength": 0.8}]
    one = request_people(_client_args("--strength", "0.5", "--person", f"reference={ANNA}", "yaw=20", "strength=0.8"))
    assert one == {"reference": ANNA, "pose_image": None, "head_controls": {"yaw": 20.0}, "modes": "position,pose",
                   "strength": 0.4}
    for argv, error in [(["--person", "center=0.3,0.5", "--person", f"reference={BEN}"], "needs reference="),
                        (["--person", f"reference={ANNA}", f"pose={ANNA}", "--person", f"reference={BEN}"],
                         "pose= to every --person or to none"),
                        (["--person", f"reference={ANNA}", "light=left", "--person", f"reference={BEN}"], "--light"),
                        (["--yaw", "10", "--person", f"reference={ANNA}", "--person", f"reference={BEN}"],
                         "--yaw is for one person")]:
        with pytest.raises(UserError, match=error):
            request_people(_client_args(*argv))


def test_client_sends_angles_given_once_as_head_controls():
    """An angle given once travels in HEAD_CONTROLS, so the angles not given stay the photo's (as in
    `caphuman generate`); angles given per item are HEAD_POSE rows."""
    from caphuman.runtime.client_cli import _head_poses, more_head_controls
    args = _client_args("--reference", str(ANNA), "--yaw", "20")
    assert _head_poses(args) is None and more_head_controls(args) == {"yaw": 20.0}
    args = _client_args("--reference", str(ANNA), "--yaw", "20", "--yaw", "-10", "--roll", "5")
    assert _head_poses(args) == [(20.0, 0.0, 5.0), (-10.0, 0.0, 5.0)] and more_head_controls(args) is None
