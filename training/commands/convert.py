"""``flexmoe convert``: OLMo-core FlexOlmo checkpoints (``model.pt`` or a torch distributed
checkpoint) to our Hugging Face layout, keeping the router's negative expert bias, and back.

The key and layout mapping is :mod:`flexmoe_kernels.models.olmo_core` (its docstring has the
table); this module finds the config, checks the tensors against it and writes atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import DefaultsOnceFormatter, add_command, add_dtype_arg, check_out_free, check_output, guard, require

DESCRIPTION = """\
--to hf: read an OLMo-core checkpoint (--input: a model.pt file, a directory holding model.pt
(or model.safetensors, from unshard_checkpoint(use_safetensors=True)), or a torch distributed
checkpoint directory (.metadata; a step directory holding
model_and_optim/ also works); only the model tensors are read) and write our HF checkpoint
(config.json + safetensors) to --out. FlexOlmo's router expert_bias (E-1, 1) becomes
mlp.gate.expert_bias (E,) with 0 for the public expert 0 (OLMo-core's own HF export drops it).
The sizes come from the tensors; heads, RoPE theta, norm eps, top-k and expert names from
--config, else from flexmoe_config.json or OLMo-core's config.json beside --input (or up to two
directories above it).

--to hf with a Hugging Face olmo2 directory as --input (OLMo-2, e.g. allenai/OLMo-2-1124-7B, the
public model FlexOlmo starts from; its config.json says model_type "olmo2"): write our dense public
model (flex_olmo, one expert "public", router row 0) whose logits equal transformers' Olmo2 model's
(the architectures are the same: post-norm, QK-norm). Tensors are converted one at a time
(a 7B import never holds two copies); tokenizer files beside it are copied. The training
commands also take an olmo2 directory as --public directly (converted on access).

--to olmo-core: read our HF checkpoint (--input) and write OLMo-core model keys to --out:
--format pt (out/model.pt, as OLMo-core's unshard_checkpoint writes it) or dcp (out/ is a
distributed checkpoint with the tensors under model., as save_model_and_optim_state writes
it), plus out/flexmoe_config.json (our config, for the way back). Both directions are exact
(views, transposes, concatenations): the round trips are bit-identical.

