"""Conditions from photos: face detection and crops, identity context, and the 9-channel head hint.

See docs/conditions.md. Entry points: `ConditionBuilder` (photos + controls -> `HeadCondition`),
`identity.identity_context`, `faces.FaceAnalyzer`.
"""
from .builder import ConditionBuilder
from .codes import MODES, HeadCode, mix_codes, parse_modes
from .controls import LIGHT_PRESETS, HeadControls
from .faces import FaceAnalyzer, NoFaceError, Photo
from .hint import HeadCondition, build_head_condition
from .images import MAX_BYTES, MAX_PIXELS, PhotoError, load_photo

__all__ = ["ConditionBuilder", "MODES", "HeadCode", "mix_codes", "parse_modes", "LIGHT_PRESETS", "HeadControls",
           "FaceAnalyzer", "NoFaceError", "Photo", "HeadCondition", "build_head_condition", "MAX_BYTES",
           "MAX_PIXELS", "PhotoError", "load_photo"]
