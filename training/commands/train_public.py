"""``flexmoe train-public``: train the dense public model (expert 0 of every merged model)."""
from __future__ import annotations

from pathlib import Path

from ..flops import flops_per_token
from .common import (add_command, require, add_train_args, check_train_output, dense_config, freeze_single_router, guard, open_datas,
                     options_from_args)


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    p = add_command(sub, "train-public", cmd_train_public, help="train the dense public model",
                    description="Train a dense FlexOlmo model (num_experts=1) on public data. Its FFN becomes "
                                "expert 0 ('public') of every coupled and merged model.")
    require(p, "--data", action="append", help="prepared data directory (repeatable)")
    require(p, "--out", help="checkpoint directory to write")
    p.add_argument("--model-config", default="tiny", help="preset (tiny, small, olmo2-1b, olmo2-7b) or a JSON file")
    p.add_argument("--router-embedder", default="auto", choices=["auto", "hidden", "minilm"],
                   help="how the public expert's router row (r_public) is set from the first --data directory "
                        "after training, as init-router does for owners (default auto)")
    add_train_args(p, lr=1e-3)


def _inputs(args, cfg) -> dict:
    """What a resumed run must have been started on besides --data (the trainer adds it)."""
    from ..resume import config_identity

    return {"--model-config": config_identity(args.model_config, cfg), "--router-embedder": args.router_embedder}


@guard
def cmd_train_public(args) -> int:
    from ..modeling import fresh_source
    from ..trainer import ModelBuild, RunSpec, train

    check_train_output(args, "--data")
    opts = options_from_args(args)
    opts.validate()
    datas = open_datas(args.data)
    cfg = dense_config(args, datas, num_experts=1, num_experts_per_tok=1, expert_names=["public"],
                        expert_bias=False, extra={"role": "public", "tokenizer": datas[0].meta["tokenizer"]})
    def set_router_row(sd: dict):
        # The dense model's router row never gets a gradient: give it the public domain's
        # embedding now, before any owner couples to this anchor (see set_public_router_rows).
        from ..router_init import set_public_router_rows

        return set_public_router_rows(cfg, sd, datas[0], args.router_embedder)

    spec = RunSpec(kind="public", out=Path(args.out), datas=datas, tokenizer_src=datas[0].path,
                   build=ModelBuild(cfg, fresh_source(cfg, args.seed), freeze_single_router), final_config=lambda: cfg,
                   flops_per_token=flops_per_token(cfg, args.seq_len), run_info={"model_config": cfg.to_dict()},
                   finalize_state_dict=set_router_row, inputs=_inputs(args, cfg))
    return train(spec, opts)
