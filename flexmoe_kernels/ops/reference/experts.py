"""Reference grouped SwiGLU experts (the "torch" backend's expert stage).

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k, P = T*K routed pairs.

Weights use the Hugging Face ``FlexOlmoExperts`` layout:
    gate_up_E2FD: (E, 2F, D); rows [0, F) are the gate projection, rows [F, 2F) the up one.
    down_EDF:     (E, D, F).
Expert e computes ``y = down_e @ (silu(gate_e @ x) * (up_e @ x))`` for its pairs; the output row
of token t is ``sum_k weight[t, k] * y[t, k]``. Experts with no pairs (zero-token or opted-out)
are skipped entirely: their weights are never indexed, so NaN there cannot reach the output,
and their weight gradients are exactly zero.

Under ``torch.compile`` the per-expert loop (which reads ``counts_E`` on the host, and so
cannot be traced without graph breaks) runs as the custom op ``flexmoe_reference::experts``:
the same loop, run eagerly inside the compiled graph (a fake implementation gives the graph
its (P, D) shape), with a closed-form backward op ``flexmoe_reference::experts_bwd`` that
spells out the per-expert autograd of the eager path (same GEMMs, ``silu_backward``). So the
compiled layer has no graph break and the exact reference math; the host read of the counts
stays (one sync per call, as in eager). Alternatives not taken: ``torch._grouped_mm`` runs on
CPU in this torch but on CUDA only for bfloat16 on sm90+, so it cannot be the "any device"
reference; a gather of each pair's weights (``gate_up[ids]``) is sync-free but costs
O(P * 2F * D) memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._validate import check_tensor
from ..args import check_expert_weights
from ..plan import RoutingPlan
from .combine import combine_rows
from .permute import permute_rows

__all__ = ["grouped_swiglu", "swiglu_expert", "experts_per_expert"]


def swiglu_expert(x_ND: torch.Tensor, gate_up_2FD: torch.Tensor, down_DF: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: (N, D) -> (N, D)."""
    gate_NF, up_NF = F.linear(x_ND, gate_up_2FD).chunk(2, dim=-1)
    return F.linear(F.silu(gate_NF) * up_NF, down_DF)


