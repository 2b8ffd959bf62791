"""Demo subcommands: ``flexmoe demo`` (the whole FlexOlmo recipe on real text) and ``flexmoe generate``."""
from __future__ import annotations

import argparse
import os
import sys


def _csv(s: str):
    return [x.strip() for x in s.split(",") if x.strip()]


def register(sub) -> None:
    """Add the demo subcommands to ``sub`` (an argparse subparsers object)."""
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
    p.add_argument("--owners", type=_csv, default=None, metavar="A,B,C",
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

    g = sub.add_parser(
        "generate",
        help="generate text with a chosen set of experts and show which experts served the request",
        description=("Greedy (or sampled) generation from a FlexOlmo checkpoint with experts opted in (--allow) "
                     "or out (--deny); prints the text and how many routing slots each expert served."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json + model.safetensors)")
    who = g.add_mutually_exclusive_group()
    who.add_argument("--allow", type=_csv, default=None, metavar="NAME,...", help="only these experts may be used")
    who.add_argument("--deny", type=_csv, default=None, metavar="NAME,...", help="these experts are opted out")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None, help="active experts per token (default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--stop-at-eos", action="store_true", help="stop at the end-of-document token")
    g.set_defaults(func=run_generate_command)


def run_demo_command(args) -> int:
    from .pipeline import StageError, run_demo, settings_for

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


def run_generate_command(args) -> int:
    import torch

    from flexmoe_kernels.models import FlexOlmoForCausalLM

    from .inference import expert_usage, format_usage, resolve_allow_list
    from .tokenizer import tokenizer_for

    if args.max_new_tokens < 1:
        print(f"flexmoe generate: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = FlexOlmoForCausalLM.from_pretrained(args.model, device=device)
    model.eval()
    names = list(model.expert_names)
    if args.top_k is not None:
        model.set_top_k(args.top_k)
    k = model.config.num_experts_per_tok
    try:
        allowed = resolve_allow_list(names, args.allow, args.deny, k)
    except ValueError as e:
        print(f"flexmoe generate: {e}", file=sys.stderr)
        return 2
    try:
        tok = tokenizer_for(args.model, model.config.vocab_size)
    except ValueError as e:
        print(f"flexmoe generate: --model: {e}", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt, doc_start=True)
    if not ids:
        print("flexmoe generate: the prompt is empty", file=sys.stderr)
        return 2
    x = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
                             allowed_experts=allowed, eos_token_id=tok.eos_token_id if args.stop_at_eos else [],
                             use_cache=True, generator=gen)
        full = out[0].tolist()
        # Routing is causal, so one pass over prompt + continuation gives exactly the routing of generation.
        fwd = model(out, allowed_experts=allowed, output_router_logits=True)
    new = full[len(ids):]
    print(f"experts: {names} (top-k {k}); allowed: {allowed if allowed is not None else 'all'}")
    print("-" * 72)
    print(args.prompt + tok.decode(new))
    print("-" * 72)
    usage = expert_usage(fwd.router_logits, k, names)
    print(format_usage(usage, allowed, len(full), len(fwd.router_logits)))
    bad = [n for n, u in usage.items() if allowed is not None and n not in allowed and u["slots"]]
    if bad:  # cannot happen with exact opt-out; reported loudly if it ever does
        print(f"ERROR: opted-out experts served tokens: {bad}", file=sys.stderr)
        return 1
    return 0
