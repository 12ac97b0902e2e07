"""Several people in one image: one hint and one identity context per person (the official two-person mode,
generalised). Shared by the denoiser module and every engine."""
from __future__ import annotations

import math
from typing import Sequence

import torch

MAX_PEOPLE = 4   # people in one image: each adds a CapFace pass per step


def as_people(hint: torch.Tensor | Sequence[torch.Tensor], identity_context: torch.Tensor | Sequence[torch.Tensor]
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(hints, identity contexts), one per person: a tensor is one person, a list or tuple one entry per person."""
    hints = [hint] if isinstance(hint, torch.Tensor) else list(hint)
    contexts = [identity_context] if isinstance(identity_context, torch.Tensor) else list(identity_context)
    if len(hints) != len(contexts):
        raise ValueError(f"one hint and one identity context per person: got {len(hints)} hints and "
                         f"{len(contexts)} identity contexts")
    if not 1 <= len(hints) <= MAX_PEOPLE:
        raise ValueError(f"1 to {MAX_PEOPLE} people per image, got {len(hints)}")
    return hints, contexts


def check_person_strength(person_strength: Sequence[float] | None, people: int) -> list[float]:
    """One finite scale per person (default 1.0 each)."""
    if person_strength is None:
        return [1.0] * people
    scales = [float(s) for s in person_strength]
    if len(scales) != people or not all(math.isfinite(s) for s in scales):
        raise ValueError(f"person_strength needs one finite scale per person ({people}), got {list(person_strength)}")
    return scales


class PeopleFields:
    """The people of a dataclass with `hint`, `identity_context` and `person_strength` fields (one tensor
    each for one person, lists for several): the one reading of them for the engines' `Conditioning` and
    the pipeline's `GenerationRequest`."""

    @property
    def people(self) -> int:
        return len(self.hints)

    @property
    def hints(self) -> list[torch.Tensor]:
        return as_people(self.hint, self.identity_context)[0]

    @property
    def contexts(self) -> list[torch.Tensor]:
        return as_people(self.hint, self.identity_context)[1]

    @property
    def person_scales(self) -> list[float]:
        return check_person_strength(self.person_strength, self.people)
