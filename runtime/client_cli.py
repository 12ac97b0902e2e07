"""`caphuman client`: one generation request to a CapHuman-RT server (gRPC stream, progress bar)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np


from . import limits
from .cli import HelpFormatter, add_sampling_arguments
from .condition_cli import comma_floats
from .people_cli import add_person_argument, request_people

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
    p.add_argument("--reference", type=Path, help="reference face photo (PNG/JPEG/WebP); required unless --person")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for a batch)")
    p.add_argument("--negative-prompt", default="", help="negative prompt")
    p.add_argument("--added-prompt", default="", help="appended as 'PROMPT, ADDED' (official a_prompt)")
    h = p.add_argument_group("head condition (a pose photo and/or explicit angles; default: the reference's)")
    h.add_argument("--pose", action="append", type=Path, help="pose photo (repeat for a batch)")
    h.add_argument("--yaw", type=float, action="append", help="degrees, + turns the face to the image's right")
    h.add_argument("--pitch", type=float, action="append", help="degrees, + tilts the face down")
    h.add_argument("--roll", type=float, action="append", help="degrees, + tilts the head counter-clockwise")
    h.add_argument("--modes", default="position,pose", help="what the pose photo gives (official modes)")
    h.add_argument("--light", default="", help="lighting preset: front, left, right, top, bottom, flat "
                                               "(default: from the photos)")
    h.add_argument("--scale", type=float, help="face size as a fraction of the frame height [0.05, 2]")
    h.add_argument("--center", type=float, nargs=2, metavar=("X", "Y"), help="face centre in the frame, [0, 1] each")
    h.add_argument("--jaw", type=float, help="jaw opening in degrees [0, 40] (a server with the FLAME model)")
    h.add_argument("--expression", type=comma_floats, help="up to 50 FLAME expression coefficients, comma-separated "
                                                      "(a server with the FLAME model)")
    add_person_argument(h)
    s = p.add_argument_group("sampling")
    add_sampling_arguments(s)
    s.add_argument("--seed", type=int, default=12345, help="seed of item 0 (item i: seed + i)")
    s.add_argument("--num-samples", type=int, default=1,
                   help="images per prompt/pose (each its own item and seed; at most the server's max_items, 8, in all)")
    s.add_argument("--resolution", type=int, default=512, help=f"image side: {limits.RESOLUTION_RULE}")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    p.add_argument("--name", default="caphuman", help="file name prefix")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files of the same names")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each server message")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _head_poses(args) -> list[tuple[float, float, float]] | None:
    """HEAD_POSE rows, one per item, where an angle is given several times (a batch of poses); an angle not
    given is 0 there. Angles given once travel in HEAD_CONTROLS instead (`more_head_controls`), so an angle
    not given stays the photo's, as with `caphuman generate`."""
    lists = {k: getattr(args, k) or [] for k in ("yaw", "pitch", "roll")}
    n = max(len(v) for v in lists.values())
    if n <= 1:
        return None
    for k, v in lists.items():
        if len(v) not in (0, 1, n):
            raise ValueError(f"--{k} given {len(v)} times; give it 0, 1 or {n} times (once per item)")
    pick = {k: (v * n if len(v) == 1 else v) if v else [0.0] * n for k, v in lists.items()}
    return list(zip(pick["yaw"], pick["pitch"], pick["roll"]))


def more_head_controls(args) -> dict | None:
    """The request's HEAD_CONTROLS (the same for every item), or None; yaw/pitch/roll when given once."""
    values = {"scale": args.scale, "center": list(args.center) if args.center else None, "jaw": args.jaw,
              "expression": list(args.expression) if args.expression else None}
    if _head_poses(args) is None:
        values.update({k: getattr(args, k)[0] for k in ("yaw", "pitch", "roll") if getattr(args, k)})
    return {k: v for k, v in values.items() if v is not None} or None


def expand_items(args) -> dict:
    """The request's per-item lists with every prompt/pose item repeated --num-samples times (item i gets
    seed + i). A list of one entry stays one entry: the server uses it for every item."""
    poses, head = args.pose or [], _head_poses(args) or []
    n = max(len(args.prompt), len(poses), len(head))
    m = args.num_samples

    def repeat(values: list) -> list:
        return values if len(values) <= 1 else [v for v in values for _ in range(m)]

    prompts = args.prompt * n if len(args.prompt) == 1 else args.prompt
    return {"prompts": [p for p in prompts for _ in range(m)], "pose_image": repeat(poses) or None,
            "head_pose": repeat(head) or None, "items": n * m}


