"""``flexmoe plan``: per-rank GPU memory of a training run (parameters, gradients, optimizer state,
activations) under DeepSpeed ZeRO 0-3, for a dense, coupled (FlexOlmo owner), MoE or router-tuning
model. The estimator and its assumptions: :mod:`flexmoe_training.memory`."""
from __future__ import annotations

import json
import math

from .common import DefaultsOnceFormatter, add_command, guard, require

DESCRIPTION = """\
Per-rank memory of training --model-config on --gpus x --nodes ranks at ZeRO --zero-stage, and
whether it fits --gpu-memory-gib. Kinds: dense (everything trains), coupled (an owner's 2-expert
model built from the dense config: frozen embeddings, attention, norms, LM head, public expert
and r_public hold no gradient or optimizer state; counted with the trainer's own freezing
function), moe (a standard MoE, everything trains; --num-experts), router-tuning (only router
rows and non-public biases train, top-k = all experts). Assumptions: bf16 parameters and
gradients, AdamW with an fp32 master copy, two fp32 moments and an fp32 gradient copy (16
bytes per trainable parameter), no CPU offload; activations per block as in
flexmoe_training.memory. GiB = 2**30."""


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:10.2f} GiB"


def _billions(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e7 else f"{n:,}"


def format_plan(p: dict) -> str:
    """The human-readable table of a :func:`~flexmoe_training.memory.plan_memory` result."""
    c, b, a, w = p["params"], p["bytes_per_rank"], p["activations"], p["world"]
    shard = {s: (f"/ {w}" if p["zero_stage"] >= s else "replicated") for s in (1, 2, 3)}
    ckpt = "on (block inputs + one block)" if p["activation_checkpointing"] else "off"
    experts = f"{p['num_experts']} expert" + ("s" if p["num_experts"] > 1 else "")
    lines = [
        f"flexmoe plan: {p['model_config']} as {p['kind']} ({experts}, top-{p['top_k']}, "
        f"{p['layers']} layers, D {p['hidden']}, V {p['vocab']})",
        f"  ranks {w} ({p['nodes']} node(s) x {p['gpus_per_node']} GPUs), ZeRO {p['zero_stage']}, micro-batch "
        f"{p['micro_batch_size']} x seq {p['seq_len']} = {a['tokens']} tokens/rank, activation checkpointing {ckpt}",
        f"  parameters {_billions(c['total'])} total, {_billions(c['trainable'])} trainable "
        f"({100.0 * c['trainable'] / c['total']:.3g}%), largest module {_billions(c['largest_module'])}",
        "",
        f"  {'per rank':<52}{'memory':>14}   sharding",
        f"  {'parameters (bf16, 2 B x all)':<52}{_gib(b['parameters'])}   {shard[3]}",
        f"  {'gradients (bf16, 2 B x trainable)':<52}{_gib(b['gradients'])}   {shard[2]}",
        f"  {'optimizer (fp32 master+m+v+grad, 16 B x trainable)':<52}{_gib(b['optimizer'])}   {shard[1]}",
        f"  {'ZeRO-3 gathered module (4 B x largest)':<52}{_gib(b['zero3_gather'])}",
        f"  {'activations (bf16)':<52}{_gib(b['activations'])}   "
        f"blocks {a['blocks'] / 2 ** 30:.2f} + head {a['head'] / 2 ** 30:.2f} GiB"
        + (" (fused cross-entropy)" if p.get("fused_cross_entropy") else ""),
        f"  {'total':<52}{_gib(b['total'])}",
        f"  {'GPU memory (--gpu-memory-gib)':<52}{_gib(p['gpu_memory_bytes'])}   "
        + ("fits" if p["fits"] else "DOES NOT FIT"),
        "",
        "  assumptions:",
    ]
    lines += [f"    - {s}" for s in p["assumptions"]]
    return "\n".join(lines)


H100_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor cores (NVIDIA's datasheet figure without sparsity)


def measured_tflops(path: str) -> float:
    """Achieved TFLOP/s per GPU from ``--measured-tflops FILE``: a JSON object with
    ``tflops_per_gpu``, or a JSONL file (e.g. a run's ``metrics.jsonl``) whose records carry
    ``tflops_per_gpu`` (their median). ``ValueError`` naming the flag and the file otherwise."""
    import statistics
    from pathlib import Path

    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"--measured-tflops {path!r} does not exist")
    text = f.read_text()
    values = []
    try:
        obj = json.loads(text)
        objs = [obj] if isinstance(obj, dict) else []
    except json.JSONDecodeError:
        objs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    objs.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"--measured-tflops {path!r}: line {n} is not JSON ({exc.msg})") from None
    for o in objs:
        v = o.get("tflops_per_gpu") if isinstance(o, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            values.append(float(v))
    if not values:
        raise ValueError(f"--measured-tflops {path!r}: no positive 'tflops_per_gpu' value (a JSON object with it, "
                         "or JSON lines such as a run's metrics.jsonl)")
    return statistics.median(values)


def throughput(plan: dict, *, grad_accum: int, mfu: float, peak_tflops: float, measured: float | None,
               measured_from: str | None, tokens: float | None, tokens_from: str | None) -> dict:
    """Estimated step time, tokens/s and GPU-hours of ``plan`` (a :func:`plan_memory` dict) from
    stated assumptions: the training FLOPs per token (flexmoe_training.flops, the trainer's own
    formula, with the kind's trainable weights) over ``measured`` TFLOP/s per GPU, else
    ``mfu x peak_tflops``."""
    from ..flops import flops_per_token
    from ..memory import build_config

    cfg, kind = build_config(plan["model_config"], plan["kind"], plan["num_experts"] if plan["num_experts"] > 1
                             and plan["kind"] == "moe" else None, None)
    cfg = cfg.copy(num_experts_per_tok=plan["top_k"], extra=dict(cfg.extra))
    L, D, F, E = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    trainable_mm = {"coupled": 3.0 * D * F * L * (E - 1), "router-tuning": float(E * D * L)}.get(kind)
    fpt = flops_per_token(cfg, plan["seq_len"], trainable_mm)
    per_gpu = measured if measured is not None else mfu * peak_tflops
    step_tokens = plan["micro_batch_size"] * plan["seq_len"] * plan["world"] * grad_accum
    step_s = step_tokens * fpt / (plan["world"] * per_gpu * 1e12)
    out = {"flops_per_token": fpt, "tflops_per_gpu": per_gpu,
           "source": (f"measured, {measured_from}" if measured is not None
                      else f"assumed MFU {mfu:g} x {peak_tflops:g} TFLOP/s peak per GPU"),
           "grad_accum": grad_accum, "tokens_per_step": step_tokens, "step_s": step_s,
           "tokens_per_s": step_tokens / step_s, "world": plan["world"]}
    if tokens:
        gpu_h = tokens * fpt / (per_gpu * 1e12) / 3600
        out.update({"recipe_tokens": tokens, "recipe_tokens_from": tokens_from, "gpu_hours": gpu_h,
                    "wall_hours": gpu_h / plan["world"], "steps": math.ceil(tokens / step_tokens)})
    return out


def _recipe_tokens(kind: str):
    """The paper's tokens for ``kind`` from training/configs/recipe_flexolmo_7b.json (coupled:
    train-expert's, router-tuning: tune-router's), else None."""
    from ..modeling import PRESET_DIR

    command = {"coupled": "train-expert", "router-tuning": "tune-router"}.get(kind)
    if command is None:
        return None, None
    rec = json.loads((PRESET_DIR / "recipe_flexolmo_7b.json").read_text())
    n = rec.get("_tokens", {}).get(command)
    return (float(n), f"recipe_flexolmo_7b.json ({command})") if n else (None, None)


def _parts(b: dict) -> str:
    return (f"params {b['parameters'] / 2 ** 30:.2f} + grads {b['gradients'] / 2 ** 30:.2f} + optimizer "
            f"{b['optimizer'] / 2 ** 30:.2f} + gather {b['zero3_gather'] / 2 ** 30:.2f} + activations "
            f"{b['activations'] / 2 ** 30:.2f} GiB")


def format_extras(p: dict) -> str:
    """The lines after the table: what would fit, checkpoints, merge, inference, throughput."""
    lines = []
    if not p["fits"]:
        if p["suggestions"]:
            lines.append("  does not fit; the smallest changes that fit (per rank):")
            for i, s in enumerate(p["suggestions"], 1):
                ch = ", ".join(f"{flag} {old} -> {new}" if flag != "--activation-checkpointing" else f"{flag} on"
                               for flag, old, new in s["changes"])
                acc = s["grad_accum_factor"]
                keep = ("" if acc == 1 else f"; keep the global batch with --grad-accum x{acc:g}" if acc > 1
                        else f"; the global batch grows x{1 / acc:g} (or --grad-accum / {1 / acc:g})")
                lines.append(f"    {i}. {ch}: {s['bytes_per_rank']['total'] / 2 ** 30:.2f} GiB of "
                             f"{s['gpu_memory_gib']:g} on each of {s['world']} ranks ({_parts(s['bytes_per_rank'])})"
                             f"{keep}")
        else:
            lines.append("  does not fit, and no change of ZeRO stage, checkpointing, micro-batch or up to 128x the "
                         "GPUs fits (CPU offload is not modelled)")
        lines.append("")
    ck, mg, inf, tp = p["checkpoints"], p["merge_host"], p["inference"], p["throughput"]
    g = 2 ** 30
    lines.append(f"  checkpoints on disk (bf16 safetensors): this model {ck['model'] / g:.2f} GiB, the dense public "
                 f"model {ck['public'] / g:.2f} GiB, one owner (2 experts) {ck['owner'] / g:.2f} GiB")
    if mg["owners"]:
        lines.append(f"  merge host memory ({mg['owners'] + 1} experts: public + {mg['owners']} owners read whole, "
                     f"merged expert tensors built): {mg['total'] / g:.2f} GiB (public {mg['public'] / g:.2f} + owners "
                     f"{mg['owners_total'] / g:.2f} + merged experts {mg['merged_moe'] / g:.2f})")
    need = math.ceil(inf["total"] / p["gpu_memory_bytes"])
    lines.append(f"  inference (bf16, all {p['num_experts']} expert(s) resident): weights {inf['weights'] / g:.2f} GiB "
                 f"+ KV cache {inf['kv_cache'] / g:.2f} GiB (batch {inf['batch']} x context {inf['context']}, "
                 f"{inf['kv_per_token'] / 1024:.0f} KiB/token) = {inf['total'] / g:.2f} GiB: "
                 + ("fits one GPU" if need <= 1 else f"needs {need} GPUs of {p['gpu_memory_gib']:g} GiB"))
    what = "this run" if p["fits"] or not p["suggestions"] else "suggestion 1"
    lines.append(f"  throughput of {what} ({tp['source']}; {tp['tflops_per_gpu']:.0f} TFLOP/s per GPU): "
                 f"{tp['flops_per_token'] / 1e9:.1f} GFLOP/token (training), step of {tp['tokens_per_step']:,} tokens "
                 f"(--grad-accum {tp['grad_accum']}) {tp['step_s']:.2f} s, {tp['tokens_per_s']:,.0f} tokens/s on "
                 f"{tp['world']} GPUs")
    if "gpu_hours" in tp:
        lines.append(f"  recipe: {tp['recipe_tokens']:.3g} tokens ({tp['recipe_tokens_from']}) = {tp['steps']:,} steps, "
                     f"{tp['gpu_hours']:,.0f} GPU-hours ({tp['wall_hours']:,.1f} h on {tp['world']} GPUs)")
    return "\n".join(lines)


@guard
def run(args) -> int:
    """Compute the plan, print the table (or JSON); exit status 0 whether or not it fits."""
    import math
    import sys

    from ..memory import H100_USABLE_GIB, plan_memory

    flag, gib = "--gpu-memory-gib", args.gpu_memory_gib
    if args.gpu_memory_gb is not None:
        if gib is not None:
            raise ValueError("give --gpu-memory-gib only (--gpu-memory-gb is its deprecated alias)")
        flag, gib = "--gpu-memory-gb", args.gpu_memory_gb
        print("flexmoe plan: --gpu-memory-gb is deprecated (its value is GiB): use --gpu-memory-gib", file=sys.stderr)
    if gib is not None and not (math.isfinite(gib) and gib > 0):
        raise ValueError(f"{flag} must be a finite number of GiB above 0 (one GPU's memory, e.g. "
                         f"{H100_USABLE_GIB} for an H100 80GB), got {gib!r}")
    plan = plan_memory(args.model_config, gpus=args.gpus, nodes=args.nodes, zero_stage=args.zero_stage,
                       kind=args.kind, micro_batch=args.micro_batch_size, seq_len=args.seq_len,
                       checkpointing=args.activation_checkpointing,
                       **({} if gib is None else {"gpu_memory_gib": gib}),
                       num_experts=args.num_experts, top_k=args.top_k, fused_cross_entropy=args.fused_cross_entropy)
    _extend(plan, args)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan) + "\n\n" + format_extras(plan))
    return 0


