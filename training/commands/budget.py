"""The training budget flags of the baselines (``train-dense``, ``train-moe``): ``--tokens`` and
``--match-flops-of`` set ``--steps``."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["BUDGET_HELP", "add_budget_args", "steps_for_budget", "world_size"]

BUDGET_HELP = ("--tokens N trains on N tokens; --match-flops-of RUN [RUN ...] sets the steps so the training "
               "FLOPs equal the sum of total_flops in those runs' run.json (e.g. the public run, every owner "
               "run and the router tuning). Both override --steps.")


def add_budget_args(p) -> None:
    """Add ``--tokens`` and ``--match-flops-of``."""
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--match-flops-of", nargs="+", default=None)


def world_size() -> int:
    """The launcher's ``WORLD_SIZE`` (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _total_flops(runs) -> float:
    total = 0.0
    for d in runs:
        p = Path(d) / "run.json" if Path(d).is_dir() else Path(d)
        if not p.is_file():
            raise FileNotFoundError(f"--match-flops-of {d!r}: no run.json")
        run = json.loads(p.read_text())
        if not run.get("total_flops"):
            raise ValueError(f"--match-flops-of {d!r}: run.json has no total_flops (not a finished training run)")
        total += float(run["total_flops"])
    return total


def steps_for_budget(args, flops_per_token: float, world_hint: int) -> None:
    """Set ``args.steps`` from --tokens or --match-flops-of (sum of total_flops in run.json files)
    and ``args.budget`` (recorded in run.json; None when neither flag is given)."""
    tokens_per_step = args.micro_batch_size * args.grad_accum * world_hint * args.seq_len
    if getattr(args, "tokens", None):
        args.steps = max(1, math.ceil(args.tokens / tokens_per_step))
        args.budget = {"tokens": args.tokens}
    elif getattr(args, "match_flops_of", None):
        total = _total_flops(args.match_flops_of)
        args.steps = max(1, math.ceil(total / (flops_per_token * tokens_per_step)))
        args.budget = {"match_flops_of": [str(Path(x).resolve()) for x in args.match_flops_of], "flops": total}
    else:
        args.budget = None
