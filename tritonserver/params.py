"""The one place that documents what a CapHuman-RT request carries and what comes back.

Every request field is a named input tensor of the `caphuman` model (Triton checks names, types and
shapes against config.pbtxt before our code runs, so a wrong type or shape is rejected with a clear
gRPC error). Optional inputs take the default below when absent. `tests/tritonserver/test_serving_params.py`
checks that config.pbtxt and this table agree; docs/serving.md renders it.

Batch requests: PROMPT holds 1..MAX_ITEMS prompts; POSE_IMAGE and HEAD_POSE hold 1 or N entries.
N = the longest of the three; a list of length 1 is used for every item. Item i uses seed SEED + i.

Several people in one image: REFERENCE_IMAGE holds one photo per person (up to MAX_PEOPLE); PEOPLE (JSON,
one object per person) gives each person's head controls and CapFace strength, POSE_IMAGE holds 0 or one
pose photo per person, and the items are the prompts (HEAD_POSE and HEAD_CONTROLS are per person there:
PEOPLE). The heads must make a usable layout (each mostly in the frame, none hidden by the others).
Results (one IMAGE response per item) come back in item order, each tagged with INDEX.

Prompts longer than CLIP's 77 tokens are TRUNCATED, as CLIP and the official code do, and the
response metadata carries a warning (`warnings`), as does the server log.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np

from caphuman.engines.samplers import DEFAULT_SAMPLER, SAMPLERS
from caphuman.export.people import MAX_PEOPLE
from caphuman.runtime import limits

MODEL_NAME = "caphuman"
IDENTITY_MODEL = "identity"
HEAD_MODEL = "head_condition"


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str            # Triton type name as in config.pbtxt (TYPE_ prefix dropped)
    dims: tuple[int, ...]
    default: object       # None: required (inputs) / always present (outputs)
    doc: str
    optional: bool = True


# ---------------------------------------------------------------------------------------- inputs
INPUTS: tuple[Field, ...] = (
    Field("REFERENCE_IMAGE", "STRING", (-1,), None,
          "encoded reference face photo (PNG/JPEG/WebP bytes); exactly one face is used (the largest); "
          f"several people in one image: one photo per person, up to {MAX_PEOPLE}", False),
    Field("PROMPT", "STRING", (-1,), None, "1..MAX_ITEMS UTF-8 prompts (one image each)", False),
    Field("NEGATIVE_PROMPT", "STRING", (1,), "", "negative prompt (the unconditional branch), shared by all items"),
    Field("ADDED_PROMPT", "STRING", (1,), "", "appended as 'PROMPT, ADDED_PROMPT' (official a_prompt)"),
    Field("POSE_IMAGE", "STRING", (-1,), None, "0, 1 or N encoded pose photos (head position/pose per MODES); "
          "several people: 0 or one per person"),
    Field("HEAD_POSE", "FP32", (-1, 3), None,
          "0, 1 or N rows of explicit (yaw, pitch, roll) degrees; override the photos' pose"),
    Field("MODES", "STRING", (1,), "position,pose", "what the pose photo gives: position, pose, expression, "
          "lighting, all (official modes)"),
    Field("LIGHT", "STRING", (1,), "", "lighting preset (front, left, right, top, bottom, flat); '' = from photos"),
    Field("HEAD_CONTROLS", "STRING", (1,), "", "JSON object of further head controls for every item: scale (face "
          "height / frame height), center ([x, y] in the frame), jaw (degrees; FLAME model), expression (FLAME "
          "coefficients; FLAME model), yaw, pitch, roll (degrees; HEAD_POSE overrides them); '' = none"),
    Field("PEOPLE", "STRING", (1,), "", "several people: JSON list, one object per REFERENCE_IMAGE, with that "
          "person's head controls (the HEAD_CONTROLS keys) and strength (its CapFace scale); a person with a "
          "center and no scale is sized to fit beside the others; '' = every person where their photo puts them"),
    Field("SAMPLER", "STRING", (1,), DEFAULT_SAMPLER, f"sampler: {', '.join(sorted(SAMPLERS))} (official: ddim)"),
    Field("STEPS", "INT32", (1,), 20, f"denoising steps, {limits.MIN_STEPS}..{limits.MAX_STEPS} (official DDIM: 20)"),
    Field("GUIDANCE", "FP32", (1,), 7.0, f"classifier-free guidance scale, in [{limits.MIN_GUIDANCE:g}, {limits.MAX_GUIDANCE:g}]"),
    Field("ETA", "FP32", (1,), 0.0, "DDIM eta >= 0"),
    Field("STRENGTH", "FP32", (1,), 1.0, f"CapFace residual scale, in [{limits.MIN_STRENGTH:g}, {limits.MAX_STRENGTH:g}]"),
    Field("TAU", "FP32", (1,), 0.0, f"ID dropout: identity off for timesteps > tau (0 = off), 0..{limits.MAX_TAU}"),
    Field("SEED", "INT64", (1,), 12345, "seed of item 0 (item i: SEED + i), 0..2^32-1"),
    Field("RESOLUTION", "INT32", (1,), 512, f"square output size: {limits.RESOLUTION_RULE}"),
    Field("PROGRESS", "BOOL", (1,), True, "stream a progress response after every denoising step"),
    Field("PREVIEW_SIZE", "INT32", (1,), 0, "0 = no previews; else progress responses carry a "
          "PREVIEW_SIZE x PREVIEW_SIZE RGB preview of the current latents (16..256)"),
)

# --------------------------------------------------------------------------------------- outputs
OUTPUTS: tuple[Field, ...] = (
    Field("KIND", "STRING", (1,), None, "'progress' or 'image'"),
    Field("INDEX", "INT32", (1,), None, "item index in the request (results come in order)"),
    Field("STEP", "INT32", (1,), None, "denoising steps done for this item (progress) / total (image)"),
    Field("TOTAL_STEPS", "INT32", (1,), None, "denoising steps of this item"),
    Field("IMAGE", "UINT8", (-1, -1, 3), None, "RGB image (KIND=image) or low-res preview (KIND=progress)"),
    Field("METADATA", "STRING", (1,), None, "JSON: generation parameters, per-stage timings (ms), "
          "identity/head cache hits, warnings, random_weights (image responses; '{}' on progress)"),
)

# The end of a stream is Triton's empty final response (client: enable_empty_final_response=True).

INPUT_BY_NAME = {f.name: f for f in INPUTS}
OUTPUT_BY_NAME = {f.name: f for f in OUTPUTS}
NUMPY_DTYPES = {"STRING": np.object_, "FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
                "UINT8": np.uint8}
LIGHT_NAMES = ("front", "left", "right", "top", "bottom", "flat")
MAX_SEED = limits.MAX_SEED


# ---------------------------------------------------------------------------------------- server
@dataclass(frozen=True)
class ServerSettings:
    """Limits and caches, the same for every model. Override with the CAPHUMAN_SERVE_SETTINGS
    environment variable (JSON object, e.g. '{"max_items": 4}'); unknown keys are an error."""
    max_image_bytes: int = 16 << 20        # encoded bytes per photo
    max_request_bytes: int = 48 << 20      # encoded bytes of all photos of one request (the gRPC/HTTP
                                           # gateway refuses a larger message before reading it)
    max_image_pixels: int = 4096 * 4096    # decoded width * height per photo (checked before decoding)
    max_items: int = 8                     # prompts/poses per request
    max_prompt_bytes: int = limits.MAX_PROMPT_BYTES  # per prompt, before tokenizing
    max_request_cost: int = limits.MAX_REQUEST_COST  # steps x images x (resolution/512)^2 per request
    identity_cache_entries: int = 256      # LRU of identity contexts by photo sha256 (per model instance)
    hint_cache_entries: int = 128          # LRU of head hints by (photos, controls, resolution)

    @classmethod
    def from_env(cls, environ=os.environ) -> "ServerSettings":
        raw = environ.get("CAPHUMAN_SERVE_SETTINGS", "").strip()
        if not raw:
            return cls()
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"CAPHUMAN_SERVE_SETTINGS is not JSON: {e}") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            raise ValueError(f"CAPHUMAN_SERVE_SETTINGS: unknown keys {sorted(set(values) - known)}; known: {sorted(known)}")
        for k, v in values.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"CAPHUMAN_SERVE_SETTINGS: {k} must be a positive integer, got {v!r}")
        return cls(**values)

    def as_dict(self) -> dict:
        return asdict(self)


# Error messages start with one of these: BLS responses and streamed errors lose the error code (BLS: all
# INTERNAL; a stream: none), so the prefix says which it was (tritonserver/backend.py, client.ServerError).
BAD_REQUEST_PREFIX = "invalid request: "
INTERNAL_PREFIX = "internal error "


class RequestError(ValueError):
    """A bad request: sent back to the client as an INVALID_ARG error; the server keeps serving."""


# --------------------------------------------------------------------------------- request parsing
@dataclass
class ParsedRequest:
    references: list[bytes]   # one per person
    prompts: list[str]
    negative_prompt: str
    added_prompt: str
    pose_images: list[bytes]
    head_poses: list[tuple[float, float, float]]
    modes: str
    light: str
    head_controls: str    # canonical JSON of HEAD_CONTROLS ('' = none)
    sampler: str
    steps: int
    guidance: float
    eta: float
    strength: float
    tau: float
    seed: int
    resolution: int
    progress: bool
    preview_size: int
    people: list[dict]    # several people: each person's canonical head controls (and strength)

    @property
    def reference(self) -> bytes:
        return self.references[0]

    @property
    def num_people(self) -> int:
        return len(self.references)

    @property
    def num_items(self) -> int:
        if self.num_people > 1:  # the pose photos are the people's
            return len(self.prompts)
        return max(len(self.prompts), len(self.pose_images), len(self.head_poses), 1)

    def item(self, lst: list, i: int):
        return None if not lst else lst[0] if len(lst) == 1 else lst[i]


def _text(value, name: str, max_bytes: int) -> str:
    raw = value if isinstance(value, bytes) else str(value).encode()
    if len(raw) > max_bytes:
        raise RequestError(f"{name} is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{name} is not valid UTF-8 ({e})") from None


def check_photo(data, what: str, settings: ServerSettings) -> None:
    """A photo's byte size and header (format, width x height) within the limits, before any pixel is
    decoded or any model runs. Raises RequestError naming `what`."""
    from caphuman.runtime.condition.images import PhotoError, open_photo
    if not isinstance(data, bytes) or not data:
        raise RequestError(f"{what} is empty; send the bytes of a PNG/JPEG/WebP photo")
    if len(data) > settings.max_image_bytes:
        raise RequestError(f"{what} is {len(data) / 2**20:.1f} MiB, over the "
                           f"{settings.max_image_bytes / 2**20:.0f} MiB limit")
    try:
        open_photo(io.BytesIO(data), what, settings.max_image_pixels).close()
    except PhotoError as e:
        raise RequestError(str(e)) from None


def check_request_photos(photos: list[bytes], settings: ServerSettings) -> None:
    """All photos of one request within max_request_bytes together (each is checked by check_photo)."""
    total = sum(len(p) for p in photos)
    if total > settings.max_request_bytes:
        raise RequestError(f"the request's photos are {total / 2**20:.1f} MiB together, over the "
                           f"{settings.max_request_bytes / 2**20:.0f} MiB limit (split the request)")


def _scalar(arrays: dict, name: str):
    spec = INPUT_BY_NAME[name]
    arr = arrays.get(name)
    if arr is None:
        return spec.default
    if arr.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0]


def parse_request(arrays: dict[str, np.ndarray], settings: ServerSettings) -> ParsedRequest:
    """Validate the input tensors of one request (name -> numpy array). Raises RequestError."""
    unknown = set(arrays) - set(INPUT_BY_NAME)
    if unknown:
        raise RequestError(f"unknown inputs {sorted(unknown)}; known: {sorted(INPUT_BY_NAME)}")
    for f in INPUTS:
        if not f.optional and f.name not in arrays:
            raise RequestError(f"missing required input {f.name}: {f.doc}")
    refs = list(arrays["REFERENCE_IMAGE"].reshape(-1))
    if not 1 <= len(refs) <= MAX_PEOPLE:
        raise RequestError(f"REFERENCE_IMAGE must hold 1 to {MAX_PEOPLE} photos (one per person), got {len(refs)}")
    if any(not isinstance(ref, bytes) or not ref for ref in refs):
        raise RequestError("REFERENCE_IMAGE must be the non-empty bytes of an encoded photo")
    prompts = [_text(p, f"PROMPT[{i}]", settings.max_prompt_bytes) for i, p in enumerate(arrays["PROMPT"].reshape(-1))]
    poses = [] if "POSE_IMAGE" not in arrays else list(arrays["POSE_IMAGE"].reshape(-1))
    if any(not isinstance(p, bytes) or not p for p in poses):
        raise RequestError("POSE_IMAGE entries must be non-empty bytes of encoded photos")
    check_request_photos(refs + poses, settings)
    head = [] if "HEAD_POSE" not in arrays else [tuple(float(v) for v in row) for row in arrays["HEAD_POSE"].reshape(-1, 3)]
    for row in head:
        if not all(math.isfinite(v) for v in row):
            raise RequestError(f"HEAD_POSE must be finite (yaw, pitch, roll) degrees, got {row}")
    people = parse_people(_text(_scalar(arrays, "PEOPLE"), "PEOPLE", 16384), len(refs))
    if len(refs) > 1:
        given = [k for k in ("HEAD_POSE", "HEAD_CONTROLS") if k in arrays]
        if given:
            raise RequestError(f"{', '.join(given)} describe one person; several people take their controls in PEOPLE")
        if len(poses) not in (0, len(refs)):
            raise RequestError(f"POSE_IMAGE must hold 0 or one photo per person ({len(refs)}), got {len(poses)}")
    lengths = {"PROMPT": len(prompts)} if len(refs) > 1 else \
        {"PROMPT": len(prompts), "POSE_IMAGE": len(poses), "HEAD_POSE": len(head)}
    if not prompts:
        raise RequestError("PROMPT must hold at least one prompt")
    n = max(lengths.values())
    if n > settings.max_items:
        raise RequestError(f"{n} items in one request; at most {settings.max_items} (split the request)")
    bad = {k: v for k, v in lengths.items() if v not in (0, 1, n)}
    if bad:
        raise RequestError(f"batch lengths must be 1 or N={n}, got {bad}")
    light = _text(_scalar(arrays, "LIGHT"), "LIGHT", 64).strip()
    if light and light not in LIGHT_NAMES:
        raise RequestError(f"LIGHT must be one of {LIGHT_NAMES} or empty, got {light!r}")
    head_controls = parse_head_controls(_text(_scalar(arrays, "HEAD_CONTROLS"), "HEAD_CONTROLS", 4096))
    req = ParsedRequest(
        references=refs, prompts=prompts, people=people,
        negative_prompt=_text(_scalar(arrays, "NEGATIVE_PROMPT"), "NEGATIVE_PROMPT", settings.max_prompt_bytes),
        added_prompt=_text(_scalar(arrays, "ADDED_PROMPT"), "ADDED_PROMPT", settings.max_prompt_bytes),
        pose_images=poses, head_poses=head, modes=_text(_scalar(arrays, "MODES"), "MODES", 128).strip(),
        light=light, head_controls=head_controls, sampler=_text(_scalar(arrays, "SAMPLER"), "SAMPLER", 64).strip(), steps=int(_scalar(arrays, "STEPS")), guidance=float(_scalar(arrays, "GUIDANCE")),
        eta=float(_scalar(arrays, "ETA")), strength=float(_scalar(arrays, "STRENGTH")),
        tau=float(_scalar(arrays, "TAU")), seed=int(_scalar(arrays, "SEED")),
        resolution=int(_scalar(arrays, "RESOLUTION")), progress=bool(_scalar(arrays, "PROGRESS")),
        preview_size=int(_scalar(arrays, "PREVIEW_SIZE")))
    _check_ranges(req, settings)
    # Photos last (their headers are the costliest part of parsing, and still no pixel is decoded): a request
    # that will be refused is refused here, before any model runs or any cache is filled.
    for i, ref in enumerate(refs):
        check_photo(ref, f"REFERENCE_IMAGE[{i}]" if len(refs) > 1 else "REFERENCE_IMAGE", settings)
    for i, pose in enumerate(poses):
        check_photo(pose, f"POSE_IMAGE[{i}]" if len(poses) > 1 else "POSE_IMAGE", settings)
    return req


HEAD_CONTROL_KEYS = ("scale", "center", "jaw", "expression", "yaw", "pitch", "roll")


def _check_controls(values, what: str) -> dict:
    if not isinstance(values, dict) or set(values) - set(HEAD_CONTROL_KEYS):
        raise RequestError(f"{what} must be a JSON object with keys among {HEAD_CONTROL_KEYS}, got {values!r}")
    try:
        head_controls(json.dumps(values))
    except (TypeError, ValueError) as e:
        raise RequestError(f"{what}: {e}") from None
    return values


def parse_head_controls(text: str) -> str:
    """HEAD_CONTROLS -> canonical JSON (sorted keys; '' when empty), its values checked by HeadControls."""
    if not text.strip():
        return ""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"HEAD_CONTROLS is not JSON: {e}") from None
    return json.dumps(_check_controls(values, "HEAD_CONTROLS"), sort_keys=True)


def parse_people(text: str, people: int) -> list[dict]:
    """PEOPLE -> one dict per person: head controls (checked) plus "strength" (default 1)."""
    if not text.strip():
        return [{"strength": 1.0} for _ in range(people)]
    if people == 1:
        raise RequestError("PEOPLE is for several people (one REFERENCE_IMAGE each); one person: HEAD_CONTROLS")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"PEOPLE is not JSON: {e}") from None
    if not isinstance(values, list) or len(values) != people:
        raise RequestError(f"PEOPLE must be a JSON list of one object per REFERENCE_IMAGE ({people}), got {text!r}")
    out = []
    for i, person in enumerate(values):
        if not isinstance(person, dict):
            raise RequestError(f"PEOPLE[{i}] must be a JSON object, got {person!r}")
        controls = {k: v for k, v in person.items() if k != "strength"}
        strength = person.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise RequestError(f"PEOPLE[{i}].strength must be a finite number, got {strength!r}")
        out.append({**_check_controls(controls, f"PEOPLE[{i}]"), "strength": float(strength)})
    return out


def head_controls(text: str, **pose) -> object:
    """`caphuman.runtime.condition.HeadControls` of a canonical HEAD_CONTROLS and the item's yaw/pitch/roll/light
    (given ones override the JSON's)."""
    from caphuman.runtime.condition import HeadControls
    values = json.loads(text) if text else {}
    values.update({k: v for k, v in pose.items() if v is not None})
    if values.get("center") is not None:
        values["center"] = tuple(float(v) for v in values["center"])
    if values.get("expression") is not None:
        values["expression"] = tuple(float(v) for v in values["expression"])
    return HeadControls(**values)


def _check_ranges(r: ParsedRequest, settings: ServerSettings) -> None:
    from caphuman.engines.samplers import check_sampler_args
    try:
        limits.check_sampling(r.steps, r.guidance, r.eta, r.strength, r.tau, r.sampler,
                              names={k: k.upper() for k in ("steps", "guidance", "eta", "strength", "tau", "sampler")})
        check_sampler_args(r.sampler, r.steps, r.eta)
        limits.check_resolution("RESOLUTION", r.resolution)
        limits.check_request_cost(r.steps, r.resolution, r.num_items, settings.max_request_cost)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if not 0 <= r.seed <= MAX_SEED - (r.num_items - 1):
        raise RequestError(f"SEED must be in [0, {MAX_SEED}] for every item (SEED + i), got {r.seed}")
    if r.preview_size and not 16 <= r.preview_size <= 256:
        raise RequestError(f"PREVIEW_SIZE must be 0 or in [16, 256], got {r.preview_size}")


def request_arrays(reference: bytes | list[bytes], prompts: list[str] | str, **kwargs) -> dict[str, np.ndarray]:
    """Client side: keyword arguments (lower-case input names) -> named numpy arrays, typed per INPUTS."""
    refs = [reference] if isinstance(reference, bytes) else list(reference)
    arrays = {"REFERENCE_IMAGE": np.array(refs, dtype=np.object_),
              "PROMPT": np.array([p.encode() for p in ([prompts] if isinstance(prompts, str) else prompts)],
                                 dtype=np.object_)}
    for key, value in kwargs.items():
        name = key.upper()
        if name not in INPUT_BY_NAME or name in arrays:
            raise ValueError(f"unknown request field {key!r}; known: {sorted(k.lower() for k in INPUT_BY_NAME)}")
        if value is None:
            continue
        spec = INPUT_BY_NAME[name]
        if name == "POSE_IMAGE":
            value = [value] if isinstance(value, bytes) else list(value)
            arrays[name] = np.array(value, dtype=np.object_)
        elif name == "HEAD_POSE":
            arrays[name] = np.asarray(value, dtype=np.float32).reshape(-1, 3)
        elif name == "HEAD_CONTROLS" and isinstance(value, dict) or name == "PEOPLE" and isinstance(value, list):
            arrays[name] = np.array([json.dumps(value).encode()], dtype=np.object_)
        elif spec.dtype == "STRING":
            arrays[name] = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
        else:
            arrays[name] = np.array([value], dtype=NUMPY_DTYPES[spec.dtype])
    return arrays
