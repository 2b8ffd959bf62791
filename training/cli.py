"""The ``flexmoe`` command.

Each module in ``COMMAND_MODULES`` defines ``register(subparsers)`` that adds its subcommands
and sets ``func`` on each (``func(args) -> int``). Training owns ``commands``; the demo and
inference commands live in ``demo``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ["flexmoe_training.commands", "flexmoe_training.demo.commands"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexmoe",
        description="FlexOlmo: data-local expert training, merging, opt-out inference and the demo.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