def experts_per_expert(
    x_PD: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    counts_E: torch.Tensor,
    trainable_E: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(P, D) expert outputs of expert-grouped rows ``x_PD``, one matmul pair per expert.

    ``counts_E`` (E,) gives each expert's number of rows (read on the host: one sync; cannot
    be captured in a CUDA graph). Experts with no rows are skipped (weights never read, dW
    exactly 0); experts with ``trainable_E[e] == False`` are detached (no dW, dX flows).
    Under ``torch.compile``: the custom op ``flexmoe_reference::experts`` (module docstring).
    """
    if torch.compiler.is_compiling():  # the same loop as one opaque op: no graph break
        return _experts_op(x_PD, gate_up_E2FD, down_EDF, counts_E, trainable_E)
    return _experts_loop(x_PD, gate_up_E2FD, down_EDF, counts_E, trainable_E)


def _frozen(counts_E: torch.Tensor, trainable_E: Optional[torch.Tensor]) -> list:
    """Per expert: True when frozen (``trainable_E[e] == False``), read on the host."""
    return [False] * counts_E.shape[0] if trainable_E is None else [not bool(v) for v in trainable_E.tolist()]


def _experts_loop(x_PD, gate_up_E2FD, down_EDF, counts_E, trainable_E):
    """The per-expert loop of :func:`experts_per_expert` (eager; also the custom op's body)."""
    counts, frozen = counts_E.tolist(), _frozen(counts_E, trainable_E)
    pieces, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue  # zero-token or opted-out expert: weights never read
        w1, w2 = gate_up_E2FD[e], down_EDF[e]
        if frozen[e]:
            w1, w2 = w1.detach(), w2.detach()
        pieces.append(swiglu_expert(x_PD[start : start + n], w1, w2))
        start += n
    return torch.cat(pieces, 0) if pieces else x_PD.new_zeros(0, x_PD.shape[1])


def grouped_swiglu(
    x_TD: torch.Tensor,
    plan: RoutingPlan,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    *,
    trainable_experts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mixture output (T, D) in x's dtype: permute -> experts -> combine (fp32 accumulation).

    Args:
        x_TD: (T, D) input rows.
        plan: routing plan from :func:`flexmoe_kernels.route` with T rows and E experts.
        gate_up_E2FD, down_EDF: stacked expert weights (see module docstring), x's dtype.
        trainable_experts: optional (E,) bool; experts marked False are treated as frozen
            (their weights are detached: no dW is computed for them). dX still flows.

    This reference reads ``counts_E`` on the host (one synchronisation per call).
    """
    E, _, _ = check_expert_weights(x_TD, gate_up_E2FD, down_EDF, plan.num_experts)
    if plan.num_tokens != x_TD.shape[0]:
        raise ValueError(f"x has {x_TD.shape[0]} rows but the routing plan has T={plan.num_tokens}")
    if trainable_experts is not None:
        check_tensor(trainable_experts, "trainable_experts", shape=(E,), dtypes=(torch.bool,))
    x_PD = permute_rows(x_TD, plan)
    y_PD = experts_per_expert(x_PD, gate_up_E2FD, down_EDF, plan.counts_E, trainable_experts)
    return combine_rows(y_PD, plan, x_TD.dtype)


# ----------------------------------------------------------------------------- under torch.compile
@torch.library.custom_op("flexmoe_reference::experts", mutates_args=())
def _experts_op(x_PD: torch.Tensor, gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor,
                counts_E: torch.Tensor, trainable_E: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`experts_per_expert` as one op (its loop, run eagerly inside a compiled graph)."""
    return _experts_loop(x_PD, gate_up_E2FD, down_EDF, counts_E, trainable_E)


@_experts_op.register_fake
def _experts_fake(x_PD, gate_up_E2FD, down_EDF, counts_E, trainable_E):
    return torch.empty_like(x_PD)


def _expert_grads(dy_ND, x_ND, gate_up_2FD, down_DF):
    """(dx, dgate_up, ddown) of one :func:`swiglu_expert`, as its eager autograd computes them."""
    gate_NF, up_NF = F.linear(x_ND, gate_up_2FD).chunk(2, dim=-1)
    silu_NF = F.silu(gate_NF)
    d_act_NF = dy_ND.mm(down_DF)
    d_down_DF = dy_ND.t().mm(silu_NF * up_NF)
    d_h_N2F = torch.cat([torch.ops.aten.silu_backward(d_act_NF * up_NF, gate_NF), d_act_NF * silu_NF], -1)
    return d_h_N2F.mm(gate_up_2FD), d_h_N2F.t().mm(x_ND), d_down_DF


@torch.library.custom_op("flexmoe_reference::experts_bwd", mutates_args=())
def _experts_bwd_op(dy_PD: torch.Tensor, x_PD: torch.Tensor, gate_up_E2FD: torch.Tensor,
                    down_EDF: torch.Tensor, counts_E: torch.Tensor, trainable_E: Optional[torch.Tensor],
                    need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx_PD, dgate_up_E2FD, ddown_EDF) of :func:`_experts_op`; the weight gradients are
    exact zeros for experts with no rows or frozen ones, and empty (0,) when not ``need_dw``."""
    counts, frozen = counts_E.tolist(), _frozen(counts_E, trainable_E)
    dx_PD = torch.zeros_like(x_PD)
    d_gate_up = torch.zeros_like(gate_up_E2FD) if need_dw else gate_up_E2FD.new_empty(0)
    d_down = torch.zeros_like(down_EDF) if need_dw else down_EDF.new_empty(0)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue  # weights never read
        rows = slice(start, start + n)
        dx_PD[rows], d_gu, d_dn = _expert_grads(dy_PD[rows], x_PD[rows], gate_up_E2FD[e], down_EDF[e])
        if need_dw and not frozen[e]:
            d_gate_up[e], d_down[e] = d_gu, d_dn
        start += n
    return dx_PD, d_gate_up, d_down


@_experts_bwd_op.register_fake
def _experts_bwd_fake(dy_PD, x_PD, gate_up_E2FD, down_EDF, counts_E, trainable_E, need_dw):
    def grad(t):
        return torch.empty_like(t) if need_dw else t.new_empty(0)

    return torch.empty_like(x_PD), grad(gate_up_E2FD), grad(down_EDF)


def _experts_setup(ctx, inputs, output):
    x_PD, gate_up_E2FD, down_EDF, counts_E, trainable_E = inputs
    ctx.save_for_backward(x_PD, gate_up_E2FD, down_EDF, counts_E, trainable_E)


def _experts_backward(ctx, dy_PD):
    x_PD, gate_up_E2FD, down_EDF, counts_E, trainable_E = ctx.saved_tensors
    need_dw = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    dx_PD, d_gate_up, d_down = _experts_bwd_op(dy_PD.contiguous(), x_PD, gate_up_E2FD, down_EDF, counts_E,
                                               trainable_E, need_dw)
    return (dx_PD, d_gate_up if ctx.needs_input_grad[1] else None,
            d_down if ctx.needs_input_grad[2] else None, None, None)


_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup)
