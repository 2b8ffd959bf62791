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
    p.add_argument("--data", action="append", default=[],
                   help="prepared data directory (next-token loss only; repeatable: windows drawn in proportion "
                        "to tokens); give it, --route-data, or both")
    p.add_argument("--route-data", action="append", default=[], metavar="EXPERT=DIR",
                   help="routing supervision: a prepared data directory whose tokens should go to expert EXPERT "
                        "(a name of --model's experts, e.g. an owner's proxies -> that owner, a public sample -> "
                        "public); trains on it like --data and adds --route-weight x the router's cross-entropy "
                        "against EXPERT, averaged over layers (repeat per expert)")
    p.add_argument("--route-weight", type=float, default=None,
                   help="weight of the routing cross-entropy with --route-data (default 1.0)")
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

    if args.route_weight is not None and not args.route_data:
        raise ValueError("--route-weight needs --route-data EXPERT=DIR (it weighs the routing supervision)")
    args.route_weight = 1.0 if args.route_weight is None else args.route_weight
    routed = _parse_route_data(args.route_data, args.route_weight)
    if not args.data and not routed:
        raise ValueError("give --data (proxy data directory) or --route-data EXPERT=DIR (or both)")
    check_train_output(args, "--model", "--data", "--val-data", extra=[("--route-data", [d for _, d in routed])])
    if args.keep_best and not args.eval_every:
        args.eval_every = max(1, args.steps // 10)    # validations to select from
    opts = options_from_args(args)
    opts.validate()
    check_out_free(Path(args.out), args.overwrite)
    datas = open_datas(list(args.data) + [d for _, d in routed], "--data" if not routed else "--data/--route-data")
    val_datas = open_datas([args.val_data], "--val-data") if args.val_data else None
    cfg, sd = open_checkpoint(args.model, "--model")
    check_tokenizer(Path(args.model), datas[0], "--model")
    if val_datas:
        check_tokenizer(Path(args.model), val_datas[0], "--model")
    if cfg.num_experts < 2:
        raise ValueError(f"--model {args.model!r} has {cfg.num_experts} expert; router tuning needs an MoE")
    targets = [-1] * len(args.data) + [_expert_index(cfg, name) for name, _ in routed]
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
    tuned_on = [str(d.path.resolve()) for d in datas]
    out_cfg.extra["router_tuned_on"] = tuned_on[0] if len(tuned_on) == 1 else tuned_on
    spec = RunSpec(kind="router", out=Path(args.out), datas=datas,
                   tokenizer_src=tokenizer_src(Path(args.model), datas[0]),
                   build=ModelBuild(train_cfg, sd, freeze_for_router_tuning), final_config=lambda: out_cfg, save_dtype=save_dtype,
                   flops_per_token=flops_per_token(train_cfg, args.seq_len, 0.0),
                   run_info={"model": str(Path(args.model).resolve()), "top_k_train": cfg.num_experts,
                             "top_k_saved": save_k},
                   inputs={"--model": checkpoint_identity(args.model), "--top-k": save_k,
                           "--keep-best": [args.keep_best, args.patience, args.min_delta],
                           "--route-data": [name for name, _ in routed], "--route-weight": args.route_weight},
                   val_datas=val_datas, route_targets=targets if routed else (),
                   route_weight=args.route_weight if routed else 0.0,
                   select=BestSelection(args.patience, args.min_delta, save_k) if args.keep_best else None)
    return train(spec, opts)


def _parse_route_data(values, weight: float) -> list:
    """``[(expert name, directory)]`` from ``--route-data EXPERT=DIR`` values (``ValueError``
    naming the flag for a value without ``=`` or a non-finite / negative ``--route-weight``)."""
    import math

    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--route-data must be EXPERT=DIR (e.g. public=data/tune-public), got {v!r}")
        out.append((name, path))
    if values and not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"--route-weight must be a finite number >= 0, got {weight}")
    return out


def _expert_index(cfg, name: str) -> int:
    """The index of expert ``name`` of ``--model`` (``ValueError`` naming the flag and the known names)."""
    if name not in cfg.expert_names:
        raise ValueError(f"--route-data: {name!r} is not an expert of --model; its experts: {list(cfg.expert_names)}")
    return cfg.expert_names.index(name)
