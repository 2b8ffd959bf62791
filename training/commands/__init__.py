"""The ``flexmoe`` subcommands: one module per subcommand, each with its flags beside its code.

Every module defines ``register(subparsers)``, which adds its parser and flags and sets
``func(args) -> int`` on it. :data:`COMMANDS` lists them in the order ``flexmoe --help`` shows.
Shared flag groups and input checks are in :mod:`.common`; the baselines' budget flags in
:mod:`.budget`. See training/README.md for the recipe.
"""
from __future__ import annotations

import importlib

__all__ = ["COMMANDS", "register"]

COMMANDS = ["prepare_data", "train_public", "init_router", "train_expert", "merge", "tune_router", "train_dense",
            "train_moe", "demo", "generate", "plan", "convert", "serve", "eval"]


def register(sub) -> None:
    """Add every ``flexmoe`` subcommand to ``sub`` (an argparse subparsers object)."""
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