Needs no OLMo-core install: a checkpoint is a state dict. Where `ai2-olmo-core` is importable
(pip install ai2-olmo-core), --to olmo-core also checks the tensors against OLMo-core's own model
(built on the meta device) and writes its config.json ({"model": TransformerConfig}); where it is
not, it says so and writes the tensors and flexmoe_config.json only."""


class _Formatter(DefaultsOnceFormatter, argparse.RawDescriptionHelpFormatter):
    """The description's paragraphs as written; each flag's default once."""


def register(sub) -> None:
    """Add ``flexmoe convert``."""
    p = add_command(sub, "convert", run, help="OLMo-core FlexOlmo checkpoints <-> our HF layout (keeps the router bias); HF olmo2 -> ours",
                    description=DESCRIPTION)
    p.formatter_class = _Formatter
    require(p, "--to", choices=["hf", "olmo-core"], help="direction: hf (from OLMo-core) or olmo-core (from ours)")
    require(p, "--input", help="the checkpoint to convert (see above)")
    require(p, "--out", help="output directory (written atomically)")
    p.add_argument("--format", choices=["pt", "dcp"], default="pt", help="with --to olmo-core: model.pt or a DCP directory")
    p.add_argument("--config", default=None,
                   help="with --to hf: our config.json (a file or checkpoint directory) or a preset name "
                        "(training/configs/model_<name>.json) for what the tensors do not fix")
    p.add_argument("--expert-layout", choices=["auto", "mlp", "dropless"], default="auto",
                   help="OLMo-core's expert storage: mlp = MoEMLP (E*D, F) (FlexOlmo's), dropless = DroplessMoEMLP "
                        "(E*F, D); auto: from the shapes (--to hf), the layout recorded beside --input, else mlp")
    add_dtype_arg(p, extra=("keep",), default="keep", help="cast the tensors (keep: as stored)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="with --to hf: largest safetensors shard (e.g. 5GB, 500MB; more shards get "
                        "model.safetensors.index.json; default 5GB, as the training commands)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _cast(sd: dict, dtype: str) -> dict:
    import torch

    if dtype == "keep":
        return sd
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return {k: v.to(dt) for k, v in sd.items()}


def _beside(start: Path, name: str):
    """``name`` in ``start`` or up to two directories above it (a DCP dir's step and run directories), or None."""
    for d in [start, *list(start.parents)[:2]]:
        if (d / name).is_file():
            return d / name
    return None


def _read_json(path: Path, what: str) -> dict:
    from flexmoe_kernels.models.config import read_json_object

    try:
        return read_json_object(path)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc


def _config_inputs(args, cfg_dir: Path):
    """(our base config or None, OLMo-core config fields, where they came from)."""
    from flexmoe_kernels.models import FlexOlmoConfig
    from flexmoe_kernels.models.olmo_core import OUR_CONFIG_FILE, olmo_core_model_config

    if args.config:
        c = Path(args.config)
        if c.is_dir():
            c = c / "config.json"
        if c.is_file():
            return FlexOlmoConfig.from_dict(_read_json(c, "--config")), {}, f"--config {str(c)!r}"
        from ..modeling import ModelSpecError, load_model_config

        try:
            return load_model_config(args.config), {}, f"--config preset {args.config!r}"
        except ModelSpecError as exc:
            raise ValueError(f"--config: {str(exc).replace('--model-config ', '')}") from exc
    ours = _beside(cfg_dir, OUR_CONFIG_FILE)
    if ours is not None:
        return FlexOlmoConfig.from_dict(_read_json(ours, "--input")), {}, str(ours)
    theirs = _beside(cfg_dir, "config.json")
    if theirs is not None:
        d = _read_json(theirs, "--input")
        if d.get("model_type") == "flex_olmo":
            return FlexOlmoConfig.from_dict(d), {}, str(theirs)
        return None, olmo_core_model_config(d, f"--input: OLMo-core's {str(theirs)!r}"), f"OLMo-core's {str(theirs)!r}"
    return None, {}, "no config found"


def _recorded_layout(start: Path):
    run = _beside(start, "run.json")
    if run is None:
        return None
    try:
        return json.loads(run.read_text()).get("olmo_core_expert_layout")
    except (ValueError, OSError):
        return None


def _to_hf(args, out: Path) -> str:
    from flexmoe_kernels.models.checkpoint import parse_size, save_pretrained
    from flexmoe_kernels.models.olmo_core import config_from_olmo_core, olmo_core_to_hf, read_olmo_core
    from flexmoe_kernels.utils.fs import atomic_directory, write_json_atomic

    from ..modeling import model_from_state_dict
    from ..runlog import utc_now

    what = f"--input {args.input!r}"
    try:
        sd, cfg_dir = read_olmo_core(args.input)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"--input: {exc}") from exc
    layout = args.expert_layout
    if layout == "auto":
        layout = _recorded_layout(Path(cfg_dir)) or "auto"
    hf, dims = olmo_core_to_hf(sd, expert_layout=layout, what=what)
    base, fields, source = _config_inputs(args, Path(cfg_dir))
    if base is None and "num_attention_heads" not in fields:
        raise ValueError(f"{what}: the number of attention heads is not in the tensors and {source} "
                         f"(flexmoe_config.json or OLMo-core's config.json beside it): pass --config")
    cfg = config_from_olmo_core(dims, base, fields, what=f"{what} with config from {source}")
    model = model_from_state_dict(cfg, _cast(hf, args.dtype))
    shard = parse_size(args.max_shard_size, "--max-shard-size")
    with atomic_directory(out) as ck:
        save_pretrained(model, ck, max_shard_size=shard)
        write_json_atomic(ck / "run.json", {
            "command": "convert", "argv": sys.argv[1:], "status": "finished", "time": utc_now(),
            "from": "olmo-core", "input": str(Path(args.input).resolve()), "config_from": source,
            "olmo_core_expert_layout": dims.layout})
    return (f"convert: OLMo-core ({dims.layout} experts, {dims.num_layers} layers, E={dims.num_experts}, "
            f"expert bias {'kept' if dims.expert_bias else 'absent'}) -> HF {out} (config from {source})")


def _olmo_core_config(cfg, oc: dict, layout: str):
    """With ``olmo_core`` importable: OLMo-core's ``config.json`` content (``{"model": ...}``) for
    ``cfg``, after checking that OLMo-core's own model (built on the meta device) has exactly the
    keys and shapes of ``oc`` (plus FlexOlmo's router ``expert_bias``). Returns (dict or None, note)."""
    try:
        from olmo_core.nn.transformer import TransformerConfig
    except Exception as exc:  # absent, or installed without its dependencies
        return None, (f"olmo_core is not importable ({type(exc).__name__}: {exc}): no OLMo-core config.json "
                      "written and no check against its model classes (pip install ai2-olmo-core)")
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        return None, "OLMo-core derives head_dim = D / heads, this model differs: no OLMo-core config.json"
    tc = TransformerConfig.llama_like_moe(
        d_model=cfg.hidden_size, vocab_size=cfg.vocab_size, n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, num_experts=cfg.num_experts,
        top_k=cfg.num_experts_per_tok, expert_hidden_size=cfg.intermediate_size, dropless=layout == "dropless",
        capacity_factor=None if layout == "dropless" else 1.2, reordered_norm=True, qk_norm=True,
        rope_theta=cfg.rope_theta, layer_norm_eps=cfg.rms_norm_eps, lb_loss_weight=None, z_loss_weight=0.001,
        tie_word_embeddings=cfg.tie_word_embeddings)
    want = {k: tuple(v.shape) for k, v in tc.build(init_device="meta").state_dict().items()}
    have = {k: tuple(v.shape) for k, v in oc.items() if not k.endswith("router.expert_bias")}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:6]
        raise ValueError(f"internal error: OLMo-core's model does not match the converted tensors: {diff}")
    return {"model": tc.as_config_dict()}, "checked against OLMo-core's model classes; wrote its config.json"


