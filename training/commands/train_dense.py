"""``flexmoe train-dense``: baseline dense model of equal active parameters."""
from __future__ import annotations

from pathlib import Path

from ..flops import flops_per_token
from .budget import BUDGET_HELP, add_budget_args, steps_for_budget, world_size
from .common import (add_command, require, add_train_args, check_train_output, dense_config, freeze_single_router, guard, open_datas,
                     options_from_args)


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    p = add_command(sub, "train-dense", cmd_train_dense, help="baseline: dense model of equal active parameters",
                    description="A dense model with intermediate width K*F (K experts per token, F each "
                                "expert's width: from --match-active-of CKPT or --active-experts and "
                                "--model-config), trained on all --data jointly. " + BUDGET_HELP)
    require(p, "--data", action="append")
    require(p, "--out")
    p.add_argument("--model-config", default="tiny")
    p.add_argument("--active-experts", type=int, default=2, help="K (default 2)")
    p.add_argument("--match-active-of", default=None, help="MoE checkpoint whose K and F to match")
    add_budget_args(p)
    add_train_args(p, lr=1e-3)


@guard
def cmd_train_dense(args) -> int:
    from ..modeling import fresh_source, open_checkpoint
    from ..trainer import ModelBuild, RunSpec, train

    check_train_output(args, "--data", "--match-active-of")
    datas = open_datas(args.data)
    k = args.active_experts
    base_f = None
    if args.match_active_of:
        mcfg = (open_checkpoint(args.match_active_of, "--match-active-of")[0]
                if Path(args.match_active_of).is_dir() else None)
        if mcfg is None:
            raise FileNotFoundError(f"--match-active-of {args.match_active_of!r} is not a checkpoint directory")
        k, base_f = mcfg.num_experts_per_tok, mcfg.intermediate_size
    base = dense_config(args, datas)
    f = (base_f or base.intermediate_size) * k
    cfg = base.copy(intermediate_size=f, num_experts=1, num_experts_per_tok=1, expert_names=["dense"],
                    extra={"role": "dense-baseline", "active_experts": k, "tokenizer": datas[0].meta["tokenizer"]})
    fpt = flops_per_token(cfg, args.seq_len)
    steps_for_budget(args, fpt, world_size())
    opts = options_from_args(args)
    opts.validate()
    from ..resume import checkpoint_identity, config_identity

    spec = RunSpec(kind="dense", out=Path(args.out), datas=datas, tokenizer_src=datas[0].path,
                   build=ModelBuild(cfg, fresh_source(cfg, args.seed), freeze_single_router), final_config=lambda: cfg, flops_per_token=fpt,
                   run_info={"model_config": cfg.to_dict(), "budget": args.budget},
                   inputs={"--model-config": config_identity(args.model_config, base), "--active-experts": k,
                           "--match-active-of": checkpoint_identity(args.match_active_of) if args.match_active_of
                           else None})
    return train(spec, opts)
