"""What the identity and head-condition models compute, without Triton (testable in-process).

Photos arrive as untrusted bytes: size-checked before decoding, pixel count checked from the header
before the pixels are decoded, every decoder error turned into a RequestError. The networks are the
ones of `caphuman.runtime.condition` (MTCNN, FaceNet, BiSeNet, CLIP image encoder; DECA/FLAME or the template
head and the reference rasterizer); each model calls ONE function of it:
`caphuman.runtime.condition.identity.identity_context` and `ConditionBuilder.build`.
"""
from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from caphuman.runtime import limits
from PIL import Image

from .params import RequestError, ServerSettings, check_photo

# Photos never come from files here; this path exists only so messages and DECA's "<photo>.txt"
# landmark lookup have something to look at (it never exists).
_NO_FILE = Path("/nonexistent/caphuman-request")


class LRU:
    """A small thread-safe least-recently-used cache."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_photo(data: bytes, what: str, settings: ServerSettings) -> Image.Image:
    """Encoded bytes -> upright 8-bit RGB PIL image, within the size limits. Raises RequestError naming `what`."""
    from caphuman.runtime.condition.images import PhotoError, decode_photo_source
    check_photo(data, what, settings)  # the request parser checked it too; BLS callers may skip that
    try:
        return decode_photo_source(io.BytesIO(data), what, settings.max_image_pixels)
    except PhotoError as e:
        raise RequestError(str(e)) from None


def photo_from_bytes(analyzer, data: bytes, what: str, settings: ServerSettings):
    """`caphuman.runtime.condition.Photo` of encoded bytes (what `FaceAnalyzer.analyze` does for a file: a
    512x512 photo, which is its own DECA frame, is detected once)."""
    return analyzer.analyze_image(decode_photo(data, what, settings), _NO_FILE / what)


def no_face(what: str) -> RequestError:
    return RequestError(f"no face found in {what} (MTCNN); send a photo with a clearly visible face")


class IdentityService:
    """Reference photo bytes -> identity context [258, C] float32, cached by the photo's sha256."""

    def __init__(self, pipe, facenet, bisenet, analyzer, settings: ServerSettings):
        self.pipe, self.facenet, self.bisenet, self.analyzer = pipe, facenet, bisenet, analyzer
        self.settings = settings
        self.cache = LRU(settings.identity_cache_entries)

    @torch.no_grad()
    def context(self, data: bytes) -> tuple[np.ndarray, bool, float]:
        """(context [258, C] float32, cache hit, milliseconds)."""
        from caphuman.runtime.condition import NoFaceError
        from caphuman.runtime.condition.identity import identity_context

        t0 = time.perf_counter()
        key = sha256(data) if isinstance(data, bytes) else None
        cached = self.cache.get(key) if key else None
        if cached is not None:
            return cached, True, (time.perf_counter() - t0) * 1e3
        photo = photo_from_bytes(self.analyzer, data, "REFERENCE_IMAGE", self.settings)
        if photo.detection is None:
            raise no_face("REFERENCE_IMAGE")
        try:
            ctx = identity_context(self.pipe.denoiser, self.facenet, self.bisenet, self.pipe.image_encoder, photo)
        except NoFaceError:
            raise no_face("REFERENCE_IMAGE") from None
        ctx = ctx[0].float().cpu().numpy()
        if not np.isfinite(ctx).all():
            raise RuntimeError("identity context is not finite (check the weights)")
        self.cache.put(key, ctx)
        return ctx, False, (time.perf_counter() - t0) * 1e3


class HeadConditionService:
    """Reference (+ pose photo, + explicit controls) -> hint [9, R, R] float32, cached by content."""

    def __init__(self, builder, settings: ServerSettings):
        self.builder = builder
        self.settings = settings
        self.cache = LRU(settings.hint_cache_entries)
        # Analysed photos (decoded native image + DECA frame: up to ~50 MB each at the pixel limit), so a
        # person's next pose or prompt skips MTCNN; kept few.
        self.photos = LRU(8)

    def _photo(self, data: bytes, what: str):
        key = (sha256(data), what)
        photo = self.photos.get(key)
        if photo is None:
            photo = photo_from_bytes(self.builder.analyzer, data, what, self.settings)
            if photo.frame_detection is None:
                raise no_face(what)
            self.photos.put(key, photo)
        return photo

    def hint(self, reference: bytes, pose: bytes | None, head_pose: tuple[float, float, float] | None,
             modes: str, light: str, resolution: int,
             more_controls: str = "") -> tuple[np.ndarray, bool, float, list[str], float]:
        """(hint [9, R, R] float32, cache hit, milliseconds, notes, the fraction of the head inside the frame);
        `more_controls`: HEAD_CONTROLS' JSON."""
        from caphuman.runtime.condition import NoFaceError

        from caphuman.runtime.condition.people import in_frame_fraction

        from .params import head_controls, parse_head_controls

        t0 = time.perf_counter()
        try:
            limits.check_resolution("RESOLUTION", resolution)
        except ValueError as e:
            raise RequestError(str(e)) from None
        more_controls = parse_head_controls(more_controls)
        key = (sha256(reference), sha256(pose) if pose else None, head_pose, modes, light, more_controls, resolution)
        cached = self.cache.get(key)
        if cached is not None:
            return cached[0], True, (time.perf_counter() - t0) * 1e3, cached[1], cached[2]
        try:
            yaw, pitch, roll = head_pose if head_pose is not None else (None, None, None)
            controls = head_controls(more_controls, yaw=yaw, pitch=pitch, roll=roll, light=light or None)
        except ValueError as e:
            raise RequestError(f"HEAD_POSE/LIGHT/HEAD_CONTROLS: {e}") from None
        ref = self._photo(reference, "REFERENCE_IMAGE")
        pph = self._photo(pose, "POSE_IMAGE") if pose else None
        try:
            cond, _, _ = self.builder.build(ref, pph, modes or "position,pose", controls)
        except NoFaceError as e:
            raise RequestError(str(e)) from None
        except ValueError as e:  # modes, light values
            raise RequestError(f"head condition: {e}") from None
        hint = torch.from_numpy(np.ascontiguousarray(cond.hint, dtype=np.float32))[None]
        if hint.shape[-1] != resolution:
            hint = torch.nn.functional.interpolate(hint, size=(resolution, resolution), mode="bilinear",
                                                   align_corners=False, antialias=True)
        out = hint[0].numpy()
        notes = list(cond.notes) + [f"head euler (yaw, pitch, roll) = {tuple(round(float(a), 2) for a in cond.euler)}"]
        in_frame = in_frame_fraction(cond)
        self.cache.put(key, (out, notes, in_frame))
        return out, False, (time.perf_counter() - t0) * 1e3, notes, in_frame
