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


def build_parser() -> argparse.ArgumentParser:
    """The ``flexmoe`` argument parser with every subcommand."""
    p = argparse.ArgumentParser(
        prog="flexmoe",
        description="FlexOlmo: data-local expert training, merging, opt-out inference and the demo.",
    )
    p.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(sub)
    return p


def main(argv=None) -> int:
    """Run ``flexmoe ARGV``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
