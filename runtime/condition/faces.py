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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from export.face.mtcnn import MTCNN, Detection

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
    image: torch.Tensor        # [3, 224, 224] float32 in [0, 1]
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

    def __init__(self, mtcnn: MTCNN | None = None):
        self.mtcnn = mtcnn or MTCNN()

    def analyze(self, path: str | Path) -> Photo:
        path = Path(path)
        image = load_photo(path)
        arr = np.asarray(image)
        frame = resize_like_deca(arr, DECA_FRAME)
        det = self.mtcnn.detect(arr)
        fdet = self.mtcnn.detect(frame)
        return Photo(path, image, frame, det[0] if det else None, fdet[0] if fdet else None)

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
    def deca_crop(cls, photo: Photo) -> DecaCrop:
        old_size, center, source = cls.deca_box(photo)
        size = int(old_size * DECA_SCALE)
        if size < 1:
            raise PhotoError(f"face box in {photo.path} is degenerate (size {size})")
        T = similarity_crop((float(center[0]), float(center[1])), size)
        Tinv = np.linalg.inv(T)
        rows, cols = np.mgrid[0:CROP_SIZE, 0:CROP_SIZE].astype(np.float64)
        src_x = Tinv[0, 0] * cols + Tinv[0, 1] * rows + Tinv[0, 2]
        src_y = Tinv[1, 0] * cols + Tinv[1, 1] * rows + Tinv[1, 2]
        img = photo.frame.astype(np.float64) / 255.0
        out = np.stack([ndimage.map_coordinates(img[..., c], [src_y, src_x], order=1, mode="grid-constant", cval=0.0)
                        for c in range(3)])
        out = np.clip(out, 0.0, 1.0)
        return DecaCrop(torch.from_numpy(out.astype(np.float32)), T, tform_rows_from_T(T), source)
