"""Per-rank GPU memory of a training run under DeepSpeed ZeRO 0-3: the estimator behind ``flexmoe plan``.

Legend: L layers, D hidden, F expert width, E experts, K top-k, H query heads, G key/value heads,
hd head dim, V vocabulary, B micro-batch (sequences per rank), S sequence length, T = B*S tokens
per rank, N data-parallel ranks (GPUs per node x nodes), P all parameters, P_t trainable ones.

Assumptions (printed by ``flexmoe plan`` too; they are the trainer's, training/configs/zero*.json):

* Mixed precision as DeepSpeed runs it with ``bf16.enabled``: every parameter (frozen ones too)
  is held in bf16 on the GPU (2 bytes); gradients are bf16 (2 bytes per trainable parameter).
* AdamW with an fp32 master copy (4), two fp32 moments (4 + 4) and the fp32 copy of the gradient
  partition the optimizer steps on (4): 16 bytes per trainable parameter, called "optimizer".
  (DeepSpeed's ZeRO-1/2 optimizer and its bf16 optimizer for stage 0 make that fp32 gradient,
  ZeRO-3 makes it per sub-group at the step.) Frozen parameters have no gradient and no
  optimizer state (they are not in the optimizer).
* ZeRO sharding over N ranks: stage 0 replicates everything; 1 shards the optimizer state; 2
  also the gradients; 3 also the parameters, and then a rank gathers one module's full bf16
  parameters and gradients at a time: 4 bytes x the largest module's own parameters (DeepSpeed's
  ``largest_layer_memory``). Shards are rounded up. No CPU offload.
* Not counted: communication buckets (``reduce_bucket_size``, prefetch), the CUDA context and
  allocator fragmentation (keep a few GiB free), data loader buffers.

The parameter counts are closed-form (:func:`param_counts`), so any size answers at once (building
even the meta-device model takes time linear in the layers and the head dimension: 1e6 layers
never finished). Which tensors train follows the real freezing functions of
:mod:`flexmoe_training.modeling`: ``coupled`` (an owner's 2-expert model)
``freeze_for_expert_training``, ``router-tuning`` ``freeze_for_router_tuning`` (and top-k = E, as
``tune-router`` trains); ``dense`` and ``moe`` train everything (a dense model's one-row router is
frozen, as ``train-public`` does). :func:`param_counts_meta` applies those functions to the model
built on the meta device; ``tests/test_plan.py`` checks both counts equal for every preset and kind.

Activations (saved for the backward, in the activation dtype, bf16 = 2 bytes; fp32 where noted),
per token and per decoder block of this model (post-norm block, QK-norm attention through SDPA or
flash-attention, which keep only the log-sum-exp per head, never an S x S matrix):

* attention: the block input x (D, read by q/k/v), q and k before their RMSNorm and v
  (H*hd + 2*G*hd), q and k after norm and RoPE (H*hd + G*hd), the attention output o (H*hd,
  the o_proj input), the o_proj output (D, the post-attention norm input): 2D + 3H*hd + 3G*hd;
  plus the softmax log-sum-exp, H floats in fp32;
* MoE: h (D, router input and residual), the routed rows K*D, the gate/up output K*2F, the
  SwiGLU output K*F (the down_proj input), the expert outputs K*D (the combine weights'
  gradient), the MoE output (D, the post-FFN norm input): 2D + 2K*D + 3K*F; plus the router
  logits and probabilities, 2E floats in fp32.

So ``block = 2*(4D + 3H*hd + 3G*hd + 2K*D + 3K*F) + 4*(H + 2E)`` bytes per token, and the head
(final norm input D, bf16 logits V, their fp32 copy and its fp32 log-softmax) ``2D + 10V``.
Without checkpointing: ``T * (L*block + head)``. With per-block activation checkpointing a
block keeps only its input (D per token) and the backward recomputes one block at a time:
``T * (L*2D + block + head)``. The same formula serves every kind: for a coupled model it is an
upper bound (a frozen projection does not keep its input for a weight gradient).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .modeling import ModelSpecError, freeze_for_expert_training, freeze_for_router_tuning, load_model_config

__all__ = ["KINDS", "ASSUMPTIONS", "BYTES", "GIB", "H100_USABLE_GIB", "ParamCounts", "build_config", "param_counts", "param_counts_meta",
           "model_state_bytes", "activation_bytes", "plan_memory"]

KINDS = ("dense", "coupled", "moe", "router-tuning")
GIB = 2 ** 30
# One H100 80GB (SXM, HBM3): nvidia-smi reports 81559 MiB in total = 79.65 GiB, not 80 (the "80GB"
# is marketing gigabytes and rounding); the CUDA context takes a little more at run time.
H100_USABLE_GIB = 79.6
# Bytes per parameter: bf16 parameter and gradient; optimizer = fp32 master + m + v + fp32 gradient.
BYTES = {"param": 2, "grad": 2, "optimizer": 4 + 4 + 4 + 4, "gather": 2 + 2, "act": 2}
ASSUMPTIONS = (
    "bf16 mixed precision: every parameter (frozen too) held in bf16 (2 B), bf16 gradients (2 B per trainable)",
    "AdamW: fp32 master (4 B) + 2 fp32 moments (8 B) + the fp32 gradient copy it steps on (4 B) = 16 B "
    "per trainable parameter; frozen tensors have no gradient and no optimizer state",
    "ZeRO 0 replicates all; 1 shards the optimizer; 2 + gradients; 3 + parameters, plus one gathered "
    "module (bf16 params + grads of the largest module); no CPU offload",
    "activations in bf16, fp32 softmax/router stats; SDPA/flash attention (no S^2); see flexmoe_training.memory",
    "not counted: communication buckets, CUDA context, allocator fragmentation (keep a few GiB free)",
)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model as one rank sees them before sharding."""

    total: int            # all parameters (a tied LM head counted once)
    trainable: int        # requires_grad after the kind's freezing function
    largest_module: int   # the most parameters one module owns directly (ZeRO-3 gathers it whole)