def _extend(plan: dict, args) -> None:
    """Add suggestions, checkpoint / merge / inference memory and throughput to ``plan``."""
    from ..memory import build_config, checkpoint_bytes, inference_bytes, merge_host_bytes, suggest_fits

    for flag, v in (("--grad-accum", args.grad_accum), ("--infer-batch", args.infer_batch)):
        if v < 1:
            raise ValueError(f"{flag} must be a positive integer, got {v}")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
    if not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        raise ValueError(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    if args.context is not None and args.context < 1:
        raise ValueError(f"--context must be a positive integer, got {args.context}")
    if args.tokens is not None and not args.tokens > 0:
        raise ValueError(f"--tokens must be positive, got {args.tokens}")
    plan["suggestions"] = [] if plan["fits"] else suggest_fits(
        args.model_config, gpus=args.gpus, nodes=args.nodes, zero_stage=args.zero_stage, kind=args.kind,
        micro_batch=args.micro_batch_size, seq_len=plan["seq_len"], checkpointing=args.activation_checkpointing,
        gpu_memory_gib=plan["gpu_memory_gib"], num_experts=args.num_experts, top_k=args.top_k,
        fused_cross_entropy=args.fused_cross_entropy)
    cfg, kind = build_config(args.model_config, args.kind, args.num_experts, args.top_k)
    plan["checkpoints"] = checkpoint_bytes(cfg, kind)
    merged = cfg if kind != "router-tuning" else cfg  # the merged model a merge into E experts writes
    plan["merge_host"] = merge_host_bytes(merged) if cfg.num_experts > 1 and kind != "coupled" else {"owners": 0}
    plan["inference"] = inference_bytes(cfg, args.infer_batch, args.context or plan["seq_len"])
    measured = measured_tflops(args.measured_tflops) if args.measured_tflops else None
    tokens, tokens_from = (args.tokens, "--tokens") if args.tokens else _recipe_tokens(kind)
    basis = plan if plan["fits"] or not plan["suggestions"] else plan["suggestions"][0]
    accum = args.grad_accum if basis is plan else max(1, round(args.grad_accum * basis["grad_accum_factor"]))
    plan["throughput"] = throughput(basis, grad_accum=accum, mfu=args.mfu, peak_tflops=args.peak_tflops,
                                    measured=measured, measured_from=args.measured_tflops, tokens=tokens,
                                    tokens_from=tokens_from)


def register(sub) -> None:
    """Add ``flexmoe plan``."""
    from ..memory import H100_USABLE_GIB, KINDS

    p = add_command(sub, "plan", run, help="per-rank GPU memory of a training run under ZeRO 0-3",
                    description=DESCRIPTION)
    p.formatter_class = DefaultsOnceFormatter
    require(p, "--model-config", help="a preset name (training/configs/model_<name>.json) or a JSON file")
    require(p, "--gpus", type=int, help="GPUs per node (the data-parallel ranks are --gpus x --nodes)")
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--zero-stage", type=int, required=True, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument("--kind", choices=list(KINDS), default=None,
                   help="what trains (default: dense for a 1-expert config, moe otherwise)")
    p.add_argument("--num-experts", type=int, default=None, help="override the config's number of experts E")
    p.add_argument("--top-k", type=int, default=None, help="override the config's top-k (default with "
                                                          "--num-experts: 2, or 1 for one expert)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per rank per micro-step")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the model's max_position_embeddings)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="per-block activation checkpointing (keep only block inputs)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, metavar="GIB",
                   help=f"memory of one GPU in GiB (2**30 bytes; default {H100_USABLE_GIB}: an H100 80GB, whose "
                        "total nvidia-smi reports as 81559 MiB = 79.65 GiB, not 80)")
    p.add_argument("--gpu-memory-gb", type=float, default=None, metavar="GIB",
                   help="deprecated alias of --gpu-memory-gib: its value is GiB too, despite the name")
    p.add_argument("--fused-cross-entropy", action="store_true",
                   help="the run computes the loss with the fused linear cross-entropy (the Hugging Face path's "
                        "enable_fused_cross_entropy; flexmoe's own trainer does not use it): no (T, V) logits")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes per rank)")
    g = p.add_argument_group("throughput and inference (estimates from stated assumptions)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (tokens per step)")
    g.add_argument("--mfu", type=float, default=0.4,
                   help="assumed model FLOPs utilisation (training FLOPs / peak; recomputation inside it)")
    g.add_argument("--peak-tflops", type=float, default=H100_PEAK_TFLOPS,
                   help="peak dense bf16 TFLOP/s of one GPU (default: H100 SXM)")
    g.add_argument("--measured-tflops", default=None, metavar="FILE",
                   help="achieved TFLOP/s per GPU instead of --mfu: a JSON object with tflops_per_gpu, or JSON "
                        "lines with it (a run's metrics.jsonl: their median)")
    g.add_argument("--tokens", type=float, default=None,
                   help="tokens of the run for GPU-hours (default: the paper's, recipe_flexolmo_7b.json, for "
                        "--kind coupled (50e9) and router-tuning (5e9))")
    g.add_argument("--infer-batch", type=int, default=1, help="sequences served at once, for the KV cache")
    g.add_argument("--context", type=int, default=None, help="tokens per served sequence (default: --seq-len)")
