"""``flexmoe train-moe``: baseline standard MoE trained jointly on all data (from scratch or upcycled)."""
from __future__ import annotations

from pathlib import Path

from ..flops import flops_per_token
from .budget import BUDGET_HELP, add_budget_args, steps_for_budget, world_size
from .common import (add_command, require, add_train_args, check_out_free, check_train_output, check_tokenizer, dense_config, freeze_single_router,
                     guard, open_datas, options_from_args)


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    p = add_command(sub, "train-moe", cmd_train_moe, help="baseline: standard MoE trained on all data",
                    description="A standard MoE (everything trainable, no expert bias) trained jointly on "
                                "all --data, from scratch or upcycled from --public. " + BUDGET_HELP)
    require(p, "--data", action="append")
    require(p, "--out")
    p.add_argument("--model-config", default="tiny")
    p.add_argument("--public", default=None, help="upcycle from this dense checkpoint")
    p.add_argument("--num-experts", type=int, default=None, help="E (default: 1 + number of --data)")
    p.add_argument("--top-k", type=int, default=2)
    add_budget_args(p)
    add_train_args(p, lr=1e-3)


@guard
def cmd_train_moe(args) -> int:
    import torch

    from ..modeling import LazyTensors, fresh_source, open_checkpoint
    from ..trainer import ModelBuild, RunSpec, train

    check_train_output(args, "--data", "--public")
    datas = open_datas(args.data)
    E = args.num_experts or (1 + len(datas))
    if not 1 <= args.top_k <= E:
        raise ValueError(f"--top-k must be in [1, --num-experts={E}], got {args.top_k}")
    names = [f"expert_{i}" for i in range(E)]
    check_out_free(Path(args.out), args.overwrite)
    if args.public:
        # Upcycling: shared tensors from the public model, every expert a copy of its FFN, a fresh router.
        pub_cfg, pub_sd = open_checkpoint(args.public, "--public")
        check_tokenizer(Path(args.public), datas[0], "--public")
        if pub_cfg.max_position_embeddings < args.seq_len:
            raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                             f"{pub_cfg.max_position_embeddings}")
        cfg = pub_cfg.copy(num_experts=E, num_experts_per_tok=args.top_k, expert_names=names, expert_bias=False,
                           moe_backend=args.moe_backend,
                           extra={"role": "moe-baseline", "upcycled_from": str(Path(args.public).resolve()),
                                  "tokenizer": datas[0].meta["tokenizer"]})
        # Tensors are made on access (one at a time); the routers (L x E x D) are drawn up front.
        g = torch.Generator().manual_seed(args.seed)
        routers = {k: torch.randn(E, pub_sd.shape(k)[1], generator=g) * cfg.initializer_range
                   for k in pub_sd if k.endswith("mlp.gate.weight")}

        def upcycled(k):
            if k in routers:
                return routers[k]
            v = pub_sd[k].float()
            return v[:1].repeat(E, *([1] * (v.ndim - 1))) if k.endswith(("mlp.experts.gate_up_proj",
                                                                          "mlp.experts.down_proj")) else v

        source = LazyTensors([k for k in pub_sd if not k.endswith("mlp.gate.expert_bias")], upcycled)
    else:
        base = dense_config(args, datas)
        cfg = base.copy(num_experts=E, num_experts_per_tok=args.top_k, expert_names=names, expert_bias=False,
                        extra={"role": "moe-baseline", "tokenizer": datas[0].meta["tokenizer"]})
        source = fresh_source(cfg, args.seed)
    fpt = flops_per_token(cfg, args.seq_len)
    steps_for_budget(args, fpt, world_size())
    opts = options_from_args(args)
    opts.validate()
    from ..resume import checkpoint_identity, config_identity

    spec = RunSpec(kind="moe", out=Path(args.out), datas=datas, tokenizer_src=datas[0].path,
                   build=ModelBuild(cfg, source, freeze_single_router if E == 1 else None), final_config=lambda: cfg, flops_per_token=fpt,
                   run_info={"model_config": cfg.to_dict(), "budget": args.budget},
                   inputs={"--public": checkpoint_identity(args.public) if args.public else None,
                           "--model-config": None if args.public else config_identity(args.model_config, base),
                           "--num-experts": E, "--top-k": args.top_k})
    return train(spec, opts)
