"""Training subcommands (train-public, train-expert, init-router, merge, tune-router, baselines)."""


def register(sub) -> None:
    """Add the training subcommands to ``sub`` (an argparse subparsers object)."""
