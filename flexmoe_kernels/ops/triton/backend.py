"""The "triton" backend of :func:`flexmoe_kernels.flexmoe_forward`: Triton routing + grouped
SwiGLU GEMMs, forward and backward, registered with ``torch.library`` for ``torch.compile``.

Stages: routing (:mod:`.routing`: softmax-top-k, grouping and the tile schedule in 1-3
launches); **permutation is fused** into the up-projection (x rows are gathered in the GEMM's
A load, no permuted copy of x); grouped GEMMs (:mod:`.grouped_gemm`); **combine is fused**
into the down-projection (router weight in the epilogue, then a fixed-order top-k sum, or
fp32 atomics with ``deterministic=False``).

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k, P = T*K pairs,
Q_max / NT the routing schedule's worst-case slot / tile counts.

Data flow of one layer call:

1. ``logits_TE = x_TD @ router_weight_ED.T`` in x's dtype (plain torch, so autograd gives
   d router weight = dlogits^T @ x and the dX contribution dlogits @ R, exactly like the
   reference);
2. ``torch.ops.flexmoe_triton.moe_fwd``: :func:`.routing.triton_route` (bias ``min(b, 0)``, allow-mask
   -inf before the fp32 softmax, top-k, padded tile schedule) -> up-projection with gathered x
   rows and fused SwiGLU -> down-projection with the router weight and the top-k combine fused
   (deterministic by default). Returns the output, the masked fp32 logits (z-loss), the
   gate/up pre-activation if the configs keep it (below; else an empty tensor) and the
   routing plan tensors (all O(T*K), O(T*E) or O(Q_max)).
3. ``torch.ops.flexmoe_triton.moe_bwd``: takes the kept pre-activation or recomputes it, then
   the dh GEMM with the SwiGLU backward in its epilogue, dX,
   dW (gate_up, down; frozen experts none), d router weights -> :func:`.routing.triton_route_backward`
   -> dlogits (+ the z-loss gradient of the returned logits) -> d bias (where ``bias <= 0``,
   the subgradient torch's ``clamp(max=0)`` uses) and d logits.

Both ops are functional custom ops with fake (meta) implementations, wrapped in one
``torch.autograd.Function``; no host synchronisation except the optional ``validate`` mask
check (skipped while a CUDA graph is captured). Option of this backend (a
:class:`~flexmoe_kernels.ops.args.LayerArgs` field): ``deterministic`` (None = from
``FLEXMOE_TRITON_DETERMINISTIC``, "1" if unset).

What the autograd function saves for the backward: x, the weights, bias / mask / trainable
flags, the plan tensors and, only when the launch configs say ``up.keep_preact`` (a config
field: the JSON tables or ``FLEXMOE_TRITON_CONFIG="up.keep_preact=1"``; default off), the
gate/up pre-activation ``pre_Q2F`` (Q_max, 2F) float32 (16-bit rounding of it made the
gradients less accurate: see :func:`.grouped_gemm.up_swiglu`): ``2 * F * K * 4`` bytes per
token per layer (+ at most ``E * (block_m - 1)`` padding rows), e.g. 48 KiB per token at the
fine-grained shape (F 768, K 8) and 430 KiB at FlexOlmo-7x7B (F 11008, K 5) against 4-8 KiB
for x itself (bytes and FLOPs of the backward options: docs/DESIGN.md). It saves the
backward's recompute GEMM (a third of the forward FLOPs).
Off by default: memory, not FLOPs, bounds FlexOlmo's batch, and without it the layer keeps
nothing of width F (not measured on a GPU yet).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..args import LayerArgs
from ..plan import RoutingPlan, TileSchedule, schedule_sizes
from ..reference.routing import mask_router_rows, router_logits
from . import launch
from .configs import MoEConfigs, get_configs

__all__ = ["is_available", "forward", "default_deterministic"]

_NS = "flexmoe_triton"


def is_available(device: torch.device | str) -> tuple[bool, str]:
    """``(available, reason)``: Triton importable and a CUDA device, or CPU tensors with
    Triton's interpreter active (``TRITON_INTERPRET=1`` before the kernels were imported)."""
    return launch.is_available(torch.device(device))