class ProgressBar:
    """One bar for the whole request: steps done summed over its items (a batch advances them together).
    It starts at the first progress message, so the first rate covers real steps, not the time to get there."""

    def __init__(self, items: int, tqdm):
        self.items, self.tqdm, self.bar, self.done = items, tqdm, None, {}

    def update(self, msg) -> None:
        self.done[msg.index] = msg.step
        if self.bar is None:
            self.bar = self.tqdm(total=msg.total * self.items, initial=sum(self.done.values()),
                                 desc=f"denoising {self.items} image{'s' if self.items > 1 else ''}", unit="step")
            return
        self.bar.update(sum(self.done.values()) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def printable(value, limit: int = 200) -> str:
    """A server-provided value as one line of plain text for the terminal (no control characters)."""
    text = str(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def save_reply(msg, out: Path, name: str, seed: int, items: int, extra: dict, overwrite: bool) -> tuple[Path, Path]:
    """One image reply -> `out/<name>_<seed + index>.png` and its JSON sidecar (written as a pair, atomically).

    The file name comes from what this client asked for (its --seed, the reply's item index checked against
    the request's items), never from strings in the server's reply: a reply's `seed` of "../x" or a hostile
    index cannot place a file outside `out`. A reply that is not an image of this request is refused."""
    from caphuman.runtime.cli import UserError
    from caphuman.runtime.outputs import save_png_with_sidecar

    index = msg.index
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < items:
        raise UserError(f"the server sent an image for item {index!r} of a {items}-item request; refused")
    image = msg.image
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and min(image.shape[:2]) >= 1):
        shape = getattr(image, "shape", None)
        raise UserError(f"the server sent item {index} as {getattr(image, 'dtype', type(image).__name__)} "
                        f"{shape}, not an RGB uint8 image; refused")
    if not isinstance(msg.metadata, dict):
        raise UserError(f"the server sent item {index}'s metadata as {type(msg.metadata).__name__}, not a JSON object")
    if "seed" in msg.metadata and msg.metadata["seed"] != seed + index:
        raise UserError(f"the server sent item {index} with seed {printable(msg.metadata['seed'])}, "
                        f"not the requested {seed + index}; refused")
    return save_png_with_sidecar(image, out / f"{name}_{seed + index}.png", {**msg.metadata, **extra},
                                 overwrite=overwrite)


def run(args) -> int:
    from caphuman.runtime.cli import UserError
    from caphuman.runtime.outputs import check_new_outputs
    from caphuman.runtime.provenance import command_record, file_record
    from caphuman.tritonserver.client import CapHumanClient, Progress, ServerError
    from tqdm import tqdm

    people = request_people(args) if args.person else None
    if people is None and args.reference is None:
        raise UserError("--reference (the face photo) is required; several people: --person reference=PHOTO ...")
    for what, photo in [("--reference", r) for r in (people["reference"] if people else [args.reference])] + \
            [("--pose", p) for p in ((people or {}).get("pose_image") or args.pose or [])]:
        if not photo.is_file():
            raise UserError(f"{what} photo not found: {photo}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    items = expand_items(args)
    check_new_outputs([args.out / f"{args.name}_{args.seed + i}{suffix}" for i in range(items["items"])
                       for suffix in (".png", ".json")], args.overwrite)
    client = CapHumanClient(args.url, timeout=args.timeout)
    fields = dict(negative_prompt=args.negative_prompt, added_prompt=args.added_prompt, modes=args.modes,
                  light=args.light, sampler=args.sampler, steps=args.steps, guidance=args.guidance, eta=args.eta,
                  strength=args.strength, tau=args.tau, seed=args.seed, resolution=args.resolution,
                  progress=not args.no_progress, head_pose=items["head_pose"], pose_image=items["pose_image"],
                  head_controls=more_head_controls(args))
    reference = args.reference
    if people is not None:  # each person's photos and controls; the items are the prompts
        reference = people.pop("reference")
        fields.update(head_pose=None, head_controls=None)
        fields.update(people)
    record = command_record("client", args, ("reference", "pose"))  # the request's inputs, photos hashed
    if people is not None:
        record["files"]["people"] = [file_record(r) for r in reference] + \
            [file_record(p) for p in fields.get("pose_image") or []]
    bar = ProgressBar(items["items"], tqdm)
    written = []
    try:
        for msg in client.stream(reference, items["prompts"], **fields):
            if isinstance(msg, Progress):
                bar.update(msg)
                continue
            png, sidecar = save_reply(msg, args.out, args.name, args.seed, items["items"],
                                      {"server": args.url, "inputs": record}, args.overwrite)
            meta = msg.metadata
            written.append(png)
            timings = meta.get("timings")
            ms = timings.get("item_ms") if isinstance(timings, dict) else None
            took = f"  ({ms / 1e3:.1f} s)" if isinstance(ms, (int, float)) and not isinstance(ms, bool) else ""
            tqdm.write(f"wrote {png} and {sidecar.name}{took}")  # below the progress bar, not on its line
            warnings = meta.get("warnings")
            for w in warnings if isinstance(warnings, list) else []:
                tqdm.write(f"warning: {printable(w)}")
            if meta.get("random_weights"):
                tqdm.write("note: the server runs the tiny RANDOM-weight demo model (no --weights): the image is a pattern")
    except ServerError as e:
        raise UserError(f"the server refused the request: {printable(e, 2000)}") from None
    except (ConnectionError, TimeoutError) as e:
        raise UserError(f"{e} (is `caphuman serve` running at {args.url}?)") from None
    finally:
        bar.close()
    if not written:
        raise UserError("the server sent no image")
    return 0
