"""``flexmoe demo``: the whole FlexOlmo recipe on real text on this machine (:mod:`flexmoe_training.demo`)."""
from __future__ import annotations

import os
import sys

from .common import TORCH_DTYPE_NAMES, DefaultsOnceFormatter, add_dtype_arg, add_name_list


def _size_defaults(name: str) -> str:
    """``"(default: X; --quick Y, --scale Z)"`` for a setting, read from the demo's sizes (never restated here)."""
    from ..demo.pipeline import SIZES, DemoSettings

    base = getattr(DemoSettings(), name)
    other = [f"--{size} {SIZES[size][name]}" for size in ("quick", "scale")
             if name in SIZES[size] and SIZES[size][name] != base]
    return f"(default: {base}" + (f"; {', '.join(other)})" if other else ")")


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    from ..demo.pipeline import estimate

    p = sub.add_parser(
        "demo",
        help="end-to-end FlexOlmo run on real text on this machine: data-local training, merge, opt-out, report",
        description=(
            "Builds a public corpus and N closed owner domains from text already on this machine, trains the "
            "public model, each owner's expert in its own process on only its own data, merges them, then "
            "evaluates per-domain held-out loss (opt-out, top-k, BTM and joint-MoE baselines of equal training "
            "FLOPs), audits training-data extraction and prints a report with the claims this run supports. "
            f"Wall time on an idle 2-core CPU: {estimate('default')} (--quick: {estimate('quick')}); --scale is for "
            "a GPU."),
        formatter_class=DefaultsOnceFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help=f"tiny model and data: the CI smoke test, {estimate('quick')} on an idle 2-core CPU")
    size.add_argument("--scale", action="store_true",
                      help="GPU size: bigger model, more data and steps, bf16, fast MoE kernels (moe_backend auto)")
    size.add_argument("--scale-study", action="store_true",
                      help="the demo at about 1x, 2x (the default) and 4x the parameters (data and steps scaled): how "
                           "merged - BTM, merged - joint MoE and merged - oracle move with size; writes "
                           "WORK_DIR/scale_study.{md,json,png} (81 minutes measured on a 2-core CPU, partly loaded)")
    p.add_argument("--work-dir", default=os.path.join("runs", "demo"),
                   help="where corpora, data, checkpoints and the report go (reused between runs)")
    p.add_argument("--fresh", action="store_true", help="re-run every stage instead of reusing finished ones")
    add_name_list(p, "--owners", "owner domains (default: the first N available of code,man,licenses,pydoc,"
                  "changelogs,c_headers)", metavar="A,B,C")
    p.add_argument("--public", default=None, help="public corpus source (default: web, the broad mix of prose and "
                   "every kind of text from files no owner reads; else readmes, pydoc, changelogs)")
    p.add_argument("--num-owners", type=int, default=None, metavar="N",
                   help="number of owner domains " + _size_defaults("num_owners"))
    p.add_argument("--public-steps", type=int, default=None, metavar="STEPS",
                   help="training steps of the public model " + _size_defaults("public_steps"))
    p.add_argument("--expert-steps", type=int, default=None, metavar="STEPS",
                   help="training steps of each owner's expert " + _size_defaults("expert_steps"))
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="active experts of the merged model (default: N, the number of owners)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda " + _size_defaults("device"))
    add_dtype_arg(p, extra=(), default=None, help="training and evaluation dtype " + _size_defaults("dtype"))
    p.add_argument("--moe-backend", default=None,
                   help="FlexMoE backend: auto, torch, triton, cuda " + _size_defaults("moe_backend"))
    p.add_argument("--no-baselines", action="store_true", help="skip the BTM and joint-MoE baselines")
    p.add_argument("--router-embedder", default=None, choices=["minilm", "hidden"],
                   help="router init: all-MiniLM-L6-v2 document embeddings (projected to the model width), or the "
                        "public model's hidden states (the paper's weaker ablation) " + _size_defaults("router_embedder"))
    p.add_argument("--tokenizer", default=None, choices=["byte", "bpe"],
                   help="byte level, or a small byte-level BPE trained on the public corpus "
                        + _size_defaults("tokenizer"))
    p.add_argument("--no-router-tuning", action="store_true",
                   help="skip the owners' proxy selection and router tuning (the merged model is the merge's output)")
    p.add_argument("--tune-steps", type=int, default=None, metavar="STEPS",
                   help="router-tuning steps " + _size_defaults("tune_steps"))
    p.add_argument("--bias-init", type=float, default=None, metavar="B",
                   help="initial negative bias of each owner's expert " + _size_defaults("bias_init"))
    p.add_argument("--audit-docs", type=int, default=None, metavar="N",
                   help="training documents audited per owner " + _size_defaults("audit_docs"))
    p.add_argument("--audit-gen", type=int, default=None, metavar="TOKENS",
                   help="greedy tokens generated per audited document " + _size_defaults("audit_gen"))
    p.add_argument("--seed", type=int, default=None, help="seed of the corpora split and the training " +
                   _size_defaults("seed"))
    p.add_argument("--jobs", type=int, default=0,
                   help="training processes at the same time (owners train independently) (default: 0 = the number of "
                        "CPU cores, at most 4)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (default: 0 = cores // jobs)")
    p.add_argument("--verbose", action="store_true", help="show the training processes' own output (with --jobs 1)")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args) -> int:
    from ..demo.pipeline import StageError, run_demo

    size = "quick" if args.quick else ("scale" if args.scale else "default")
    try:
        settings = _settings(args, size)
    except (ValueError, TypeError) as e:
        print(f"flexmoe demo: {e}", file=sys.stderr)
        return 2
    try:
        if args.scale_study:
            from ..demo.scale_study import run_study

            run_study(args.work_dir, ["1x", "2x", "4x"],
                      lambda point, over: run_demo(_settings(args, "default", **over), args.work_dir, fresh=args.fresh,
                                                   echo_children=args.verbose, jobs=args.jobs, threads=args.threads))
        else:
            run_demo(settings, args.work_dir, fresh=args.fresh, echo_children=args.verbose, jobs=args.jobs,
                     threads=args.threads)
    except StageError as e:
        print(f"\nflexmoe demo: a stage failed: {e}", file=sys.stderr)
        return 1
    return 0


def _settings(args, size: str, **point):
    """The demo's settings for ``size`` from the command line, with a scale-study ``point``'s
    overrides (a flag given on the command line wins)."""
    from ..demo.pipeline import settings_for

    flags = dict(
        owners=args.owners, public=args.public, num_owners=args.num_owners or (len(args.owners) if args.owners else None),
        public_steps=args.public_steps, expert_steps=args.expert_steps, top_k=args.top_k, device=args.device,
        dtype=TORCH_DTYPE_NAMES[args.dtype] if args.dtype else None, moe_backend=args.moe_backend,
        audit_docs=args.audit_docs, audit_gen=args.audit_gen, seed=args.seed,
        baselines=False if args.no_baselines else None, router_embedder=args.router_embedder,
        router_tuning=False if args.no_router_tuning else None, tune_steps=args.tune_steps,
        bias_init=args.bias_init, tokenizer=args.tokenizer)
    return settings_for(size, **dict(point, **{k: v for k, v in flags.items() if v is not None}))