def default_deterministic() -> bool:
    """``FLEXMOE_TRITON_DETERMINISTIC`` ("1"/"0", default "1"): fixed-order top-k combine."""
    v = os.environ.get("FLEXMOE_TRITON_DETERMINISTIC", "1").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable FLEXMOE_TRITON_DETERMINISTIC must be 0 or 1, got {v!r}")


# ------------------------------------------------------------------ the custom ops
# The plan travels between the two custom ops as a flat tensor list in this order.
_PLAN_FIELDS = (
    "topk_ids_TK", "topk_weights_TK", "probs_TE", "counts_E", "offsets_E1", "sorted_pairs_P",
    "inv_sorted_pairs_P",
)
_SCHEDULE_FIELDS = ("padded_pairs_Q", "padded_offsets_E1", "tile_expert_E_tiles", "num_tiles")


def _configs(x_TD: torch.Tensor, gate_up_E2FD: torch.Tensor, top_k: int) -> MoEConfigs:
    """The launch configs of this problem (:func:`.configs.get_configs`): the schedule's tile
    height ``block_m`` and whether the forward keeps the pre-activation (``up.keep_preact``)."""
    T, D = x_TD.shape
    E, F2, _ = gate_up_E2FD.shape
    return get_configs(T, D, F2 // 2, E, top_k, x_TD.dtype, x_TD.device)


def _det(flag: int) -> bool:
    return default_deterministic() if flag < 0 else bool(flag)


def _plan_tensors(plan: RoutingPlan) -> list[torch.Tensor]:
    return [getattr(plan, f) for f in _PLAN_FIELDS] + [getattr(plan.schedule, f) for f in _SCHEDULE_FIELDS]


def _plan_from(tensors, logits_TE: torch.Tensor) -> RoutingPlan:
    n = len(_PLAN_FIELDS)
    sched = dict(zip(_SCHEDULE_FIELDS, tensors[n:]))
    block_m = sched["padded_pairs_Q"].shape[0] // sched["tile_expert_E_tiles"].shape[0]  # Q_max // NT
    return RoutingPlan(logits_TE=logits_TE, schedule=TileSchedule(block_m=block_m, **sched),
                       **dict(zip(_PLAN_FIELDS, tensors[:n])))


@torch.library.custom_op(f"{_NS}::moe_fwd", mutates_args=())
def _moe_fwd(
    x_TD: torch.Tensor,
    logits_TE: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    expert_bias: Optional[torch.Tensor],
    allow_mask: Optional[torch.Tensor],
    top_k: int,
    norm_topk_prob: bool,
    validate: bool,
    deterministic: int,
) -> list[torch.Tensor]:
    """[out_TD, zlogits_TE, preact_Q2F, *plan tensors in ``_PLAN_FIELDS`` order].
    ``deterministic``: 1, 0 or -1 (= :func:`default_deterministic`); the schedule's block_m
    and ``up.keep_preact`` come from the configs; ``preact_Q2F`` is (Q_max, 2F) when kept,
    else an empty (0,) tensor."""
    from .grouped_gemm import grouped_swiglu_forward
    from .routing import triton_route

    ok, why = is_available(x_TD.device)
    if not ok:
        raise RuntimeError(f"backend 'triton' is not available on {x_TD.device}: {why}")
    cfgs = _configs(x_TD, gate_up_E2FD, top_k)
    plan = triton_route(
        logits_TE, top_k, allow_mask=allow_mask, expert_bias=expert_bias,
        norm_topk_prob=norm_topk_prob, block_m=cfgs.block_m, validate=validate,
    )
    res = grouped_swiglu_forward(x_TD, plan, gate_up_E2FD, down_EDF, deterministic=_det(deterministic),
                                 keep_preact=cfgs.up.keep_preact)
    out_TD, pre_Q2F = res if cfgs.up.keep_preact else (res, x_TD.new_empty((0,)))
    return [out_TD, plan.logits_TE, pre_Q2F] + _plan_tensors(plan)


@_moe_fwd.register_fake
def _moe_fwd_fake(x_TD, logits_TE, gate_up_E2FD, down_EDF, expert_bias, allow_mask, top_k, norm_topk_prob,
                  validate, deterministic):
    T, E = logits_TE.shape
    cfgs = _configs(x_TD, gate_up_E2FD, top_k)
    K, P = top_k, logits_TE.shape[0] * top_k
    q_max, nt = schedule_sizes(T, K, E, cfgs.block_m)
    i32, f32 = torch.int32, torch.float32
    new = x_TD.new_empty
    return [
        new((T, x_TD.shape[1])), new((T, E), dtype=f32),
        new((q_max, gate_up_E2FD.shape[1]), dtype=f32) if cfgs.up.keep_preact else new((0,)),
        new((T, K), dtype=i32), new((T, K), dtype=f32), new((T, E), dtype=f32), new((E,), dtype=i32),
        new((E + 1,), dtype=i32), new((P,), dtype=i32), new((P,), dtype=i32), new((q_max,), dtype=i32),
        new((E + 1,), dtype=i32), new((nt,), dtype=i32), new((1,), dtype=i32),
    ]


@torch.library.custom_op(f"{_NS}::moe_bwd", mutates_args=())
def _moe_bwd(
    dout_TD: torch.Tensor,
    dz_TE: Optional[torch.Tensor],
    x_TD: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    expert_bias: Optional[torch.Tensor],
    allow_mask: Optional[torch.Tensor],
    trainable_experts: Optional[torch.Tensor],
    preact_Q2F: Optional[torch.Tensor],
    plan_tensors: list[torch.Tensor],
    logits_dtype: torch.dtype,
    norm_topk_prob: bool,
    deterministic: int,
    needs: list[bool],
) -> list[torch.Tensor]:
    """[dx_TD, dlogits_TE, dgate_up_E2FD, ddown_EDF, dbias_E]; an entry whose ``needs`` flag
    (same order) is False is an empty (0,) tensor. ``preact_Q2F``: the forward's kept
    pre-activation, or None / an empty tensor (recomputed)."""
    from .grouped_gemm import grouped_swiglu_backward
    from .routing import triton_route_backward

    need_dx, need_dlogits, need_dgu, need_ddown, need_dbias = needs
    plan = _plan_from(plan_tensors, plan_tensors[2])  # logits unused by the backward
    need_route = need_dlogits or need_dbias
    dx, dgu, ddown, dweights_TK = grouped_swiglu_backward(
        dout_TD, x_TD, plan, gate_up_E2FD, down_EDF, trainable_experts=trainable_experts,
        need_dx=need_dx, need_dgate_up=need_dgu, need_ddown=need_ddown, need_dweights=need_route,
        deterministic=_det(deterministic),
        preact_Q2F=preact_Q2F if preact_Q2F is not None and preact_Q2F.numel() else None,
    )

    def empty():  # a fresh (0,) tensor per unused slot: custom-op outputs must not alias
        return x_TD.new_empty((0,))

    dlogits = dbias = None
    if need_route:
        dz = triton_route_backward(dweights_TK, plan, norm_topk_prob=norm_topk_prob)  # (T, E) f32
        if dz_TE is not None:  # gradient of the returned masked logits (z-loss); 0 where masked
            ext = dz_TE.float()
            if allow_mask is not None:
                ext = torch.where(allow_mask, ext, torch.zeros((), dtype=ext.dtype, device=ext.device))
            dz = dz + ext
        if need_dlogits:
            dlogits = dz.to(logits_dtype)
        if need_dbias:
            b = expert_bias.float()
            dbias = torch.where(b <= 0, dz.sum(dim=0), torch.zeros((), device=dz.device)).to(expert_bias.dtype)
    return [g if g is not None else empty() for g in (dx, dlogits, dgu, ddown, dbias)]


@_moe_bwd.register_fake
def _moe_bwd_fake(dout_TD, dz_TE, x_TD, gate_up_E2FD, down_EDF, expert_bias, allow_mask, trainable_experts,
                  preact_Q2F, plan_tensors, logits_dtype, norm_topk_prob, deterministic, needs):
    need_dx, need_dlogits, need_dgu, need_ddown, need_dbias = needs
    T, E = plan_tensors[2].shape
    return [
        x_TD.new_empty(x_TD.shape) if need_dx else x_TD.new_empty((0,)),
        x_TD.new_empty((T, E), dtype=logits_dtype) if need_dlogits else x_TD.new_empty((0,)),
        gate_up_E2FD.new_empty(gate_up_E2FD.shape) if need_dgu else x_TD.new_empty((0,)),
        down_EDF.new_empty(down_EDF.shape) if need_ddown else x_TD.new_empty((0,)),
        expert_bias.new_empty(expert_bias.shape) if need_dbias else x_TD.new_empty((0,)),
    ]


class _TritonMoEFunction(torch.autograd.Function):
    """Autograd for the layer after the router matmul: inputs x, logits, gate_up, down, bias."""

    @staticmethod
    def forward(ctx, x_TD, logits_TE, gate_up_E2FD, down_EDF, expert_bias, allow_mask, trainable_experts,
                top_k, norm_topk_prob, validate, deterministic):
        res = torch.ops.flexmoe_triton.moe_fwd(
            x_TD, logits_TE, gate_up_E2FD, down_EDF, expert_bias, allow_mask,
            top_k, norm_topk_prob, validate, deterministic,
        )
        out_TD, z_TE, pre_Q2F, plan_tensors = res[0], res[1], res[2], list(res[3:])
        ctx.save_for_backward(x_TD, gate_up_E2FD, down_EDF, expert_bias, allow_mask, trainable_experts, pre_Q2F,
                              *plan_tensors)
        ctx.cfg = (logits_TE.dtype, norm_topk_prob, deterministic)
        ctx.set_materialize_grads(False)
        return out_TD, z_TE

    @staticmethod
    def backward(ctx, dout_TD, dz_TE):
        x_TD, gate_up, down, bias, allow_mask, trainable, pre_Q2F, *plan_tensors = ctx.saved_tensors
        logits_dtype, norm, deterministic = ctx.cfg
        nig = ctx.needs_input_grad
        needs = [bool(nig[0]), bool(nig[1]), bool(nig[2]), bool(nig[3]), bool(nig[4])]
        if not any(needs):
            return (None,) * 11
        if dout_TD is None:
            dout_TD = torch.zeros_like(x_TD)
        dx, dlogits, dgu, ddown, dbias = torch.ops.flexmoe_triton.moe_bwd(
            dout_TD, dz_TE, x_TD, gate_up, down, bias, allow_mask, trainable, pre_Q2F, plan_tensors,
            logits_dtype, norm, deterministic, needs,
        )
        grads = [g if n else None for g, n in zip((dx, dlogits, dgu, ddown, dbias), needs)]
        return (*grads, None, None, None, None, None, None)


# ------------------------------------------------------------------ the backend entry point
def forward(args: LayerArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out_TD, logits_TE)`` for validated arguments (see :func:`flexmoe_kernels.flexmoe_forward`).

    ``args.deterministic``: fixed-order top-k combine in forward and dX (bitwise
    reproducible); False = fp32 atomics; None = :func:`default_deterministic`. The logits are
    float32 masked (-inf where disallowed) and differentiable (z-loss gradients flow to the
    router weight, x and bias).
    """
    x_TD = args.x_TD
    if not torch.compiler.is_compiling():  # inside the op as well; here for an early error
        ok, why = is_available(x_TD.device)
        if not ok:
            raise RuntimeError(f"backend 'triton' is not available on {x_TD.device}: {why}")
    det = -1 if args.deterministic is None else int(args.deterministic)
    # Opted-out experts' router rows are never read (a NaN there must not reach dX).
    logits_TE = router_logits(x_TD, mask_router_rows(args.router_weight_ED, args.allow_mask))
    return _TritonMoEFunction.apply(
        x_TD, logits_TE, args.gate_up_E2FD, args.down_EDF, args.expert_bias, args.allow_mask,
        args.trainable_experts, args.top_k, args.norm_topk_prob, args.validate_rows, det,
    )
