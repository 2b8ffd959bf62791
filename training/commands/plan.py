"""``flexmoe plan``: per-rank GPU memory of a training run (parameters, gradients, optimizer state,
activations) under DeepSpeed ZeRO 0-3, for a dense, coupled (FlexOlmo owner), MoE or router-tuning
model. The estimator and its assumptions: :mod:`flexmoe_training.memory`."""
from __future__ import annotations

import json

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
        f"blocks {a['blocks'] / 2 ** 30:.2f} + head {a['head'] / 2 ** 30:.2f} GiB",
        f"  {'total':<52}{_gib(b['total'])}",
        f"  {'GPU memory (--gpu-memory-gib)':<52}{_gib(p['gpu_memory_bytes'])}   "
        + ("fits" if p["fits"] else "DOES NOT FIT"),
        "",
        "  assumptions:",
    ]
    lines += [f"    - {s}" for s in p["assumptions"]]
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
                       num_experts=args.num_experts, top_k=args.top_k)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


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
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes per rank)")
