"""Grouped SwiGLU experts on the PyTorch path (the reference for the Triton/CUDA kernels).

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k, P = T*K routed pairs.

Weights use the Hugging Face ``FlexOlmoExperts`` layout:
    gate_up_E2FD: (E, 2F, D); rows [0, F) are the gate projection, rows [F, 2F) the up one.
    down_EDF:     (E, D, F).
Expert e computes ``y = down_e @ (silu(gate_e @ x) * (up_e @ x))`` for its pairs; the output row
of token t is ``sum_k weight[t, k] * y[t, k]``. Experts with no pairs (zero-token or opted-out)
are skipped entirely: their weights are never indexed, so NaN there cannot reach the output,
and their weight gradients are exactly zero.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._validate import check_tensor
from .routing import RoutingPlan

__all__ = ["check_expert_weights", "grouped_swiglu", "swiglu_expert"]


def check_expert_weights(
    x_TD: torch.Tensor, gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor, num_experts: Optional[int] = None
) -> tuple[int, int, int]:
    """Validate x / stacked weights; return (E, D, F)."""
    check_tensor(x_TD, "x", ndim=2, floating=True)
    check_tensor(gate_up_E2FD, "gate_up", ndim=3, floating=True)
    check_tensor(down_EDF, "down", ndim=3, floating=True)
    E, F2, D = gate_up_E2FD.shape
    if D != x_TD.shape[1]:
        raise ValueError(f"gate_up must have shape (E, 2F, D={x_TD.shape[1]}), got {tuple(gate_up_E2FD.shape)}")
    if F2 % 2:
        raise ValueError(f"gate_up must have an even second dimension 2F, got {F2}")
    Fw = F2 // 2
    if tuple(down_EDF.shape) != (E, D, Fw):
        raise ValueError(f"down must have shape (E, D, F)=({E}, {D}, {Fw}), got {tuple(down_EDF.shape)}")
    if num_experts is not None and E != num_experts:
        raise ValueError(f"gate_up has {E} experts but the routing plan has {num_experts}")
    for name, t in (("gate_up", gate_up_E2FD), ("down", down_EDF)):
        if t.device != x_TD.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x_TD.device}")
        if t.dtype != x_TD.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x_TD.dtype}; they must match")
    return E, D, Fw


def swiglu_expert(x_ND: torch.Tensor, gate_up_2FD: torch.Tensor, down_DF: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: (N, D) -> (N, D)."""
    gate_NF, up_NF = F.linear(x_ND, gate_up_2FD).chunk(2, dim=-1)
    return F.linear(F.silu(gate_NF) * up_NF, down_DF)


def grouped_swiglu(
    x_TD: torch.Tensor,
    plan: RoutingPlan,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    *,
    trainable_experts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mixture output (T, D) in x's dtype (the top-k combine accumulates in float32).

    Args:
        x_TD: (T, D) input rows.
        plan: routing plan from :func:`flexmoe_kernels.route` with T rows and E experts.
        gate_up_E2FD, down_EDF: stacked expert weights (see module docstring), x's dtype.
        trainable_experts: optional (E,) bool; experts marked False are treated as frozen
            (their weights are detached: no dW is computed for them). dX still flows.

    This reference reads ``counts_E`` on the host (one synchronisation per call).
    """
    E, D, _ = check_expert_weights(x_TD, gate_up_E2FD, down_EDF, plan.num_experts)
    T, K = plan.topk_ids_TK.shape
    if T != x_TD.shape[0]:
        raise ValueError(f"x has {x_TD.shape[0]} rows but the routing plan has T={T}")
    if trainable_experts is not None:
        check_tensor(trainable_experts, "trainable_experts", shape=(E,), dtypes=(torch.bool,))
        frozen = [not bool(v) for v in trainable_experts.tolist()]
    else:
        frozen = [False] * E

    token_P = plan.sorted_token_ids_P
    x_PD = x_TD.index_select(0, token_P)
    counts = plan.counts_E.tolist()
    pieces = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue  # zero-token or opted-out expert: weights never read
        w1, w2 = gate_up_E2FD[e], down_EDF[e]
        if frozen[e]:
            w1, w2 = w1.detach(), w2.detach()
        pieces.append(swiglu_expert(x_PD[start : start + n], w1, w2))
        start += n
    y_PD = torch.cat(pieces, 0) if pieces else x_PD.new_zeros(0, D)
    w_P = plan.topk_weights_TK.reshape(-1).index_select(0, plan.sorted_pairs_P)
    out_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
    out_TD = out_TD.index_add(0, token_P, y_PD.float() * w_P[:, None].float())
    return out_TD.to(x_TD.dtype)
