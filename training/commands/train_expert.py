"""``flexmoe train-expert``: coupled training of one data owner's expert on the frozen public anchor."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..flops import flops_per_token
from .common import (add_command, require, add_train_args, check_out_free, check_train_output, check_tokenizer, guard, open_datas, options_from_args,
                     tokenizer_src)


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    p = add_command(sub, "train-expert", cmd_train_expert, help="coupled training of one data owner's expert",
                    description="Build the 2-expert model [public, NAME] from the public checkpoint (both FFNs "
                                "start as the public FFN; router [r_public; r_owner]; top-2 of 2; expert bias) "
                                "and train it on the owner's data only. Frozen: embeddings, attention incl. q/k "
                                "norms, all norms, LM head, the public expert FFN, r_public, b_public. Trained: "
                                "the owner's FFN, r_owner, b_owner. Weight decay 0. At the end every frozen "
                                "tensor is checked bit-identical to the public model's.")
    require(p, "--public", help="public checkpoint directory (the anchor)")
    require(p, "--data", help="the owner's prepared data directory (the only data it sees)")
    require(p, "--name", help="expert name (unique among owners)")
    require(p, "--out", help="checkpoint directory to write")
    p.add_argument("--public-data", default=None,
                   help="a prepared data directory of public text mixed into the owner's training (windows "
                        "drawn in proportion to tokens), so that r_owner and b_owner also learn where the public "
                        "expert is better; public, so no owner data is shared (default: the owner's data only)")
    p.add_argument("--router-init", default=None, help="safetensors from init-router (default: random r_owner)")
    p.add_argument("--bias-init", type=float, default=-0.5,
                   help="initial b_owner, applied as min(b, 0): it starts below zero so that it can learn "
                        "(a bias at or above 0 gets no gradient) (default -0.5)")
    add_train_args(p, lr=1e-3, weight_decay=False)


def _load_router_init(path: str):
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--router-init {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            key = "router_embedding_LD" if "router_embedding_LD" in keys else "router_embedding"
            if key not in keys:
                raise ValueError(f"--router-init {str(p)!r} has no 'router_embedding' tensor (has {keys})")
            return f.get_tensor(key).float(), dict(f.metadata() or {})
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"--router-init {str(p)!r} is not a readable safetensors file ({exc})") from exc


@guard
def cmd_train_expert(args) -> int:
    from ..modeling import (anchor_sha256, check_owner_against_public, coupled_source, freeze_for_expert_training,
                            open_checkpoint)
    from ..trainer import ModelBuild, RunSpec, train

    check_train_output(args, "--public", "--data", "--router-init", "--public-data")
    opts = options_from_args(args)
    opts.weight_decay = 0.0  # FlexOlmo: no decay, so frozen tensors stay bit-identical
    opts.validate()
    check_out_free(Path(args.out), args.overwrite)
    datas = open_datas([args.data] + ([args.public_data] if args.public_data else []),
                       "--data/--public-data" if args.public_data else "--data")
    # The public model is read lazily, one tensor at a time (hash, build, checks): no rank holds it whole.
    pub_cfg, pub_sd = open_checkpoint(args.public, "--public")
    if pub_cfg.num_experts > 1:  # a FlexOlmo MoE (released or merged): train against its public expert 0
        from flexmoe_kernels.models.olmo2 import public_view

        print(f"train-expert: --public has {pub_cfg.num_experts} experts {pub_cfg.expert_names}: the anchor is its "
              f"expert 0 ({pub_cfg.expert_names[0]!r}) and its shared tensors")
        pub_cfg, pub_sd = public_view(pub_cfg, pub_sd)
    check_tokenizer(Path(args.public), datas[0], "--public")
    if datas[0].vocab_size > pub_cfg.vocab_size:
        raise ValueError(f"--data vocab {datas[0].vocab_size} is larger than the public model's {pub_cfg.vocab_size}")
    anchor = anchor_sha256(pub_sd)
    router, rmeta = (None, {})
    if args.router_init:
        router, rmeta = _load_router_init(args.router_init)
        if rmeta.get("public_sha256") and rmeta["public_sha256"] != anchor:
            raise ValueError(f"--router-init {args.router_init!r} was computed from another public model "
                             f"({rmeta['public_sha256']} != {anchor})")
    cfg, source = coupled_source(pub_cfg, pub_sd, args.name, router, seed=args.seed, bias_init=args.bias_init)
    cfg.extra.update({"anchor_sha256": anchor, "expert_name": args.name, "role": "owner",
                      "router_init": rmeta.get("embedder", "random")})
    cfg.moe_backend = args.moe_backend
    from ..resume import files_identity

    # what a resumed run must have been started on (refused otherwise, naming the flag): the anchor by its hash
    inputs = {"--public": {"path": str(Path(args.public).resolve()), "sha256": anchor}, "--name": args.name,
              "--router-init": files_identity(args.router_init, None) if args.router_init else None,
              "--bias-init": args.bias_init}
    save_dtype = pub_sd.dtype("model.embed_tokens.weight")
    # Built in fp32 from the coupled source; its frozen tensors must keep the source's values,
    # i.e. the public model's (checked at the end of the run and again from the files below).
    trainable_mm = 3.0 * cfg.hidden_size * cfg.intermediate_size * cfg.num_hidden_layers  # the owner's expert
    spec = RunSpec(kind="expert", out=Path(args.out), datas=datas,
                   tokenizer_src=tokenizer_src(Path(args.public), datas[0]),
                   build=ModelBuild(cfg, source, freeze_for_expert_training), final_config=lambda: cfg,
                   save_dtype=save_dtype,
                   flops_per_token=flops_per_token(cfg, args.seq_len, trainable_mm),
                   run_info={"public": str(Path(args.public).resolve()), "expert_name": args.name,
                             "anchor_sha256": anchor, "router_init": args.router_init}, inputs=inputs)
    rc = train(spec, opts)
    out = Path(args.out)
    if rc == 0 and (out / "config.json").is_file() and int(os.environ.get("RANK", "0")) == 0:
        # Independent check from the files: every frozen tensor equals the public model's.
        o_cfg, o_sd = open_checkpoint(out, "--out")
        try:
            check_owner_against_public(pub_cfg, pub_sd, o_cfg, o_sd, str(out))
        except Exception:
            shutil.rmtree(out, ignore_errors=True)
            raise
        print(f"train-expert: verified: all frozen tensors of {str(out)!r} are bit-identical to the public model's")
    return rc
