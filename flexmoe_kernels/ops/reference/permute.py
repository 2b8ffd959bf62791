"""Reference permutation (the "torch" backend's permutation stage): token rows in
expert-grouped pair order.

Legend: T tokens, D hidden, K top-k, P = T*K routed pairs (pair id ``p = t*K + k``).
"""
from __future__ import annotations

import torch

from ..plan import RoutingPlan

__all__ = ["permute_rows"]


def permute_rows(x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """(P, D) rows of ``x_TD`` in the plan's expert-grouped order: row ``i`` is the token of
    pair ``plan.sorted_pairs_P[i]``, so expert e's rows are ``offsets_E1[e]:offsets_E1[e+1]``.
    Differentiable (the backward is a scatter-add over the K copies of each token)."""
    return x_TD.index_select(0, plan.sorted_token_ids_P)
