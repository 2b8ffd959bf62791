"""``flexmoe generate``: generation with a chosen set of experts, reporting which experts served it."""
from __future__ import annotations

import sys

from .common import DefaultsOnceFormatter, add_name_list


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    g = sub.add_parser(
        "generate",
        help="generate text with a chosen set of experts and show which experts served the request",
        description=("Greedy (or sampled) generation from a FlexOlmo checkpoint with experts opted in (--allow) "
                     "or out (--deny); prints the text and how many routing slots each expert served."),
        formatter_class=DefaultsOnceFormatter,
    )
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--model", required=True,
                   help="checkpoint directory (config.json + model.safetensors) or a Hugging Face Hub id such as "
                        "allenai/FlexOlmo-7x7B-1T (needs huggingface_hub; only JSON, safetensors and tokenizer "
                        "files are downloaded)")
    g.add_argument("--revision", help="with a Hub id: the branch, tag or commit (default: main)")
    g.add_argument("--local-files-only", action="store_true",
                   help="with a Hub id: use the local Hugging Face cache only, never the network")
    who = g.add_mutually_exclusive_group()
    add_name_list(who, "--allow", "only these experts may be used")
    add_name_list(who, "--deny", "these experts are opted out")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --temperature > 0)")
    g.add_argument("--top-k", type=int, default=None,
                   help="sampling top-k: sample among the K most likely tokens (with --temperature > 0), as in "
                        "transformers and vLLM. Deprecated old meaning: without --temperature > 0 (where sampling "
                        "top-k has no effect) it still sets the active experts per token, with a note; write "
                        "--experts-per-token for that")
    g.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                   help="active experts per token, the model's routing top-k (default: the model's)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--stop-at-eos", action="store_true", help="stop at the end-of-document token")
    g.set_defaults(func=run_generate_command)


def _split_top_k(args) -> tuple:
    """``(active experts per token or None, sampling top-k or None)`` from ``--experts-per-token``
    and ``--top-k``: ``--top-k`` is sampling top-k when sampling (``--temperature > 0``); without
    sampling it keeps its old meaning (active experts), with a deprecation note on stderr."""
    experts_k, sample_top_k = args.experts_per_token, None
    if args.top_k is None:
        return experts_k, None
    if args.temperature > 0:
        sample_top_k = args.top_k
    elif experts_k is None:
        print("flexmoe generate: note: --top-k without --temperature > 0 sets the active experts per token "
              f"({args.top_k}), its old meaning, which is deprecated: write --experts-per-token {args.top_k} "
              "(--top-k is sampling top-k when sampling)", file=sys.stderr)
        experts_k = args.top_k
    else:
        print("flexmoe generate: note: --top-k (sampling top-k) has no effect without --temperature > 0",
              file=sys.stderr)
    return experts_k, sample_top_k


def _load(args, device):
    """The model and tokenizer of ``--model`` (a directory or a Hub id): ``(model, tokenizer)``.
    Raises ``ValueError`` / ``OSError`` naming the file or the id."""
    from flexmoe_kernels.models import FlexOlmoForCausalLM
    from flexmoe_kernels.models.hub import checkpoint_expert_names, resolve_checkpoint

    from ..demo.tokenizer import tokenizer_for

    local = resolve_checkpoint(args.model, revision=args.revision, local_files_only=args.local_files_only,
                               argument="--model")
    names = checkpoint_expert_names(args.model, local)  # Ai2's released checkpoints name no experts
    model = FlexOlmoForCausalLM.from_pretrained(local, device=device, **({"expert_names": names} if names else {}))
    model.eval()
    return model, tokenizer_for(local, model.config.vocab_size, model.config)


def run_generate_command(args) -> int:
    """Run ``flexmoe generate``: prints the text and the experts that served it; returns the exit status."""
    import torch

    from ..demo.inference import expert_usage, format_usage, resolve_allow_list

    if args.max_new_tokens < 1:
        print(f"flexmoe generate: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, tok = _load(args, device)
    except (ValueError, OSError) as e:  # CheckpointError (a ValueError) / missing files: name the file
        msg = str(e) if str(e).startswith("--model") else f"--model: {e}"
        print(f"flexmoe generate: {msg}", file=sys.stderr)
        return 2
    names = list(model.expert_names)
    experts_k, sample_top_k = _split_top_k(args)
    flag = "--experts-per-token" if args.experts_per_token is not None else "--top-k"
    if experts_k is not None and not 1 <= experts_k <= len(names):
        print(f"flexmoe generate: {flag} must be in [1, {len(names)}] (the model's experts), got {experts_k}",
              file=sys.stderr)
        return 2
    if sample_top_k is not None and sample_top_k < 1:
        print(f"flexmoe generate: --top-k (sampling) must be >= 1, got {sample_top_k}", file=sys.stderr)
        return 2
    if experts_k is not None:
        model.set_top_k(experts_k)
    k = model.config.num_experts_per_tok
    try:
        allowed = resolve_allow_list(names, args.allow, args.deny, k)
    except ValueError as e:
        print(f"flexmoe generate: {e}", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt, doc_start=True)
    if not ids:
        print("flexmoe generate: the prompt is empty", file=sys.stderr)
        return 2
    x = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    stop = (tok.eos_token_ids or None) if args.stop_at_eos else []  # None: the config's EOS
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
                             top_k=sample_top_k,
                             allowed_experts=allowed, eos_token_id=stop,
                             use_cache=True, generator=gen)
        full = out[0].tolist()
        # Routing is causal, so one pass over prompt + continuation gives exactly the routing of generation.
        fwd = model(out, allowed_experts=allowed, output_router_logits=True)
    new = full[len(ids):]
    print(f"experts: {names} (top-k {k}); allowed: {allowed if allowed is not None else 'all'}")
    print("-" * 72)
    print(args.prompt + tok.continuation(ids, new))
    print("-" * 72)
    usage = expert_usage(fwd.router_logits, k, names)
    print(format_usage(usage, allowed, len(full), len(fwd.router_logits)))
    bad = [n for n, u in usage.items() if allowed is not None and n not in allowed and u["slots"]]
    if bad:  # cannot happen with exact opt-out; reported loudly if it ever does
        print(f"ERROR: opted-out experts served tokens: {bad}", file=sys.stderr)
        return 1
    return 0
