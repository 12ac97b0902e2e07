"""`caphuman client`: one generation request to a CapHuman-RT server (gRPC stream, progress bar)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from caphuman.engines.catalog import DEFAULT_SAMPLER, SAMPLER_DOCS

from .cli import HelpFormatter

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "client", help="request images from a running `caphuman serve` over gRPC",
        formatter_class=HelpFormatter,
        description="Send a reference face photo, prompt(s) and a head condition to a CapHuman-RT server; "
                    "show the denoising progress; write each image as PNG with a JSON sidecar (parameters, "
                    "per-stage timings). Several --prompt and/or --pose/--yaw values make one batch request "
                    "(one identity; results in order).")
    p.add_argument("--url", default="localhost:8001", help="gRPC endpoint HOST:PORT")
    p.add_argument("--reference", required=True, type=Path, help="reference face photo (PNG/JPEG/WebP)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for a batch)")
    p.add_argument("--negative-prompt", default="", help="negative prompt")
    p.add_argument("--added-prompt", default="", help="appended as 'PROMPT, ADDED' (official a_prompt)")
    h = p.add_argument_group("head condition (a pose photo and/or explicit angles; default: the reference's)")
    h.add_argument("--pose", action="append", type=Path, help="pose photo (repeat for a batch)")
    h.add_argument("--yaw", type=float, action="append", help="degrees, + turns the face to the image's right")
    h.add_argument("--pitch", type=float, action="append", help="degrees, + tilts the face down")
    h.add_argument("--roll", type=float, action="append", help="degrees, + tilts the head counter-clockwise")
    h.add_argument("--modes", default="position,pose", help="what the pose photo gives (official modes)")
    h.add_argument("--light", default="", help="lighting preset: front, left, right, top, bottom, flat")
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", choices=sorted(SAMPLER_DOCS), default=DEFAULT_SAMPLER, help="denoising sampler")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=7.0)
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--strength", type=float, default=1.0)
    s.add_argument("--tau", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=12345, help="seed of item 0 (item i: seed + i)")
    s.add_argument("--resolution", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    p.add_argument("--name", default="caphuman", help="file name prefix")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each server message")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _head_poses(args) -> list[tuple[float, float, float]] | None:
    lists = {k: getattr(args, k) or [] for k in ("yaw", "pitch", "roll")}
    n = max(len(v) for v in lists.values())
    if n == 0:
        return None
    for k, v in lists.items():
        if len(v) not in (0, 1, n):
            raise ValueError(f"--{k} given {len(v)} times; give it 0, 1 or {n} times (once per item)")
    pick = {k: (v * n if len(v) == 1 else v) if v else [0.0] * n for k, v in lists.items()}
    return list(zip(pick["yaw"], pick["pitch"], pick["roll"]))


def run(args) -> int:
    from tqdm import tqdm

    from caphuman.runtime.cli import UserError
    from caphuman.runtime.outputs import save_png_with_sidecar

    from caphuman.tritonserver.client import CapHumanClient, Progress, ServerError
    if not args.reference.is_file():
        raise UserError(f"--reference photo not found: {args.reference}")
    for pose in args.pose or []:
        if not pose.is_file():
            raise UserError(f"--pose photo not found: {pose}")
    client = CapHumanClient(args.url, timeout=args.timeout)
    fields = dict(negative_prompt=args.negative_prompt, added_prompt=args.added_prompt, modes=args.modes,
                  light=args.light, sampler=args.sampler, steps=args.steps, guidance=args.guidance, eta=args.eta, strength=args.strength,
                  tau=args.tau, seed=args.seed, resolution=args.resolution, progress=not args.no_progress,
                  head_pose=_head_poses(args), pose_image=args.pose or None)
    bar = None
    written = []
    try:
        for msg in client.stream(args.reference, args.prompt, **fields):
            if isinstance(msg, Progress):
                if bar is None or bar.desc != f"image {msg.index}":
                    if bar is not None:
                        bar.close()
                    bar = tqdm(total=msg.total, desc=f"image {msg.index}", unit="step")
                bar.n = msg.step
                bar.refresh()
                continue
            if bar is not None:
                bar.close()
                bar = None
            meta = msg.metadata
            png, sidecar = save_png_with_sidecar(msg.image, args.out / f"{args.name}_{meta.get('seed', msg.index)}.png",
                                                 {**meta, "server": args.url})
            written.append(png)
            print(f"wrote {png} and {sidecar.name}  ({meta.get('timings', {}).get('item_ms', 0) / 1e3:.1f} s)")
            for w in meta.get("warnings", []):
                print(f"warning: {w}")
            if meta.get("random_weights"):
                print("note: the server runs the tiny RANDOM-weight demo model (no --weights): the image is a pattern")
    except ServerError as e:
        raise UserError(f"the server refused the request: {e}") from None
    except (ConnectionError, TimeoutError) as e:
        raise UserError(f"{e} (is `caphuman serve` running at {args.url}?)") from None
    finally:
        if bar is not None:
            bar.close()
    if not written:
        raise UserError("the server sent no image")
    return 0
