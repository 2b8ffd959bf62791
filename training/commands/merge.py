"""``flexmoe merge``: merge the public model and the owners' experts into one FlexOlmo checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

from flexmoe_kernels.utils.fs import atomic_directory, write_json_atomic

from ..runlog import utc_now
from .common import add_command, add_recipe_arg, require, check_out_free, check_output, guard


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    p = add_command(sub, "merge", cmd_merge, help="merge public + owners into one FlexOlmo checkpoint",
                    description="Expert 0 and all shared tensors from --public; expert j from owner j (its FFN, "
                                "router row and bias). Refuses, naming the tensor, when an owner's frozen "
                                "tensors differ from the public model's or it recorded another anchor hash.")
    require(p, "--public")
    require(p, "--owner", action="append", help="owner checkpoint from train-expert (repeatable)")
    require(p, "--out")
    p.add_argument("--top-k", type=int, default=2, help="experts per token in the merged model (default 2)")
    p.add_argument("--overwrite", action="store_true")
    add_recipe_arg(p)


@guard
def cmd_merge(args) -> int:
    """Merge ``--public`` and every ``--owner`` into ``--out`` (atomically)."""
    from ..data import copy_tokenizer_files
    from ..modeling import load_checkpoint, merge_state_dicts
    from ..trainer import save_hf

    check_output(args.out, [("--public", args.public), ("--owner", args.owner)])
    out = Path(args.out).resolve()
    check_out_free(out, args.overwrite)
    pub_cfg, pub_sd = load_checkpoint(args.public, "--public")
    owners = []
    for o in args.owner:
        cfg, sd = load_checkpoint(o, "--owner")
        owners.append((o, cfg, sd))
    cfg, sd = merge_state_dicts(pub_cfg, pub_sd, owners, top_k=args.top_k)
    cfg.extra["role"] = "merged"
    with atomic_directory(out) as ck:
        save_hf(cfg, sd, ck)
        copy_tokenizer_files(Path(args.public), ck)
        write_json_atomic(ck / "run.json", {
            "command": "merge", "argv": sys.argv[1:], "status": "finished", "time": utc_now(),
            "public": str(Path(args.public).resolve()), "owners": [str(Path(o).resolve()) for o in args.owner],
            "expert_names": cfg.expert_names, "top_k": cfg.num_experts_per_tok,
            "anchor_sha256": cfg.extra["anchor_sha256"]})
    print(f"merge: {len(owners) + 1} experts {cfg.expert_names} (top-{cfg.num_experts_per_tok}) -> {out}")
    return 0
