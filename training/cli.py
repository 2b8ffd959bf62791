"""The ``flexmoe`` command (subcommands registered by training and the demo)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexmoe", description="FlexOlmo training, merging, demo and inference")
    p.add_subparsers(dest="command", required=True)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
