"""Demo subcommands (demo, generate)."""


def register(sub) -> None:
    """Add the demo subcommands to ``sub``."""
