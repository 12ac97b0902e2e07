"""Face detection and the two official crops (spec 2.1 and 6.1).

* FaceNet crop: MTCNN on the photo at native resolution, largest face, box
  ``[int(max(x1,0)), int(max(y1,0)), int(min(x2,W)), int(min(y2,H))]``, PIL crop + BILINEAR resize to
  160, float 0..255 -> (x - 127.5) / 128. No face: an error naming the file, or (only with
  ``fallback=True``) the official fallback: the whole photo resized to 160x160 (bilinear) / 255 in
  [0, 1], *without* the standardisation (inconsistent, as the original).
* DECA crop: the photo resized to 512x512 (skimage semantics), a face box, then
  ``old_size`` / ``center`` from DECA's ``bbox2point`` and ``size = int(old_size * 1.25)``, and a
  similarity warp of that square to 224x224 (bilinear, zeros outside), [0, 1] RGB.
  Box source, in the official order: ``<photo>.txt`` with 68 (x, y) landmarks in the 512 frame
  (type ``kpt68``: x1.1); else a detector. The official detector is face_alignment's FAN (68
  landmarks, type ``kpt68``), whose weights cannot be had here; we use MTCNN's box with DECA's own
  rule for detector boxes (type ``bbox``: old_size = (w + h) / 2, centre moved down by 0.12 old_size),
  the rule DECA applies to its MTCNN detector option. The crop therefore differs a little from the
  official one (DECA's camera estimate absorbs the crop, the head shape/pose estimates may shift
  slightly). No face: the whole image (type ``kpt68``), as the official code.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from caphuman.export.face.mtcnn import MTCNN, Detection

from .graphs import CudaGraphed
from .images import PhotoError, load_photo, resize_like_deca
from .projection import CROP_SIZE, similarity_crop, tform_rows_from_T

log = logging.getLogger(__name__)

FACENET_SIZE = 160
DECA_FRAME = 512
DECA_SCALE = 1.25


class NoFaceError(ValueError):
    """No face found in a photo (and no fallback was asked for)."""


@dataclass
class DecaCrop:
    image: torch.Tensor        # [3, 224, 224] float32 in [0, 1] (on the device asked for)
    T: np.ndarray              # 3x3 similarity frame pixels -> crop pixels
    tform_rows: np.ndarray     # inv(T)^T: crop pixels -> frame pixels (row vectors)
    box_source: str            # 'landmarks-txt' | 'mtcnn' | 'whole-image'


@dataclass
class Photo:
    """One photo, loaded and analysed once."""
    path: Path
    image: Image.Image                 # native-resolution RGB
    frame: np.ndarray                  # [512, 512, 3] uint8, DECA's resized frame
    detection: Detection | None        # largest face in the native image
    frame_detection: Detection | None  # largest face in the 512 frame

    @property
    def has_face(self) -> bool:
        return self.detection is not None


class FaceAnalyzer:
    """MTCNN + the crops. One instance serves many photos."""

    def __init__(self, mtcnn: MTCNN | None = None, device: str | torch.device | None = None,
                 reuse_frame_detection: bool = True):
        self.mtcnn = mtcnn or MTCNN()
        # False: detect in the 512 frame even when it is the photo itself (the official code's work).
        self.reuse_frame_detection = reuse_frame_detection
        if device is not None:
            self.mtcnn.to(device)  # the official code runs MTCNN on CUDA too
        if self.mtcnn.device.type == "cuda" and not isinstance(self.mtcnn.pyramid, CudaGraphed):
            # The P-Net pyramid is ~160 small kernels: replay it per image size once a size repeats
            # (DECA's 512 frame always does).
            self.mtcnn.pyramid = CudaGraphed(self.mtcnn.pyramid, capture_after=2)

    def analyze(self, path: str | Path) -> Photo:
        path = Path(path)
        return self.analyze_image(load_photo(path), path)

    def analyze_many(self, paths: list[str | Path]) -> list[Photo]:
        """`analyze` of several photos; the later ones are decoded in worker threads while the
        earlier ones are detected (PIL decodes without holding the GIL). Same results, in order."""
        paths = [Path(p) for p in paths]
        if len(paths) < 2:
            return [self.analyze(p) for p in paths]
        with ThreadPoolExecutor(max_workers=min(4, len(paths) - 1)) as pool:
            later = [pool.submit(load_photo, p) for p in paths[1:]]
            photos = [self.analyze(paths[0])]
            photos += [self.analyze_image(f.result(), p) for f, p in zip(later, paths[1:])]
        return photos

    def analyze_image(self, image: Image.Image, path: str | Path) -> Photo:
        """Detection in the native photo and in DECA's 512 frame. When the frame is the photo itself
        (a 512x512 photo: `resize_like_deca` is then the identity, pixel for pixel) the detector,
        a deterministic function of the pixels, is not run a second time on the same input."""
        arr = np.asarray(image)
        frame = resize_like_deca(arr, DECA_FRAME)
        det = self.mtcnn.detect(arr)
        same = self.reuse_frame_detection and frame.shape == arr.shape and np.array_equal(frame, arr)
        fdet = det if same else self.mtcnn.detect(frame)
        return Photo(Path(path), image, frame, det[0] if det else None, fdet[0] if fdet else None)

    # ------------------------------------------------------------------ FaceNet crop
    @staticmethod
    def facenet_crop(photo: Photo, fallback: bool = False) -> torch.Tensor:
        """[3, 160, 160] FaceNet input (see the module docstring for the no-face fallback)."""
        img = photo.image
        if photo.detection is None:
            if not fallback:
                raise NoFaceError(f"no face found in {photo.path} (MTCNN, thresholds 0.6/0.7/0.7); use a photo "
                                  "with a visible face, or allow the official whole-image fallback")
            log.warning("no face found in %s: using the whole photo for FaceNet (official fallback)", photo.path)
            small = img.resize((FACENET_SIZE, FACENET_SIZE), Image.BILINEAR)
            return torch.from_numpy(np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        x1, y1, x2, y2 = photo.detection.box
        W, H = img.size
        box = (int(max(x1, 0)), int(max(y1, 0)), int(min(x2, W)), int(min(y2, H)))
        face = img.crop(box).resize((FACENET_SIZE, FACENET_SIZE), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(face, dtype=np.float32).transpose(2, 0, 1).copy())
        return (t - 127.5) / 128.0

    # ------------------------------------------------------------------ DECA crop
    @staticmethod
    def deca_box(photo: Photo) -> tuple[float, np.ndarray, str]:
        """(old_size, center, source) in the 512 frame, by DECA's bbox2point rules."""
        txt = photo.path.with_suffix(".txt")
        if txt.is_file():
            try:
                kpt = np.loadtxt(txt, ndmin=2)[:, :2]
            except ValueError as e:
                raise PhotoError(f"landmark file {txt} is not a table of (x, y) rows: {e}") from None
            if kpt.shape[0] != 68 or not np.all(np.isfinite(kpt)):
                raise PhotoError(f"landmark file {txt} must hold 68 finite (x, y) rows, got {kpt.shape[0]}")
            left, right, top, bottom = kpt[:, 0].min(), kpt[:, 0].max(), kpt[:, 1].min(), kpt[:, 1].max()
            kind, source = "kpt68", "landmarks-txt"
        elif photo.frame_detection is not None:
            left, top, right, bottom = photo.frame_detection.box
            kind, source = "bbox", "mtcnn"
        else:
            h, w = photo.frame.shape[:2]
            left, right, top, bottom = 0, h - 1, 0, w - 1  # sic: the official swaps h and w (square here)
            kind, source = "kpt68", "whole-image"
        if kind == "kpt68":
            old_size = (right - left + bottom - top) / 2 * 1.1
            center = np.array([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0])
        else:
            old_size = (right - left + bottom - top) / 2
            center = np.array([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0 + old_size * 0.12])
        return float(old_size), center, source

    @classmethod
    def deca_crop(cls, photo: Photo, device=None) -> DecaCrop:
        """DECA's 224 crop of the photo's 512 frame; `image` is computed on `device` (default the CPU)."""
        old_size, center, source = cls.deca_box(photo)
        size = int(old_size * DECA_SCALE)
        if size < 1:
            raise PhotoError(f"face box in {photo.path} is degenerate (size {size})")
        T = similarity_crop((float(center[0]), float(center[1])), size)
        out = _warp_bilinear(photo.frame, np.linalg.inv(T), CROP_SIZE, device)
        return DecaCrop(out.float().contiguous(), T, tform_rows_from_T(T), source)


