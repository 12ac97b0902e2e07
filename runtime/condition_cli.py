"""`caphuman condition`: the head hint of a reference photo (and a pose photo or explicit controls), as
viewable PNGs (normal, albedo, shading, overlay on the photo) and the raw [9, 512, 512] tensor."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .cli import HelpFormatter, StoreOnce
from .people_cli import add_person_argument, people_from_args

log = logging.getLogger(__name__)


def _light_arg(text: str):
    if "," in text:
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--light: '{text}' is neither a preset name nor 27 comma-separated numbers")
    return text


def comma_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "condition", formatter_class=HelpFormatter, help="render the 9-channel head hint (normal | albedo | shading) from photos and head controls",
        description="Build CapHuman's head condition: FLAME head from the reference photo (and a pose photo, "
                    "mixed by --modes), explicit pose/framing/lighting controls, rendered to PNGs and hint.npy. "
                    "Several people (--person, repeated): hint_1.npy, hint_2.npy... and one overlay of all heads.")
    add_head_arguments(p, reference_required=False)
    add_person_argument(p)
    p.add_argument("--weights", metavar="DIR", help="folder of the official files (the layout of `caphuman serve "
                                                   "--weights`): its DECA and FLAME files, unless given by flag")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def add_head_arguments(p, reference_required: bool) -> None:
    """The head-condition options, shared by `caphuman condition` and `caphuman generate`."""
    p.add_argument("--reference", required=reference_required, action=StoreOnce, help="reference face photo")
    p.add_argument("--pose", action=StoreOnce, help="pose photo (its fields are taken per --modes)")
    p.add_argument("--modes", default="position,pose", help="official modes: position,pose,expression,lighting,all")
    p.add_argument("--yaw", type=float, help="degrees, >0 turns the face to the image's right [-90, 90]")
    p.add_argument("--pitch", type=float, help="degrees, >0 tilts the face down [-60, 60]")
    p.add_argument("--roll", type=float, help="degrees, >0 tilts the head counter-clockwise [-90, 90]")
    p.add_argument("--jaw", type=float, help="jaw opening in degrees [0, 40] (needs --flame-model)")
    p.add_argument("--expression", type=comma_floats, help="up to 50 FLAME expression coefficients, comma-separated "
                                                      "(needs --flame-model)")
    p.add_argument("--scale", type=float, help="face size as a fraction of the frame height [0.05, 2]")
    p.add_argument("--center", type=float, nargs=2, metavar=("X", "Y"), help="face centre in the frame, [0, 1] each")
    p.add_argument("--light", type=_light_arg, help="light preset (front, left, right, top, bottom, flat) "
                                                    "or 27 comma-separated SH values")
    p.add_argument("--deca-model", help="DECA deca_model.tar (estimates shape/pose/expression/light from photos)")
    p.add_argument("--flame-model", help="FLAME generic_model.pkl (deforming head; default: rigid template)")
    p.add_argument("--flame-texture", help="FLAME_texture.npz (albedo from the texture code; default: mean texture)")
    p.add_argument("--allow-no-face", action="store_true",
                   help="official fallback when a photo has no detectable face (whole image) instead of an error")


def build_condition(args, renderer=None):
    """ConditionBuilder from the parsed options -> (condition, reference photo, pose photo, builder, controls)."""
    from caphuman.runtime.cli import UserError
    from caphuman.runtime.condition import ConditionBuilder, HeadControls, NoFaceError, PhotoError
    try:
        controls = HeadControls(yaw=args.yaw, pitch=args.pitch, roll=args.roll, jaw=args.jaw,
                                expression=args.expression, center=tuple(args.center) if args.center else None,
                                scale=args.scale, light=args.light)
        builder = ConditionBuilder(args.deca_model, args.flame_model, args.flame_texture)
        cond, ref, pose = builder.build(args.reference, args.pose, args.modes, controls,
                                        allow_no_face=args.allow_no_face, renderer=renderer)
    except NoFaceError as e:
        raise UserError(f"{e}: --allow-no-face") from None
    except PhotoError as e:
        raise UserError(str(e)) from None
    return cond, ref, pose, builder, controls


def _to_png(chw):
    import numpy as np
    from PIL import Image
    return Image.fromarray((np.clip(chw.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def write_outputs(out_dir: Path, cond, frame, meta: dict) -> None:
    import numpy as np
    from PIL import Image

    from caphuman.runtime.condition.people import people_overlay
    hint = cond.hint
    mask = np.abs(hint).sum(0) > 0
    np.save(out_dir / "hint.npy", hint)
    _to_png(hint[0:3] * 0.5 + 0.5 * mask[None]).save(out_dir / "normal.png")  # (n + 1) / 2 on the head, black elsewhere
    _to_png(hint[3:6]).save(out_dir / "albedo.png")
    _to_png(hint[6:9]).save(out_dir / "shading.png")
    Image.fromarray(people_overlay(frame, [cond], tinted=False)).save(out_dir / "overlay.png")
    (out_dir / "condition.json").write_text(json.dumps(meta, indent=2))


def run(args: argparse.Namespace) -> int:
    from caphuman.runtime.cli import UserError

    from .outputs import check_new_outputs
    from .weights_layout import use_weights_folder
    use_weights_folder(args, require_checkpoint=False)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        check_new_outputs([out], args.overwrite, rename="--out")  # the one overwrite rule: the folder is replaced whole
    if args.person:
        return _run_people(args, out)
    if not args.reference:
        raise UserError("--reference (the face photo) is required; several people: --person reference=PHOTO ...")
    cond, ref, pose, builder, controls = build_condition(args)

    position_photo = pose if (pose is not None and any(m in args.modes for m in ("position", "all"))) else ref
    yaw, pitch, roll = cond.euler
    meta = {
        "reference": str(ref.path), "pose": str(pose.path) if pose else None, "modes": args.modes,
        "controls": {k: v for k, v in vars(controls).items() if v is not None},
        "head": type(builder.head).__name__, "deca": builder.deca is not None,
        "euler_degrees": {"yaw": yaw, "pitch": pitch, "roll": roll},
        "cam": cond.code.cam.tolist(), "light": cond.code.light.tolist(),
        "overlay_photo": str(position_photo.path), "notes": cond.notes,
        "hint": {"file": "hint.npy", "shape": list(cond.hint.shape), "dtype": "float32",
                 "channels": "0-2 normal (world x right, y up, z to camera), 3-5 albedo, 6-8 rendered (Lambertian)"},
    }
    _write_folder(out, lambda tmp: write_outputs(tmp, cond, position_photo.frame, meta))
    for note in cond.notes:
        log.info("%s", note)
    log.info("wrote %s: normal.png albedo.png shading.png overlay.png hint.npy condition.json "
             "(yaw %.1f, pitch %.1f, roll %.1f)", out, *(round(a, 1) + 0.0 for a in (yaw, pitch, roll)))  # no "-0.0"
    return 0


def _run_people(args: argparse.Namespace, out: Path) -> int:
    """--person: each person's hint (hint_<i>.npy, in the shared frame) and one overlay of all heads."""
    import numpy as np
    from PIL import Image

    from caphuman.runtime.cli import UserError
    from caphuman.runtime.condition.people import PERSON_COLOURS, people_overlay

    from .people_cli import build_people_conditions
    try:
        people = people_from_args(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    conds = build_people_conditions(args, people)
    meta = {"people": [{
        "reference": str(pc.reference.path) if pc.reference else None,
        "pose": str(pc.pose.path) if pc.pose else None, "modes": pc.person.modes,
        "controls": {k: v for k, v in vars(pc.person.controls).items() if v is not None},
        "strength": pc.person.strength, "overlay_colour": PERSON_COLOURS[i % len(PERSON_COLOURS)],
        "euler_degrees": dict(zip(("yaw", "pitch", "roll"), pc.condition.euler)),
        "hint": {"file": f"hint_{i + 1}.npy", "shape": list(pc.condition.hint.shape), "dtype": "float32"},
        "notes": pc.condition.notes} for i, pc in enumerate(conds)],
        "hint_channels": "0-2 normal (world x right, y up, z to camera), 3-5 albedo, 6-8 rendered (Lambertian)"}
    size = conds[0].condition.hint.shape[-1]
    grey = np.full((size, size, 3), 128, np.uint8)  # the people's photos are different pictures: no one frame

    def write(tmp: Path) -> None:
        for i, pc in enumerate(conds):
            np.save(tmp / f"hint_{i + 1}.npy", np.asarray(pc.condition.hint, dtype=np.float32))
        Image.fromarray(people_overlay(grey, [pc.condition for pc in conds])).save(tmp / "overlay.png")
        (tmp / "condition.json").write_text(json.dumps(meta, indent=2))

    _write_folder(out, write)
    log.info("wrote %s: %s overlay.png condition.json (%d people)", out,
             " ".join(f"hint_{i + 1}.npy" for i in range(len(conds))), len(conds))
    return 0


def _write_folder(out: Path, write) -> None:
    """Fill a fresh folder with `write(folder)` and put it in place of `out` whole: never half a result."""
    from .outputs import ordinary_mode
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(ordinary_mode(folder=True))
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
