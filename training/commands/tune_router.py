"""``flexmoe tune-router``: router-only tuning of a merged model on proxy data."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..flops import flops_per_token
from .common import (add_command, require, add_train_args, check_out_free, check_train_output, check_tokenizer, guard, open_datas, options_from_args,
                     tokenizer_src)


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    p = add_command(sub, "tune-router", cmd_tune_router, help="router-only tuning of a merged model",
                    description="Train only the router rows and the non-public biases (top-k = all experts "
                                "while tuning) on a proxy data directory; experts and shared tensors stay "
                                "frozen. AdamW weight decay (default 0.1, FlexOlmo's) applies to the router "
                                "rows. Biases are applied as min(b, 0), so a positive bias is first set to 0 "
                                "(the same model) to give it a gradient again. The saved config keeps the "
                                "model's top-k (or --top-k). Tuning cannot make the model worse on its "
                                "validation data: it validates the untuned router first and then every "
                                "--eval-every steps, with the saved top-k, and writes the router of the best "
                                "validation (the untuned one when no step improved on it), stopping after "
                                "--patience validations without improvement (--no-keep-best: the last "
                                "router). run.json's 'selection' says which was kept.")
    require(p, "--model", help="merged checkpoint directory")
    require(p, "--data", help="proxy prepared data directory")
    require(p, "--out")
    p.add_argument("--top-k", type=int, default=None, help="top-k written to the output config (default: unchanged)")
    p.add_argument("--val-data", default=None,
                   help="validation data directory held out from --data (e.g. part of each owner's proxies): "
                        "all its tokens are validation (default: --data's own held-out split)")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                   help="write the router of the best validation, the untuned one included (default: on)")
    p.add_argument("--patience", type=int, default=3,
                   help="with --keep-best: stop after this many validations without improvement (0: never)")
    p.add_argument("--min-delta", type=float, default=0.0,
                   help="with --keep-best: an improvement must lower the validation loss by more than this")
    add_train_args(p, lr=2e-3, weight_decay=True, steps=50)


@guard
def cmd_tune_router(args) -> int:
    from ..modeling import freeze_for_router_tuning, open_checkpoint
    from ..selection import BestSelection
    from ..trainer import ModelBuild, RunSpec, train

    check_train_output(args, "--model", "--data", "--val-data")
    if args.keep_best and not args.eval_every:
        args.eval_every = max(1, args.steps // 10)    # validations to select from
    opts = options_from_args(args)
    opts.validate()
    check_out_free(Path(args.out), args.overwrite)
    datas = open_datas([args.data])
    val_datas = open_datas([args.val_data], "--val-data") if args.val_data else None
    cfg, sd = open_checkpoint(args.model, "--model")
    check_tokenizer(Path(args.model), datas[0], "--model")
    if val_datas:
        check_tokenizer(Path(args.model), val_datas[0], "--model")
    if cfg.num_experts < 2:
        raise ValueError(f"--model {args.model!r} has {cfg.num_experts} expert; router tuning needs an MoE")
    save_k = args.top_k if args.top_k is not None else cfg.num_experts_per_tok
    if not 1 <= save_k <= cfg.num_experts:
        raise ValueError(f"--top-k must be in [1, {cfg.num_experts}], got {save_k}")
    save_dtype = sd.dtype("model.embed_tokens.weight")
    from ..resume import checkpoint_identity

    train_cfg = cfg.copy(num_experts_per_tok=cfg.num_experts, moe_backend=args.moe_backend)
    # min(b, 0) is what the model applies: clamping changes no output, but a bias above 0 would get
    # no gradient (FlexOlmo's negative bias must be able to move down on the proxy data)
    sd = {k: (v.clamp(max=0) if k.endswith(".gate.expert_bias") else v) for k, v in sd.items()}
    out_cfg = cfg.copy(num_experts_per_tok=save_k)
    out_cfg.extra["role"] = "router-tuned"
    out_cfg.extra["router_tuned_on"] = str(Path(args.data).resolve())
    spec = RunSpec(kind="router", out=Path(args.out), datas=datas,
                   tokenizer_src=tokenizer_src(Path(args.model), datas[0]),
                   build=ModelBuild(train_cfg, sd, freeze_for_router_tuning), final_config=lambda: out_cfg, save_dtype=save_dtype,
                   flops_per_token=flops_per_token(train_cfg, args.seq_len, 0.0),
                   run_info={"model": str(Path(args.model).resolve()), "top_k_train": cfg.num_experts,
                             "top_k_saved": save_k},
                   inputs={"--model": checkpoint_identity(args.model), "--top-k": save_k,
                           "--keep-best": [args.keep_best, args.patience, args.min_delta]},
                   val_datas=val_datas,
                   select=BestSelection(args.patience, args.min_delta, save_k) if args.keep_best else None)
    return train(spec, opts)