def build_config(spec: str, kind: str | None, num_experts: int | None = None, top_k: int | None = None):
    """(FlexOlmoConfig, kind) for ``--model-config spec`` and ``--kind``; ``None`` kind: dense for a
    1-expert config, moe otherwise. ``ModelSpecError`` naming the flag for a bad combination."""
    if kind is not None and kind not in KINDS:
        raise ModelSpecError(f"--kind must be one of {KINDS}, got {kind!r}")
    over = {}
    if num_experts is not None:
        if num_experts < 1:
            raise ModelSpecError(f"--num-experts must be >= 1, got {num_experts}")
        over["num_experts"] = num_experts
        over["num_experts_per_tok"] = min(2, num_experts) if top_k is None else top_k
        over["expert_names"] = None
    elif top_k is not None:
        over["num_experts_per_tok"] = top_k
    try:
        cfg = load_model_config(spec, **over)
    except ModelSpecError as exc:
        if "num_experts_per_tok" in str(exc):
            raise ModelSpecError(f"--top-k: {exc}") from exc
        raise
    kind = kind or ("dense" if cfg.num_experts == 1 else "moe")
    if kind == "dense" and cfg.num_experts != 1:
        raise ModelSpecError(f"--kind dense needs a 1-expert model; --model-config {spec!r} has "
                             f"{cfg.num_experts} experts (use --kind moe or --num-experts 1)")
    if kind == "coupled":
        if cfg.num_experts not in (1, 2):
            raise ModelSpecError(f"--kind coupled is an owner's 2-expert model; --model-config {spec!r} has "
                                 f"{cfg.num_experts} experts (give the dense public model or a 2-expert one)")
        cfg = cfg.copy(num_experts=2, num_experts_per_tok=2, expert_bias=True, expert_names=["public", "owner"],
                       norm_topk_prob=False, extra=dict(cfg.extra))
    if kind in ("moe", "router-tuning") and cfg.num_experts < 2:
        raise ModelSpecError(f"--kind {kind} needs a model with experts: pass --num-experts E (>= 2) or a "
                             f"--model-config with num_experts >= 2")
    if kind == "router-tuning":  # tune-router trains with top-k = E (every expert active)
        cfg = cfg.copy(num_experts_per_tok=cfg.num_experts, extra=dict(cfg.extra))
    return cfg, kind


