"""Reference grouped SwiGLU experts (the "torch" backend's expert stage).

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
    """
    counts = counts_E.tolist()
    frozen = [False] * len(counts) if trainable_E is None else [not bool(v) for v in trainable_E.tolist()]
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
