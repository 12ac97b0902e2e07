"""Several people in one image: each person's head hint in the shared frame, and the layout checks.

Each person is what one-person generation takes: a reference photo, an optional pose photo with its modes,
and explicit head controls; the hint of each is built exactly as for one person (the official two-person
mode builds each person's condition alone). People without a photo giving their position and without
`center` are spread across the frame, left to right.

A layout is refused when a person's head is mostly outside the frame, or when the other heads cover it so
much that its head mask would hide it (the residuals of overlapping masks add up, and a covered person
would not appear as themselves).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from caphuman.export.people import MAX_PEOPLE

from .codes import HeadCode
from .controls import DEFAULT_LIGHT, HeadControls, light_sh
from .faces import Photo
from .hint import DEFAULT_SCALE, HINT_SIZE, HeadCondition, build_head_condition

MIN_IN_FRAME = 0.5        # least fraction of a head's vertices inside the frame
MAX_COVERED = 0.8         # most fraction of a head's silhouette the other heads may cover


class LayoutError(ValueError):
    """The people's heads do not make a usable layout (off frame, or hidden by another head)."""


@dataclass
class Person:
    """One person's inputs: photos (optional without real weights), modes, head controls, CapFace scale."""
    reference: str | Path | None = None
    pose: str | Path | None = None
    modes: str = "position,pose"
    controls: HeadControls = field(default_factory=HeadControls)
    strength: float = 1.0


@dataclass
class PersonCondition:
    person: Person
    condition: HeadCondition
    reference: Photo | None
    pose: Photo | None


def check_people_count(people: int) -> None:
    if not 1 <= people <= MAX_PEOPLE:
        raise ValueError(f"1 to {MAX_PEOPLE} people per image, got {people}")


def spread_controls(people: list[Person]) -> list[HeadControls]:
    """Each person's controls. With several people, a person placed neither by a photo nor by `center`
    gets its slot left to right, and a person placed by `center` or by its slot is sized to fit beside the
    others unless `scale` is given; a photo's position (the official mode) stands when no `center` is given."""
    if len(people) == 1:
        return [people[0].controls]
    fit = min(DEFAULT_SCALE, 0.9 / (len(people) + 1))
    out = []
    for i, p in enumerate(people):
        c = p.controls
        if c.center is None and p.reference is None:
            c = replace(c, center=((i + 1) / (len(people) + 1), 0.5))
        if c.center is not None and c.scale is None:
            c = replace(c, scale=fit)
        out.append(c)
    return out


def build_people(builder, people: list[Person], *, size: int = HINT_SIZE, allow_no_face: bool = False,
                 renderer=None) -> list[PersonCondition]:
    """Each person's head condition in the shared frame, checked as a layout (`LayoutError`)."""
    check_people_count(len(people))
    out = []
    for person, controls in zip(people, spread_controls(people)):
        if person.reference is not None:
            if size != HINT_SIZE:
                raise ValueError(f"hints from photos are rendered at {HINT_SIZE}x{HINT_SIZE} (the official size)")
            kw = {"renderer": renderer} if renderer is not None else {}
            cond, ref, pose = builder.build(person.reference, person.pose, person.modes, controls,
                                            allow_no_face=allow_no_face, **kw)
        else:
            if person.pose is not None:
                raise ValueError("a pose photo needs the person's reference photo")
            kw = {"renderer": renderer} if renderer is not None else {}
            cond = build_head_condition(builder.head, HeadCode.neutral(light_sh(DEFAULT_LIGHT)), controls=controls,
                                        size=size, **kw)
            ref = pose = None
        out.append(PersonCondition(person, cond, ref, pose))
    if len(out) > 1:
        check_layout([in_frame_fraction(pc.condition) for pc in out], [head_silhouette(pc.condition) for pc in out])
    return out


def head_silhouette(cond: HeadCondition | np.ndarray) -> np.ndarray:
    """[H, W] bool: where the head is drawn (the hint, [9, H, W], is zero off the head)."""
    hint = cond.hint if isinstance(cond, HeadCondition) else cond
    return np.abs(np.asarray(hint)).sum(0) > 0


def in_frame_fraction(cond: HeadCondition) -> float:
    """The fraction of the head's vertices inside the frame."""
    v = np.asarray(cond.verts_ndc)[:, :2]
    return float(np.mean((np.abs(v) <= 1.0).all(axis=1)))


def check_layout(in_frame: list[float], silhouettes: list[np.ndarray]) -> None:
    """LayoutError when a head is mostly off the frame or mostly covered by the other heads; per person,
    the fraction of its head inside the frame and its [H, W] silhouette (`head_silhouette`)."""
    for i, (inside, sil) in enumerate(zip(in_frame, silhouettes)):
        if inside < MIN_IN_FRAME or not sil.any():
            raise LayoutError(f"person {i + 1}'s head is outside the frame ({inside:.0%} of it inside); "
                              "move its center into the frame or make it smaller (center, scale)")
    for i, sil in enumerate(silhouettes):
        others = np.zeros_like(sil)
        for j, other in enumerate(silhouettes):
            if j != i:
                others |= other
        covered = float((sil & others).sum() / sil.sum())
        if covered > MAX_COVERED:
            raise LayoutError(f"person {i + 1}'s head is {covered:.0%} covered by the other heads (at most "
                              f"{MAX_COVERED:.0%}): its mask would hide it; move the heads apart (center, scale)")


PERSON_COLOURS = [(1.0, 0.35, 0.3), (0.3, 0.6, 1.0), (0.35, 0.9, 0.4), (1.0, 0.8, 0.25)]


def people_overlay(frame: np.ndarray, conds: list[HeadCondition], tinted: bool = True) -> np.ndarray:
    """uint8 [H, W, 3]: every head's shading over the frame, each tinted in its person's colour (`tinted`)."""
    out = frame.astype(np.float32) / 255.0
    for i, cond in enumerate(conds):
        sil = head_silhouette(cond)
        shade = np.clip(np.asarray(cond.hint)[6:9].transpose(1, 2, 0), 0, 1)
        if tinted:
            shade = shade * np.asarray(PERSON_COLOURS[i % len(PERSON_COLOURS)], dtype=np.float32)
        out[sil] = 0.45 * out[sil] + 0.55 * shade[sil]
    return (out * 255 + 0.5).astype(np.uint8)
