"""Reference routing (the "torch" backend's routing stage): masked softmax-top-k -> RoutingPlan.

Legend: T tokens, D hidden, E experts, K top-k, B sequences, S sequence length, P = T*K.

Semantics (``docs/SEMANTICS.md`` §2-§3), the executable spec every kernel is checked against:

* ``logits_TE = hidden_TD @ router_weight_ED.T`` in the input dtype (+ ``min(expert_bias_E, 0)``).
* Disallowed experts get logit ``-inf`` **before** the softmax, so routing with a mask is
  exactly routing in a model from which those experts were physically removed.
* softmax over experts (float32) -> top-k (exact ties to the lower expert id) -> the selected
  probabilities are the weights, not renormalised unless ``norm_topk_prob=True``.
* A row that allows fewer than ``K`` experts is an error (``ValueError`` naming the count).
* (token, k) pairs are grouped by expert with a stable sort; ``counts_E``/``offsets_E1``
  describe the groups. Disallowed experts receive no pairs, so their weights are never read.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._validate import check_positive_int, check_tensor
from ..args import check_allow_mask_rows, check_top_k, normalize_allow_mask
from ..plan import RoutingPlan

__all__ = [
    "route",
    "route_hidden",
    "router_logits",
    "expand_sequence_mask",
    "router_z_loss",
    "mask_router_rows",
    "masked_logits",
    "group_pairs",
    "plan_from_topk",
]

_INT_DTYPES = (torch.int16, torch.int32, torch.int64, torch.uint8, torch.int8)


def router_logits(hidden_TD: torch.Tensor, router_weight_ED: torch.Tensor) -> torch.Tensor:
    """(T, D) @ (E, D).T -> (T, E) router logits in the input dtype (as Hugging Face does)."""
    check_tensor(hidden_TD, "hidden", ndim=2, floating=True)
    check_tensor(router_weight_ED, "router_weight", ndim=2, floating=True)
    if router_weight_ED.shape[1] != hidden_TD.shape[1]:
        raise ValueError(
            f"router_weight must have shape (E, {hidden_TD.shape[1]}) to match hidden (T, D), "
            f"got {tuple(router_weight_ED.shape)}"
        )
    return torch.nn.functional.linear(hidden_TD, router_weight_ED.to(hidden_TD.dtype))


def expand_sequence_mask(mask_BE: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Expand a per-sequence allow-mask (B, E) to per-token (B*S, E), row-major over (B, S)."""
    check_tensor(mask_BE, "allow_mask", ndim=2, dtypes=(torch.bool,))
    check_positive_int(seq_len, "seq_len")
    B, E = mask_BE.shape
    return mask_BE[:, None, :].expand(B, seq_len, E).reshape(B * seq_len, E)


