"""Reference combine (the "torch" backend's combine stage): the weighted top-k sum.

Legend: T tokens, D hidden, K top-k, P = T*K routed pairs in expert-grouped order.
"""
from __future__ import annotations

import torch

from ..plan import RoutingPlan

__all__ = ["combine_rows"]


def combine_rows(y_PD: torch.Tensor, plan: RoutingPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """(T, D) ``out[t] = sum_k w[t, k] * y[pair(t, k)]`` accumulated in float32, cast to
    ``out_dtype``. ``y_PD`` holds the expert outputs in the plan's expert-grouped order (as
    produced from :func:`~.permute.permute_rows`). Differentiable w.r.t. ``y_PD`` and the
    plan's weights."""
    T, D = plan.num_tokens, y_PD.shape[1]
    w_P = plan.topk_weights_TK.reshape(-1).index_select(0, plan.sorted_pairs_P)
    out_TD = torch.zeros(T, D, dtype=torch.float32, device=y_PD.device)
    out_TD = out_TD.index_add(0, plan.sorted_token_ids_P, y_PD.float() * w_P[:, None].float())
    return out_TD.to(out_dtype)
