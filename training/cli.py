"""The ``flexmoe`` command.

The subcommands live in :mod:`flexmoe_training.commands`, one module each; every module's
``register(subparsers)`` adds its parser and flags and sets ``func`` (``func(args) -> int``).
"""
from __future__ import annotations

import argparse
import sys

from flexmoe_training import commands


class _VersionAction(argparse.Action):
    """``--version``: ``flexmoe X.Y.Z`` (``flexmoe_kernels.__version__``), imported only when asked
    (importing the kernels imports torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        import flexmoe_kernels

        print(f"{parser.prog} {flexmoe_kernels.__version__}")
        parser.exit()


LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    """The ``flexmoe`` argument parser with every subcommand."""
    p = argparse.ArgumentParser(
        prog="flexmoe",
        description="FlexOlmo: data-local expert training, merging, opt-out inference and the demo.",
    )
    p.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(sub)
    for sp in sub.choices.values():
        if any("--log-level" in a.option_strings for a in sp._actions):
            continue  # a command with its own --log-level keeps it
        sp.add_argument("--log-level", default="warning", type=str.lower, choices=LOG_LEVELS,
                        help="Python logging level of flexmoe_training and DeepSpeed (default warning; "
                             "info: a line per logged step)")
    p._flexmoe_sub = sub
    return p


def _configure_logging(level: str) -> None:
    import logging

    lvl = getattr(logging, level.upper())
    logging.basicConfig(level=lvl, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("flexmoe_training", "flexmoe", "DeepSpeed"):
        logging.getLogger(name).setLevel(lvl)


def parse_args(argv) -> argparse.Namespace:
    """``flexmoe ARGV`` parsed, with ``--recipe FILE``'s section for the command as the defaults
    (command-line flags win). ``ValueError`` naming the recipe, section and key for a bad recipe;
    argparse's ``SystemExit`` for bad flags."""
    from flexmoe_training.commands import common

    argv = [str(a) for a in argv]
    parser = build_parser()
    recipe = common.recipe_in_argv(argv)
    if recipe is not None:
        command = next((a for a in argv if a in parser._flexmoe_sub.choices), None)
        sp = parser._flexmoe_sub.choices.get(command)
        if sp is not None and any(a.dest == "recipe" for a in sp._actions):
            common.apply_recipe(sp, command, recipe)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run ``flexmoe ARGV``; returns the exit status."""
    from flexmoe_training.commands import common

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        return common.main_error(exc)
    _configure_logging(getattr(args, "log_level", "warning"))
    return int(args.func(args) or 0)

if __name__ == "__main__":
    sys.exit(main())
