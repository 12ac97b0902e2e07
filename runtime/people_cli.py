"""`--person`: several people in one image, for `caphuman generate` and `caphuman condition`.

    caphuman generate --prompt "two friends at the beach" \\
        --person reference=anna.jpg center=0.3,0.5 --person reference=ben.jpg center=0.7,0.5 yaw=-20

Each `--person` takes KEY=VALUE words: reference, pose, modes (comma-separated, as --modes), yaw, pitch,
roll, jaw, expression (comma-separated), center (X,Y in [0, 1]), scale, light (a preset or 27 values),
strength (this person's CapFace scale). The options that follow one `--person` until the next option
belong to it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

PERSON_KEYS = ("reference", "pose", "modes", "yaw", "pitch", "roll", "jaw", "expression", "center", "scale", "light",
               "strength")
PERSON_HELP = ("one person of a several-people image, as KEY=VALUE words: reference=PHOTO pose=PHOTO modes=position,pose "
               "yaw= pitch= roll= jaw= expression=C1,C2,.. center=X,Y scale= light= strength=; repeat --person for "
               "each person (up to 4; instead of --reference/--pose and the head controls)")
# the single-person options that --person replaces: (dest, flag)
SINGLE_PERSON_OPTIONS = (("reference", "--reference"), ("pose", "--pose"), ("yaw", "--yaw"), ("pitch", "--pitch"),
                         ("roll", "--roll"), ("jaw", "--jaw"), ("expression", "--expression"), ("scale", "--scale"),
                         ("center", "--center"), ("light", "--light"))


def add_person_argument(p) -> None:
    p.add_argument("--person", nargs="+", action="append", metavar="KEY=VALUE", help=PERSON_HELP)


def _numbers(key: str, text: str, count: int | None = None) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{key}={text}: expected comma-separated numbers") from None
    if count is not None and len(values) != count:
        raise ValueError(f"{key}={text}: expected {count} number{'s' if count > 1 else ''}")
    return values


def parse_person(words: list[str], index: int):
    """A `Person` from one --person's KEY=VALUE words (ValueError naming the person and the word that is wrong)."""
    try:
        return _parse_person(words)
    except ValueError as e:
        raise ValueError(f"--person {index}: {e}") from None


def _parse_person(words: list[str]):
    from caphuman.runtime.condition import HeadControls
    from caphuman.runtime.condition.people import Person

    fields: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in PERSON_KEYS:
            raise ValueError(f"'{word}' is not KEY=VALUE with KEY one of {', '.join(PERSON_KEYS)}")
        if key in fields:
            raise ValueError(f"{key} given twice")
        fields[key] = value
    controls = {}
    for key in ("yaw", "pitch", "roll", "jaw", "scale"):
        if key in fields:
            controls[key] = _numbers(key, fields[key], 1)[0]
    if "expression" in fields:
        controls["expression"] = _numbers("expression", fields["expression"])
    if "center" in fields:
        controls["center"] = _numbers("center", fields["center"], 2)
    if "light" in fields:
        light = fields["light"]
        controls["light"] = _numbers("light", light) if "," in light else light
    person_controls = HeadControls(**controls)
    strength = _numbers("strength", fields["strength"], 1)[0] if "strength" in fields else 1.0
    return Person(reference=fields.get("reference"), pose=fields.get("pose"),
                  modes=fields.get("modes", "position,pose"), controls=person_controls, strength=strength)


def people_from_args(args: argparse.Namespace, single_options=SINGLE_PERSON_OPTIONS) -> list:
    """The parsed --person options (checked: count, no single-person options beside them)."""
    from caphuman.runtime.condition.people import check_people_count
    given = [flag for dest, flag in single_options if getattr(args, dest, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for one person; with --person, give them inside each --person "
                         "(e.g. --person reference=me.jpg yaw=20)")
    people = [parse_person(words, i + 1) for i, words in enumerate(args.person)]
    check_people_count(len(people))
    return people


def build_people_conditions(args: argparse.Namespace, people: list, size: int = 512):
    """Each person's `PersonCondition`, from the weights the options name (DECA, FLAME), layout checked."""
    from caphuman.runtime.cli import UserError
    from caphuman.runtime.condition import ConditionBuilder, NoFaceError, PhotoError
    from caphuman.runtime.condition.people import LayoutError, build_people
    builder = ConditionBuilder(args.deca_model, args.flame_model, args.flame_texture)
    try:
        return build_people(builder, people, size=size, allow_no_face=args.allow_no_face)
    except NoFaceError as e:
        raise UserError(f"{e}: allow it with --allow-no-face (the whole photo then stands for the face)") from None
    except (PhotoError, LayoutError) as e:
        raise UserError(str(e)) from None


def request_people(args: argparse.Namespace) -> dict:
    """`caphuman client --person ...`: the request fields of several people (reference photos, their pose
    photos, PEOPLE, MODES; one --person: the one-person request). The server takes one MODES and one LIGHT
    for everyone."""
    from caphuman.runtime.cli import UserError
    try:
        people = people_from_args(args, [o for o in SINGLE_PERSON_OPTIONS if o[0] != "light"])
    except ValueError as e:
        raise UserError(str(e)) from None
    if any(p.reference is None for p in people):
        raise UserError("every --person needs reference=PHOTO (their identity)")
    with_pose = [p.pose is not None for p in people]
    if any(with_pose) and not all(with_pose):
        raise UserError("give pose= to every --person or to none (the server takes one pose photo per person)")
    if len({p.modes for p in people}) > 1:
        raise UserError("modes= must be the same for every --person (the server takes one MODES)")
    if any(p.controls.light is not None for p in people):
        raise UserError("light= is one for everyone on the server: use --light")
    entries = []
    for p in people:
        controls = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(p.controls).items()
                    if v is not None and k != "light"}
        entries.append({**controls, "strength": p.strength})
    if len(people) == 1:  # one person is the one-person request (HEAD_CONTROLS), its strength folded in
        strength = entries[0].pop("strength")
        return {"reference": Path(people[0].reference),
                "pose_image": [Path(people[0].pose)] if people[0].pose else None,
                "head_controls": entries[0] or None, "modes": people[0].modes, "strength": args.strength * strength}
    return {"reference": [Path(p.reference) for p in people],
            "pose_image": [Path(p.pose) for p in people] if all(with_pose) else None,
            "people": entries, "modes": people[0].modes}
