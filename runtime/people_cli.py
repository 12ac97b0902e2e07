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
        raise ValueError(f"--person {key}={text}: expected comma-separated numbers") from None
    if count is not None and len(values) != count:
        raise ValueError(f"--person {key}={text}: expected {count} numbers")
    return values


def parse_person(words: list[str], index: int):
    """A `Person` from one --person's KEY=VALUE words (ValueError naming the word that is wrong)."""
    from caphuman.runtime.condition import HeadControls
    from caphuman.runtime.condition.people import Person

    fields: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in PERSON_KEYS:
            raise ValueError(f"--person {index}: '{word}' is not KEY=VALUE with KEY one of {', '.join(PERSON_KEYS)}")
        if key in fields:
            raise ValueError(f"--person {index}: {key} given twice")
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
    try:
        person_controls = HeadControls(**controls)
    except ValueError as e:
        raise ValueError(f"--person {index}: {e}") from None
    strength = _numbers("strength", fields["strength"], 1)[0] if "strength" in fields else 1.0
    return Person(reference=fields.get("reference"), pose=fields.get("pose"),
                  modes=fields.get("modes", "position,pose"), controls=person_controls, strength=strength)


def people_from_args(args: argparse.Namespace) -> list:
    """The parsed --person options (checked: count, no single-person options beside them)."""
    from caphuman.runtime.condition.people import check_people_count
    given = [flag for dest, flag in SINGLE_PERSON_OPTIONS if getattr(args, dest, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} describe one person; with --person, give them inside each --person "
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
    except (NoFaceError, PhotoError, LayoutError) as e:
        raise UserError(str(e)) from None