def param_counts(cfg, kind: str) -> ParamCounts:
    """The parameters of ``cfg`` frozen as ``kind`` trains it, in closed form (any size, at once).

    Per layer: attention ``D*(H + 2G)*hd + H*hd*D`` plus the q/k norms ``(H + G)*hd``, two norms
    ``2D``, the router ``E*D`` (+ ``E`` expert biases), the experts ``3*E*F*D``; plus the embedding
    ``V*D``, the final norm ``D`` and an untied LM head ``V*D``. Trainable: ``dense`` all but the
    one-row router, ``moe`` all, ``coupled`` the owner's rows ``(E-1)*(3FD + D + 1)`` per layer,
    ``router-tuning`` ``E*D`` router rows and ``E-1`` biases per layer. ``tests/test_plan.py``
    checks it equal to :func:`param_counts_meta` (the model built on the meta device and frozen by
    the trainer's own functions) for every preset and kind.
    """
    L, D, F, E = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    H, G, hd, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
    bias = E if cfg.expert_bias else 0
    experts, router = 3 * E * F * D, E * D + bias
    layer = D * (H + 2 * G) * hd + H * hd * D + (H + G) * hd + 2 * D + router + experts
    total = V * D + L * layer + D + (0 if cfg.tie_word_embeddings else V * D)
    if kind == "coupled":
        trainable = L * (E - 1) * (3 * F * D + D + (1 if bias else 0))
    elif kind == "router-tuning":
        trainable = L * (E * D + max(bias - 1, 0))
    elif kind == "dense":
        trainable = total - L * E * D
    else:
        trainable = total
    largest = max(V * D, experts, router, H * hd * D, G * hd * D, (H + G) * hd, D)
    return ParamCounts(total=total, trainable=trainable, largest_module=largest)


def param_counts_meta(cfg, kind: str) -> ParamCounts:
    """:func:`param_counts` by building ``cfg`` on the meta device and freezing it with the trainer's
    own functions (the reference the closed form is tested against; its time grows with the
    number of layers and the head dimension, so ``flexmoe plan`` does not use it)."""
    from flexmoe_kernels.models import FlexOlmoForCausalLM

    with torch.device("meta"):
        model = FlexOlmoForCausalLM(cfg)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    if kind == "coupled":
        freeze_for_expert_training(model)
    elif kind == "router-tuning":
        freeze_for_router_tuning(model)
    elif kind == "dense":
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):  # the one-row router has no effect (train-public freezes it)
                p.requires_grad_(False)
    params = list(model.parameters())  # deduplicated: a tied head counts once
    return ParamCounts(total=sum(p.numel() for p in params),
                       trainable=sum(p.numel() for p in params if p.requires_grad), largest_module=largest)


def _shard(n: int, ranks: int) -> int:
    return math.ceil(n / ranks)


