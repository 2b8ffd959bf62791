"""``flexmoe demo``: the whole FlexOlmo recipe on real text on this machine (:mod:`flexmoe_training.demo`)."""
from __future__ import annotations

import argparse
import os
import sys

from .common import csv_list


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "demo",
        help="end-to-end FlexOlmo run on real text on this machine: data-local training, merge, opt-out, report",
        description=(
            "Builds a public corpus and N closed owner domains from text already on this machine, trains the "
            "public model, each owner's expert in its own process on only its own data, merges them, then "
            "evaluates per-domain held-out loss (opt-out, top-k, BTM and joint-MoE baselines of equal training "
            "FLOPs), audits training-data extraction and prints a report with the claims this run supports. "
            "Sizes: default ~15 min on a 2-core CPU, --quick ~3 min, --scale for a GPU."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model and data (CI smoke test, ~3 min on CPU)")
    size.add_argument("--scale", action="store_true",
                      help="GPU size: bigger model, more data and steps, bf16, fast MoE kernels (moe_backend auto)")
    p.add_argument("--work-dir", default=os.path.join("runs", "demo"),
                   help="where corpora, data, checkpoints and the report go (reused between runs)")
    p.add_argument("--fresh", action="store_true", help="re-run every stage instead of reusing finished ones")
    p.add_argument("--owners", type=csv_list, default=None, metavar="A,B,C",
                   help="owner domains (default: the first N available of code,man,licenses,pydoc,changelogs,c_headers)")
    p.add_argument("--public", default=None, help="public corpus source (default: readmes, else pydoc, changelogs)")
    p.add_argument("--num-owners", type=int, default=None, help="number of owner domains (default 3; 4 with --scale)")
    p.add_argument("--public-steps", type=int, default=None, help="training steps of the public model")
    p.add_argument("--expert-steps", type=int, default=None, help="training steps of each owner's expert")
    p.add_argument("--top-k", type=int, default=None, help="active experts of the merged model (default N)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--moe-backend", default=None, help="FlexMoE backend: auto, torch, triton, cuda")
    p.add_argument("--no-baselines", action="store_true", help="skip the BTM and joint-MoE baselines")
    p.add_argument("--audit-docs", type=int, default=None, help="training documents audited per owner")
    p.add_argument("--audit-gen", type=int, default=None, help="greedy tokens generated per audited document")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--jobs", type=int, default=0,
                   help="training processes at the same time (owners train independently); 0 = CPU cores, at most 4")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process; 0 = cores // jobs")
    p.add_argument("--verbose", action="store_true", help="show the training processes' own output (with --jobs 1)")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args) -> int:
    from ..demo.pipeline import StageError, run_demo, settings_for

    size = "quick" if args.quick else ("scale" if args.scale else "default")
    try:
        settings = settings_for(
            size, owners=args.owners, public=args.public, num_owners=args.num_owners or (len(args.owners) if args.owners else None),
            public_steps=args.public_steps, expert_steps=args.expert_steps, top_k=args.top_k, device=args.device,
            dtype=args.dtype, moe_backend=args.moe_backend, audit_docs=args.audit_docs, audit_gen=args.audit_gen,
            seed=args.seed, baselines=False if args.no_baselines else None)
    except (ValueError, TypeError) as e:
        print(f"flexmoe demo: {e}", file=sys.stderr)
        return 2
    try:
        run_demo(settings, args.work_dir, fresh=args.fresh, echo_children=args.verbose, jobs=args.jobs,
                 threads=args.threads)
    except StageError as e:
        print(f"\nflexmoe demo: a stage failed: {e}", file=sys.stderr)
        return 1
    return 0
