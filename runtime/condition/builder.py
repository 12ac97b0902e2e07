"""`ConditionBuilder`: photos + modes + controls -> `HeadCondition`, with whatever weights are available.

* DECA weights (``deca_model.tar``) given: both photos are encoded (E_flame on the DECA crop) and
  mixed by the official modes; otherwise codes are neutral (zero shape/expression/pose, the
  default light) and only the position comes from a photo (landmark fit), with a note.
* FLAME model (``generic_model.pkl``) given: FLAME vertices and DECA's camera (the official path);
  otherwise the rigid template head.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from caphuman.export.face.deca_encoder import DecaEncoder, decompose_code, load_deca_encoder

from .codes import HeadCode, parse_modes
from .controls import DEFAULT_LIGHT, HeadControls, light_sh
from .faces import FaceAnalyzer, NoFaceError, Photo
from .head import HeadModel, load_head_model
from .hint import HeadCondition, build_head_condition

log = logging.getLogger(__name__)


class ConditionBuilder:
    def __init__(self, deca_model: str | Path | None = None, flame_model: str | Path | None = None,
                 flame_texture: str | Path | None = None, analyzer: FaceAnalyzer | None = None):
        self.analyzer = analyzer or FaceAnalyzer()
        self.deca: DecaEncoder | None = load_deca_encoder(deca_model) if deca_model else None
        self.head: HeadModel = load_head_model(flame_model, flame_texture)
        # Encode the reference and pose crops in one DECA batch (one pass, one copy back); the
        # official code encodes them one at a time: the same function per image, float rounding apart.
        self.batch_photos = True

    def code_of(self, photo: Photo) -> HeadCode:
        return self.codes_of([photo])[0]

    def codes_of(self, photos: list[Photo]) -> list[HeadCode]:
        """DECA codes of photos (neutral codes without DECA weights)."""
        if self.deca is None:
            return [HeadCode.neutral(light_sh(DEFAULT_LIGHT)) for _ in photos]
        p = next(self.deca.parameters())
        crops = [self.analyzer.deca_crop(ph, device=p.device) for ph in photos]
        with torch.no_grad():
            x = torch.stack([c.image for c in crops]).to(p.dtype)
            raw = self.deca(x).float().cpu()
        return [HeadCode.from_deca(decompose_code(raw[i:i + 1]), c.tform_rows) for i, c in enumerate(crops)]

    def build(self, reference: str | Path | Photo, pose: str | Path | Photo | None = None,
              modes: str | tuple[str, ...] = "position,pose", controls: HeadControls | None = None,
              allow_no_face: bool = False, renderer=None) -> tuple[HeadCondition, Photo, Photo | None]:
        """The hint for a reference photo, an optional pose photo, modes and explicit controls.

        A photo without a face raises NoFaceError naming it, unless `allow_no_face` (the official
        fallback: DECA crops the whole image; without DECA the head is centred).
        """
        modes_t = parse_modes(modes)
        ref = reference if isinstance(reference, Photo) else self.analyzer.analyze(reference)
        pph = None if pose is None else (pose if isinstance(pose, Photo) else self.analyzer.analyze(pose))
        for ph in (ref, pph):
            if ph is not None and ph.frame_detection is None and not allow_no_face:
                raise NoFaceError(f"no face found in {ph.path} (MTCNN); use a photo with a visible face, "
                                  "or allow the official whole-image fallback")
        if pph is not None and self.batch_photos:
            ref_code, pose_code = self.codes_of([ref, pph])
        else:
            ref_code = self.code_of(ref)
            pose_code = self.code_of(pph) if pph is not None else None
        position_photo = pph if (pph is not None and ("position" in modes_t or "all" in modes_t)) else ref
        five = position_photo.frame_detection.landmarks if position_photo.frame_detection is not None else None
        kw = {"renderer": renderer} if renderer is not None else {}
        cond = build_head_condition(self.head, ref_code, pose_code, modes_t, controls, five, **kw)
        cond.reference_code, cond.pose_code = ref_code, pose_code
        if self.deca is None:
            cond.notes.append("no DECA weights: shape, expression, pose and light are neutral unless set explicitly")
        return cond, ref, pph