_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                       "merges.txt", "tokenizer.model", "tokenizer_meta.json")


def _olmo2_to_hf(args, out: Path) -> str:
    """``--input`` a Hugging Face olmo2 directory: our dense flex_olmo checkpoint, streamed tensor by tensor."""
    import shutil

    import torch

    from flexmoe_kernels.models.checkpoint import ShardWriter, parse_size, write_config
    from flexmoe_kernels.models.olmo2 import open_olmo2
    from flexmoe_kernels.utils.fs import atomic_directory, write_json_atomic

    from ..modeling import ModelSpecError, check_fits
    from ..runlog import utc_now

    if args.config:
        raise ValueError("--config does not apply to an olmo2 --input (its config.json is complete)")
    try:
        cfg, src = open_olmo2(args.input, "--input")
        check_fits(cfg, {k: src.shape(k) for k in src})
    except ModelSpecError as exc:
        raise ValueError(f"--input {args.input!r}: {exc}") from exc
    dt = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shard = parse_size(args.max_shard_size, "--max-shard-size")
    items = ((k, src[k] if dt is None else src[k].to(dt)) for k in src)
    with atomic_directory(out) as ck:
        writer = ShardWriter(ck, shard)
        for k, v in items:
            dt = dt or v.dtype
            writer.add(k, v)
        writer.finish()
        write_config(ck, cfg, dt or torch.float32)
        for name in _HF_TOKENIZER_FILES:
            if (Path(args.input) / name).is_file():
                shutil.copyfile(Path(args.input) / name, ck / name)
        write_json_atomic(ck / "run.json", {
            "command": "convert", "argv": sys.argv[1:], "status": "finished", "time": utc_now(),
            "from": "olmo2", "input": str(Path(args.input).resolve())})
    return (f"convert: HF olmo2 ({cfg.num_hidden_layers} layers, D={cfg.hidden_size}, F={cfg.intermediate_size}, "
            f"{'tied' if cfg.tie_word_embeddings else 'untied'} head) -> our dense public model (flex_olmo, "
            f"expert 'public') in {out}")


def _to_olmo_core(args, out: Path) -> str:
    from flexmoe_kernels.models.olmo_core import OUR_CONFIG_FILE, hf_to_olmo_core, write_olmo_core
    from flexmoe_kernels.utils.fs import atomic_directory, write_json_atomic

    from ..modeling import load_checkpoint
    from ..runlog import utc_now

    if args.config:
        raise ValueError("--config applies to --to hf only")
    cfg, sd = load_checkpoint(args.input, "--input")
    layout = args.expert_layout
    if layout == "auto":  # the layout it was converted from, else FlexOlmo's
        layout = _recorded_layout(Path(args.input)) or "mlp"
    oc = hf_to_olmo_core(_cast(sd, args.dtype), cfg, expert_layout=layout, what=f"--input {args.input!r}")
    oc_config, note = _olmo_core_config(cfg, oc, layout)
    with atomic_directory(out) as d:
        write_olmo_core(oc, d, args.format)
        write_json_atomic(d / OUR_CONFIG_FILE, cfg.to_dict())
        if oc_config is not None:
            write_json_atomic(d / "config.json", oc_config)
        write_json_atomic(d / "run.json", {
            "command": "convert", "argv": sys.argv[1:], "status": "finished", "time": utc_now(),
            "from": "hf", "input": str(Path(args.input).resolve()), "format": args.format,
            "olmo_core_expert_layout": layout})
    what = "model.pt" if args.format == "pt" else "a distributed checkpoint (keys model.*)"
    return (f"convert: HF ({cfg.num_hidden_layers} layers, E={cfg.num_experts}, expert bias "
            f"{'kept' if cfg.expert_bias else 'absent'}) -> OLMo-core {what} ({layout} experts) in {out}\n"
            f"convert: {note}")


@guard
def run(args) -> int:
    """Convert ``--input`` into ``--out`` in the ``--to`` layout; exit status 0, or 2 naming the bad argument."""
    config_file = args.config if args.config and Path(args.config).exists() else None  # else a preset name
    check_output(args.out, [("--input", args.input), ("--config", config_file)])
    out = Path(args.out).resolve()
    check_out_free(out, args.overwrite)
    if args.to == "hf" and args.format != "pt":
        raise ValueError("--format applies to --to olmo-core only")
    from flexmoe_kernels.models.olmo2 import is_olmo2_checkpoint

    if args.to == "hf" and is_olmo2_checkpoint(args.input):
        print(_olmo2_to_hf(args, out))
        return 0
    if args.to == "olmo-core" and is_olmo2_checkpoint(args.input):
        raise ValueError(f"--input {args.input!r} is a Hugging Face olmo2 checkpoint: convert it with --to hf")
    print(_to_hf(args, out) if args.to == "hf" else _to_olmo_core(args, out))
    return 0
