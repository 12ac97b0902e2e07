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

from .cli import HelpFormatter

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
                    "mixed by --modes), explicit pose/framing/lighting controls, rendered to PNGs and hint.npy.")
    add_head_arguments(p, reference_required=True)
    p.add_argument("--weights", metavar="DIR", help="folder of the official files (the layout of `caphuman serve "
                                                   "--weights`): its DECA and FLAME files, unless given by flag")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def add_head_arguments(p, reference_required: bool) -> None:
    """The head-condition options, shared by `caphuman condition` and `caphuman generate`."""
    p.add_argument("--reference", required=reference_required, help="reference face photo")
    p.add_argument("--pose", help="pose photo (its fields are taken per --modes)")
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
    hint = cond.hint
    mask = np.abs(hint).sum(0) > 0
    np.save(out_dir / "hint.npy", hint)
    _to_png(hint[0:3] * 0.5 + 0.5 * mask[None]).save(out_dir / "normal.png")  # (n + 1) / 2 on the head, black elsewhere
    _to_png(hint[3:6]).save(out_dir / "albedo.png")
    _to_png(hint[6:9]).save(out_dir / "shading.png")
    overlay = frame.astype(np.float32) / 255.0
    shade = np.clip(hint[6:9].transpose(1, 2, 0), 0, 1)
    overlay[mask] = 0.45 * overlay[mask] + 0.55 * shade[mask]
    Image.fromarray((overlay * 255 + 0.5).astype(np.uint8)).save(out_dir / "overlay.png")
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
        check_new_outputs([out], args.overwrite)  # the one overwrite rule: the folder is replaced as a whole
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_outputs(tmp, cond, position_photo.frame, meta)
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
    for note in cond.notes:
        log.info("%s", note)
    log.info("wrote %s: normal.png albedo.png shading.png overlay.png hint.npy condition.json "
             "(yaw %.1f, pitch %.1f, roll %.1f)", out, yaw, pitch, roll)
    return 0