def mask_router_rows(router_weight_ED: torch.Tensor, allow_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero the router rows of experts that no token allows (no host sync).

    Their logits are replaced by -inf anyway, but without this a NaN in an opted-out expert's
    router row would reach dX through the backward of ``x @ R.T`` (0 * NaN = NaN): opted-out
    experts' tensors must never be read, router rows included. The gradient to the zeroed
    rows is exactly 0. Every backend computes its logits through this.
    """
    if allow_mask is None:
        return router_weight_ED
    used_E = allow_mask if allow_mask.ndim == 1 else allow_mask.any(0)
    return torch.where(used_E.to(router_weight_ED.device)[:, None], router_weight_ED, 0.0)


def masked_logits(
    logits_TE: torch.Tensor, allow_mask: Optional[torch.Tensor], expert_bias_E: Optional[torch.Tensor]
) -> torch.Tensor:
    """(T, E) float32 ``logits + min(bias, 0)``, -inf where ``allow_mask`` is False."""
    z = logits_TE.float()
    if expert_bias_E is not None:
        z = z + expert_bias_E.float().clamp(max=0.0)
    if allow_mask is not None:
        z = z.masked_fill(~allow_mask, float("-inf"))
    return z


def _count_per_expert(flat_ids_P: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64 pairs per expert. ``bincount``'s output shape depends on the data, which
    torch.compile cannot trace (a graph break): there the same integer counts come from a
    ``scatter_add`` into E zeros (static shape)."""
    if not torch.compiler.is_compiling():
        return torch.bincount(flat_ids_P, minlength=num_experts)
    zeros_E = torch.zeros(num_experts, dtype=torch.int64, device=flat_ids_P.device)
    return zeros_E.scatter_add(0, flat_ids_P, torch.ones_like(flat_ids_P))


def group_pairs(topk_ids_TK: torch.Tensor, num_experts: int):
    """Group the P = T*K pairs by expert (stable): ``(counts_E, offsets_E1, sorted_pairs_P,
    inv_sorted_pairs_P)``, all int32 (see :class:`~flexmoe_kernels.ops.plan.RoutingPlan`)."""
    flat_ids_P = topk_ids_TK.reshape(-1).long()
    sorted_pairs_P = torch.sort(flat_ids_P, stable=True).indices
    inv_sorted_pairs_P = torch.empty_like(sorted_pairs_P)
    inv_sorted_pairs_P[sorted_pairs_P] = torch.arange(sorted_pairs_P.numel(), device=sorted_pairs_P.device)
    counts_E = _count_per_expert(flat_ids_P, num_experts)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_ids_TK.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    i32 = torch.int32
    return counts_E.to(i32), offsets_E1.to(i32), sorted_pairs_P.to(i32), inv_sorted_pairs_P.to(i32)


def route(logits_TE: torch.Tensor, top_k: int, *, allow_mask: Optional[torch.Tensor] = None,
          expert_bias: Optional[torch.Tensor] = None, norm_topk_prob: bool = False,
          validate: bool = True) -> RoutingPlan:
    """Route T tokens to K of E experts.

    Args:
        logits_TE: (T, E) router logits, any float dtype (computed on in float32).
        top_k: K, 1 <= K <= E.
        allow_mask: None, (E,) bool (same for all tokens) or (T, E) bool (per token; use
            :func:`expand_sequence_mask` for a per-sequence (B, E) mask). False = opted out.
        expert_bias: optional (E,) float; ``min(bias, 0)`` is added to the logits.
        norm_topk_prob: renormalise the K selected weights to sum to 1 (off by default).
        validate: check that every row allows at least K experts (one host sync; under
            torch.compile when the compiled graph runs, see
            :func:`~flexmoe_kernels.ops.args.check_allow_mask_rows`).

    Returns:
        :class:`~flexmoe_kernels.ops.plan.RoutingPlan` (int32 ids). Weights are float32 and
        carry gradients to ``logits_TE`` and ``expert_bias``.
    """
    check_tensor(logits_TE, "logits", ndim=2, floating=True)
    T, E = logits_TE.shape
    check_top_k(top_k, E)
    if expert_bias is not None:
        check_tensor(expert_bias, "expert_bias", shape=(E,), floating=True)
    allow_mask = normalize_allow_mask(allow_mask, T, E, logits_TE.device)
    if validate:  # under torch.compile: the checked copy, the check runs with the graph
        allow_mask = check_allow_mask_rows(allow_mask, top_k, E)

    z_TE = masked_logits(logits_TE, allow_mask, expert_bias)
    probs_TE = torch.softmax(z_TE, dim=-1)
    # Never select a disallowed expert, even if an allowed probability underflowed to 0.
    sel_TE = probs_TE if allow_mask is None else probs_TE.masked_fill(~allow_mask, -1.0)
    # Stable descending sort: exact ties go to the lower expert id (as the Triton and CUDA
    # routers do); torch.topk leaves the order of ties unspecified.
    ids_TK = torch.sort(sel_TE.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    topk_weights_TK = probs_TE.gather(1, ids_TK)
    if norm_topk_prob:
        topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
    counts_E, offsets_E1, sorted_pairs_P, inv_sorted_pairs_P = group_pairs(ids_TK, E)
    return RoutingPlan(topk_ids_TK=ids_TK.to(torch.int32), topk_weights_TK=topk_weights_TK, counts_E=counts_E,
                       offsets_E1=offsets_E1, sorted_pairs_P=sorted_pairs_P,
                       inv_sorted_pairs_P=inv_sorted_pairs_P, logits_TE=z_TE)


def route_hidden(
    hidden_TD: torch.Tensor, router_weight_ED: torch.Tensor, top_k: int, **kwargs
) -> RoutingPlan:
    """:func:`route` on ``hidden_TD @ router_weight_ED.T``; keyword arguments as in :func:`route`.

    Router rows of experts that no token allows are never read (see :func:`mask_router_rows`).
    """
    allow = kwargs.get("allow_mask")
    if allow is not None:
        check_tensor(router_weight_ED, "router_weight", ndim=2, floating=True)
        allow = normalize_allow_mask(allow, hidden_TD.shape[0], router_weight_ED.shape[0], hidden_TD.device)
        kwargs["allow_mask"] = allow
        router_weight_ED = mask_router_rows(router_weight_ED, allow)
    return route(router_logits(hidden_TD, router_weight_ED), top_k, **kwargs)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(allowed logits)^2 (ST-MoE), float32 scalar."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def plan_from_topk(
    topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, num_experts: int, *, validate: bool = True
) -> RoutingPlan:
    """A :class:`~flexmoe_kernels.ops.plan.RoutingPlan` from experts chosen elsewhere.

    Args:
        topk_ids_TK: (T, K) integer expert id of each (token, slot).
        topk_weights_TK: (T, K) float weight of each (token, slot), any float dtype; kept
            differentiable (the plan holds it as float32, so gradients reach the caller's
            weights through :func:`flexmoe_kernels.grouped_swiglu`'s combine).
        num_experts: E; ids must lie in [0, E).
        validate: check the id range (one host sync); off, an out-of-range id is undefined.

    Returns:
        The plan with the caller's ids and weights (slot order kept), pairs grouped by expert
        exactly as our router groups them (stable). ``logits_TE`` is (T, E) float32, ``-inf``
        except ``log(weight)`` at the chosen experts (detached): the only logits consistent
        with the given choice, not a router's.
    """
    check_tensor(topk_ids_TK, "topk_ids", ndim=2, dtypes=_INT_DTYPES)
    check_tensor(topk_weights_TK, "topk_weights", shape=tuple(topk_ids_TK.shape), floating=True,
                 device=topk_ids_TK.device)
    check_positive_int(num_experts, "num_experts")
    if validate and topk_ids_TK.numel():
        lo, hi = int(topk_ids_TK.min()), int(topk_ids_TK.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids must lie in [0, num_experts={num_experts}), got values in [{lo}, {hi}]")
    ids_TK = topk_ids_TK.long()
    counts_E, offsets_E1, sorted_pairs_P, inv_sorted_pairs_P = group_pairs(ids_TK, num_experts)
    logits_TE = torch.full((ids_TK.shape[0], num_experts), float("-inf"), device=ids_TK.device)
    logits_TE.scatter_(1, ids_TK, topk_weights_TK.detach().float().log())
    return RoutingPlan(
        topk_ids_TK=ids_TK.to(torch.int32), topk_weights_TK=topk_weights_TK.float(), counts_E=counts_E,
        offsets_E1=offsets_E1, sorted_pairs_P=sorted_pairs_P, inv_sorted_pairs_P=inv_sorted_pairs_P,
        logits_TE=logits_TE,
    )