def model_state_bytes(counts: ParamCounts, world: int, stage: int) -> dict:
    """Per-rank bytes of parameters, gradients, optimizer state and (ZeRO-3) the gathered module."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {stage}")
    if world < 1:
        raise ValueError(f"--gpus x --nodes must be >= 1, got {world}")
    param_ranks = world if stage >= 3 else 1
    grad_ranks = world if stage >= 2 else 1
    opt_ranks = world if stage >= 1 else 1
    return {
        "parameters": BYTES["param"] * _shard(counts.total, param_ranks),
        "gradients": BYTES["grad"] * _shard(counts.trainable, grad_ranks),
        "optimizer": BYTES["optimizer"] * _shard(counts.trainable, opt_ranks),
        "zero3_gather": BYTES["gather"] * counts.largest_module if stage >= 3 else 0,
    }


def block_bytes_per_token(cfg) -> int:
    """Bytes one decoder block saves for the backward per token (see the module docstring)."""
    D, F, E, K = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    H, G, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = 2 * D + 3 * H * hd + 3 * G * hd
    moe = 2 * D + 2 * K * D + 3 * K * F
    return BYTES["act"] * (attn + moe) + 4 * (H + 2 * E)


CE_CHUNK = 1024  # enable_fused_cross_entropy's default chunk of tokens


def activation_bytes(cfg, micro_batch: int, seq_len: int, checkpointing: bool, fused_ce: bool = False,
                     head_trainable: bool = True) -> dict:
    """Per-rank activation bytes at ``micro_batch`` sequences of ``seq_len`` tokens.

    ``fused_ce`` (the HF path's fused linear cross-entropy, flexmoe_kernels/ops/linear_cross_entropy.py):
    the head keeps the final hidden state and its gradient (``2 x 2D`` per token) instead of the
    logits, their fp32 copy and log-softmax, plus one fp32 chunk of ``CE_CHUNK x V`` logits and,
    when the LM head trains, its fp32 gradient ``4 x V x D`` (``head_fixed``)."""
    a, D, L, V = BYTES["act"], cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    tokens = micro_batch * seq_len
    block = block_bytes_per_token(cfg)
    if fused_ce:
        head = 2 * a * D
        fixed = 4 * min(CE_CHUNK, tokens) * V + (4 * V * D if head_trainable else 0)
    else:
        head, fixed = a * D + (a + 4 + 4) * V, 0
    blocks = L * a * D + block if checkpointing else L * block
    return {"tokens": tokens, "block_per_token": block, "head_per_token": head, "head_fixed": fixed,
            "blocks": tokens * blocks, "head": tokens * head + fixed, "total": tokens * (blocks + head) + fixed}


def plan_memory(spec: str, *, gpus: int, zero_stage: int, nodes: int = 1, kind: str | None = None,
                micro_batch: int = 1, seq_len: int | None = None, checkpointing: bool = False,
                gpu_memory_gib: float = H100_USABLE_GIB, num_experts: int | None = None, top_k: int | None = None,
                gpu_memory_gb: float | None = None, fused_cross_entropy: bool = False) -> dict:
    """The whole plan as a JSON-able dict (bytes per rank); errors name the ``flexmoe plan`` flag.

    ``gpu_memory_gib``: one GPU's memory in GiB (2**30 bytes; default an H100 80GB's, see
    :data:`H100_USABLE_GIB`). ``gpu_memory_gb`` is its deprecated alias (also GiB).
    """
    for flag, v in (("--gpus", gpus), ("--nodes", nodes), ("--micro-batch-size", micro_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{flag} must be a positive integer, got {v!r}")
    if gpu_memory_gb is not None:
        gpu_memory_gib = gpu_memory_gb
    if not (isinstance(gpu_memory_gib, (int, float)) and math.isfinite(gpu_memory_gib) and gpu_memory_gib > 0):
        raise ValueError(f"--gpu-memory-gib must be a finite number of GiB above 0, got {gpu_memory_gib!r}")
    cfg, kind = build_config(spec, kind, num_experts, top_k)
    seq_len = cfg.max_position_embeddings if seq_len is None else seq_len
    if seq_len < 1 or seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len must be in [1, {cfg.max_position_embeddings}] (the model's "
                         f"max_position_embeddings), got {seq_len}")
    counts = param_counts(cfg, kind)
    world = gpus * nodes
    states = model_state_bytes(counts, world, zero_stage)
    act = activation_bytes(cfg, micro_batch, seq_len, checkpointing, fused_cross_entropy,
                           head_trainable=kind in ("dense", "moe"))
    total = sum(states.values()) + act["total"]
    budget = int(gpu_memory_gib * GIB)
    return {
        "model_config": spec, "kind": kind, "num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
        "params": asdict(counts), "gpus_per_node": gpus, "nodes": nodes, "world": world,
        "zero_stage": zero_stage, "micro_batch_size": micro_batch, "seq_len": seq_len,
        "activation_checkpointing": checkpointing, "fused_cross_entropy": fused_cross_entropy, "bytes_per_rank": {**states, "activations": act["total"],
                                                                       "total": total},
        "activations": act, "gpu_memory_gib": gpu_memory_gib, "gpu_memory_bytes": budget, "fits": total <= budget,
        "assumptions": list(ASSUMPTIONS),
    }


# ---------------------------------------------------------------------------- what would fit
# Relative cost of each change (a smaller total is suggested first): a higher ZeRO stage costs
# communication, checkpointing ~ one more forward (about a third more compute), a smaller
# micro-batch lower GPU efficiency (the global batch is kept with more accumulation), more GPUs
# the most (hardware).
_CHANGE_COST = {"zero_stage": 1.0, "activation_checkpointing": 2.0, "micro_batch": 3.0, "world": 10.0}
WORLD_MULTIPLIERS = (1, 2, 4, 8, 16, 32, 64, 128)


def suggest_fits(spec: str, *, gpus: int, zero_stage: int, nodes: int = 1, kind: str | None = None,
                 micro_batch: int = 1, seq_len: int | None = None, checkpointing: bool = False,
                 gpu_memory_gib: float = H100_USABLE_GIB, num_experts: int | None = None,
                 top_k: int | None = None, limit: int = 3, fused_cross_entropy: bool = False) -> list[dict]:
    """The smallest changes that make the run fit ``gpu_memory_gib``: up to ``limit`` plans
    (:func:`plan_memory` dicts plus ``"changes"``: a list of ``(flag, old, new)``), fewest changed
    knobs first, then cheapest (:data:`_CHANGE_COST`). Knobs: a higher ZeRO stage, activation
    checkpointing on, a smaller micro-batch (halving down to 1), more GPUs (nodes x 2, 4, ...,
    128, GPUs per node kept). Empty when nothing in that space fits (or the run already fits)."""
    base = dict(spec=spec, kind=kind, seq_len=seq_len, gpu_memory_gib=gpu_memory_gib, num_experts=num_experts,
                top_k=top_k, fused_cross_entropy=fused_cross_entropy)
    mbs, m = [], micro_batch
    while m >= 1:
        mbs.append(m)
        m //= 2
    found = []
    for z in range(zero_stage, 4):
        for ck in sorted({checkpointing, True}):
            for mb in mbs:
                for mult in WORLD_MULTIPLIERS:
                    changes = []
                    if z != zero_stage:
                        changes.append(("--zero-stage", zero_stage, z))
                    if ck != checkpointing:
                        changes.append(("--activation-checkpointing", "off", "on"))
                    if mb != micro_batch:
                        changes.append(("--micro-batch-size", micro_batch, mb))
                    if mult != 1:
                        changes.append(("--nodes", nodes, nodes * mult))
                    if not changes:
                        continue
                    p = plan_memory(gpus=gpus, nodes=nodes * mult, zero_stage=z, micro_batch=mb, checkpointing=ck,
                                    **base)
                    if not p["fits"]:
                        continue
                    cost = (_CHANGE_COST["zero_stage"] * (z - zero_stage) + _CHANGE_COST["activation_checkpointing"]
                            * (ck != checkpointing) + _CHANGE_COST["micro_batch"] * math.log2(micro_batch / mb)
                            + _CHANGE_COST["world"] * math.log2(mult))
                    p["changes"] = changes
                    p["grad_accum_factor"] = micro_batch / mb / mult  # x grad-accum keeps the global batch
                    found.append(((len(changes), cost), p))
    found.sort(key=lambda t: t[0])
    out, seen = [], set()
    for _, p in found:  # the cheapest of each set of changed flags: alternatives, not bigger versions of one
        flags = frozenset(c[0] for c in p["changes"])
        if flags not in seen:
            seen.add(flags)
            out.append(p)
    return out[:limit]


# ---------------------------------------------------------------------------- beyond training memory
def checkpoint_bytes(cfg, kind: str, dtype_bytes: int = 2) -> dict:
    """Bytes on disk of the checkpoints around ``cfg`` (safetensors; headers not counted): the
    model itself, the dense public model it comes from and one owner's 2-expert model."""
    total = param_counts(cfg, kind).total
    pub = param_counts(cfg.copy(num_experts=1, num_experts_per_tok=1, expert_bias=False, expert_names=None,
                                extra={}), "dense").total
    owner = param_counts(cfg.copy(num_experts=2, num_experts_per_tok=2, expert_bias=True, expert_names=None,
                                  extra={}), "coupled").total
    return {"model": dtype_bytes * total, "public": dtype_bytes * pub, "owner": dtype_bytes * owner}