def _linear_taps(coord: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order-1 taps of sample positions along one axis: lower index, its weight, and validity masks
    folded into the weights (samples outside [0, n-1] read the constant 0, as mode='grid-constant')."""
    lo = np.floor(coord).astype(np.int64)
    frac = coord - lo
    w0 = np.where((lo >= 0) & (lo < n), 1.0 - frac, 0.0)
    w1 = np.where((lo + 1 >= 0) & (lo + 1 < n), frac, 0.0)
    return lo, w0, w1


def _warp_bilinear(frame: np.ndarray, Tinv: np.ndarray, size: int, device=None) -> torch.Tensor:
    """skimage ``warp(frame / 255, T.inverse, output_shape=(size, size))`` (order 1, constant 0), clipped
    to [0, 1]: [3, size, size] float64 on `device` (default the CPU).

    T is a similarity without rotation (`similarity_crop`), so each output row samples one source
    row pair and each output column one source column pair: the bilinear weights separate, and the
    crop is four gathers of 8-bit pixels and a few float64 element-wise operations (on the GPU when
    asked: the same IEEE operations) instead of a per-pixel ``ndimage.map_coordinates`` (same values
    up to float64 rounding)."""
    if Tinv[0, 1] != 0 or Tinv[1, 0] != 0:
        raise ValueError("the DECA crop transform must be axis-aligned (scale and translation)")
    h, w = frame.shape[:2]
    idx = np.arange(size, dtype=np.float64)
    y0, wy0, wy1 = _linear_taps(Tinv[1, 1] * idx + Tinv[1, 2], h)
    x0, wx0, wx1 = _linear_taps(Tinv[0, 0] * idx + Tinv[0, 2], w)
    taps = torch.from_numpy(np.stack([np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1),
                                      np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)])).to(device)
    weights = torch.from_numpy(np.stack([wy0, wy1, wx0, wx1])).to(device)
    ys0, ys1, xs0, xs1 = taps
    wy0, wy1 = weights[0][:, None, None], weights[1][:, None, None]
    wx0, wx1 = weights[2][None, :, None], weights[3][None, :, None]
    img = torch.from_numpy(frame if frame.flags.writeable else frame.copy()).to(device)
    top, bottom = img[ys0], img[ys1]  # gather the 8-bit pixels first, then convert only those
    px = lambda rows, xs: rows[:, xs].double() / 255.0  # noqa: E731
    out = ((px(top, xs0) * wx0 + px(top, xs1) * wx1) * wy0
           + (px(bottom, xs0) * wx0 + px(bottom, xs1) * wx1) * wy1)
    return out.clamp(0.0, 1.0).permute(2, 0, 1)
