"""`caphuman`: the command-line entry point. Each subcommand lives in its own module with a
`register(subparsers)` function that adds its parser and sets `func`."""
from __future__ import annotations

import argparse
import importlib
import logging
import pickle
import sys

from caphuman.export.extras import MissingExtra

# Subcommand modules, in the order `caphuman --help` lists them.
SUBCOMMANDS = [
    "caphuman.runtime.generate_cli",
    "caphuman.runtime.condition_cli",
    "caphuman.runtime.export_cli",
    "caphuman.runtime.serve_cli",
    "caphuman.runtime.client_cli",
]


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' only where there is a default to show and the help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default not in ("", argparse.SUPPRESS)
        if "default" in text or not shown or not action.option_strings:
            return text
        return super()._get_help_string(action)


class StoreOnce(argparse.Action):
    """An option given at most once: a repeat is an error, not the last value silently winning."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice; it describes one person (several people: one --person "
                         "each, see --help)")
        setattr(namespace, self.dest, values)


def add_sampling_arguments(group) -> None:
    """--sampler, --steps, --guidance, --eta, --strength, --tau: the same options for generate and client."""
    from caphuman.engines.catalog import DEFAULT_SAMPLER, SAMPLER_DOCS

    from . import limits
    group.add_argument("--sampler", choices=sorted(SAMPLER_DOCS), default=DEFAULT_SAMPLER,
                       help="; ".join(f"{name}: {doc}" for name, doc in sorted(SAMPLER_DOCS.items())))
    group.add_argument("--steps", type=int, default=20,
                       help=f"denoising steps, {limits.STEPS_RULE} (official DDIM: 20)")
    group.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale")
    group.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    group.add_argument("--strength", type=float, default=1.0, help="CapFace residual scale")
    group.add_argument("--tau", type=float, default=0.0,
                       help="ID dropout: identity context off for timesteps > tau (0 = off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caphuman",
        description="CapHuman-RT: photos of one person from one reference face photo, a prompt and a head "
                    "condition (Stable Diffusion 1.5 + CapFace).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, MissingExtra, ValueError, FileNotFoundError, FileExistsError, pickle.UnpicklingError) as e:
        print(f"caphuman {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m caphuman.runtime.cli`: run the imported module's main, so that the commands' errors
    # (raised as caphuman.runtime.cli.UserError) are this main's, not a second copy's in __main__
    from caphuman.runtime.cli import main as package_main
    sys.exit(package_main())