def merge_host_bytes(cfg, dtype_bytes: int = 2) -> dict:
    """Host (CPU) memory of ``flexmoe merge`` into ``cfg``'s E experts (public + E-1 owners): it
    reads the public model and every owner whole, and builds the merged MoE tensors (shared
    tensors are the public model's, not copied)."""
    E = cfg.num_experts
    ck = checkpoint_bytes(cfg, "moe", dtype_bytes)
    L, D, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    moe = dtype_bytes * L * E * (3 * F * D + D + 1)
    owners = max(E - 1, 0)
    return {"owners": owners, "public": ck["public"], "owners_total": owners * ck["owner"], "merged_moe": moe,
            "total": ck["public"] + owners * ck["owner"] + moe}


def inference_bytes(cfg, batch: int, context: int, dtype_bytes: int = 2) -> dict:
    """GPU memory to serve ``cfg``: all weights (every expert: opt-out is per request) and the KV
    cache, ``2 (K, V) x L x G x hd x dtype_bytes`` per token, at ``batch`` sequences of ``context``
    tokens. Not counted: the logits of a step, workspace, CUDA context."""
    weights = dtype_bytes * param_counts(cfg, "moe" if cfg.num_experts > 1 else "dense").total
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    kv = per_token * batch * context
    return {"batch": batch, "context": context, "weights": weights, "kv_per_token": per_token, "kv_cache": kv,
            "total": weights + kv}
