"""Masked softmax-top-k routing: the PyTorch reference every kernel is checked against.

Legend: T tokens, D hidden, E experts, K top-k, B sequences, S sequence length.

Semantics (``../shared/FLEXOLMO.md`` section 2):

* ``logits_TE = hidden_TD @ router_weight_ED.T`` (+ ``min(expert_bias_E, 0)`` when given).
* Disallowed experts get logit ``-inf`` **before** the softmax, so routing with a mask is
  exactly routing in a model from which those experts were physically removed.
* softmax over experts (float32) -> top-k -> the selected probabilities are the weights, not
  renormalised unless ``norm_topk_prob=True``.
* A row that allows fewer than ``K`` experts is an error (``ValueError`` naming the count).
* (token, k) pairs are grouped by expert with a stable sort; ``counts_E``/``offsets_E1``
  describe the groups. Disallowed experts receive no pairs, so their weights are never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._validate import check_positive_int, check_tensor

__all__ = [
    "RoutingPlan",
    "route",
    "route_hidden",
    "router_logits",
    "expand_sequence_mask",
    "normalize_allow_mask",
    "check_allow_mask_rows",
    "router_z_loss",
    "mask_router_rows",
]


class PlanSizes:
    """Sizes read off a routing plan's tensors (shared by every backend's plan class)."""

    topk_ids_TK: torch.Tensor
    counts_E: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.topk_ids_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids_TK.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]


@dataclass
class RoutingPlan(PlanSizes):
    """Everything the grouped expert GEMMs need, produced by :func:`route`.

    Attributes:
        topk_ids_TK: (T, K) int64 expert id of each (token, slot), ordered by decreasing weight;
            exact ties go to the lower expert id.
        topk_weights_TK: (T, K) float32 routing weight of each (token, slot) (differentiable).
        counts_E: (E,) int64 number of (token, slot) pairs routed to each expert; sums to T*K.
        offsets_E1: (E+1,) int64 exclusive prefix sum of ``counts_E``; expert e owns sorted
            positions ``offsets_E1[e]:offsets_E1[e+1]``.
        sorted_pairs_P: (P=T*K,) int64 flat pair index ``t*K + k`` in expert-grouped order
            (stable: within an expert, increasing pair index).
        inv_sorted_pairs_P: (P,) int64 inverse permutation: ``sorted_pairs_P[inv[i]] == i``.
        logits_TE: (T, E) float32 router logits after bias and masking (-inf where disallowed);
            used for the router z-loss.
    """

    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    counts_E: torch.Tensor
    offsets_E1: torch.Tensor
    sorted_pairs_P: torch.Tensor
    inv_sorted_pairs_P: torch.Tensor
    logits_TE: torch.Tensor

    @property
    def sorted_token_ids_P(self) -> torch.Tensor:
        """(P,) int64 token index of each pair in expert-grouped order."""
        return torch.div(self.sorted_pairs_P, self.top_k, rounding_mode="floor")


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


def normalize_allow_mask(
    allow_mask: Optional[torch.Tensor], num_tokens: int, num_experts: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Validate an allow-mask and return it as bool on ``device``: (E,) or (T, E), or None."""
    if allow_mask is None:
        return None
    check_tensor(allow_mask, "allow_mask", dtypes=(torch.bool,))
    if allow_mask.shape not in ((num_experts,), (num_tokens, num_experts)):
        raise ValueError(
            f"allow_mask must have shape (E,)=({num_experts},) or (T, E)=({num_tokens}, {num_experts}), "
            f"got {tuple(allow_mask.shape)}"
        )
    return allow_mask.to(device)


def check_allow_mask_rows(allow_mask: Optional[torch.Tensor], top_k: int, num_experts: int) -> None:
    """Raise ``ValueError`` if any row of ``allow_mask`` allows fewer than ``top_k`` experts.

    Reads the mask on the host (one synchronisation); skipped automatically while a CUDA graph
    is being captured, where the caller is responsible for valid masks.
    """
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than the number of experts E={num_experts}")
    if allow_mask is None:
        return
    if allow_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    allowed = allow_mask.sum(-1)
    fewest = int(allowed.min()) if allowed.numel() else top_k
    if fewest < top_k:
        if allow_mask.ndim == 1:
            raise ValueError(
                f"allow_mask allows {fewest} experts, fewer than top_k={top_k}"
            )
        row = int((allowed < top_k).nonzero()[0, 0])
        raise ValueError(
            f"allow_mask row {row} allows {fewest} experts, fewer than top_k={top_k}"
        )


def _masked_logits(
    logits_TE: torch.Tensor, allow_mask: Optional[torch.Tensor], expert_bias_E: Optional[torch.Tensor]
) -> torch.Tensor:
    z = logits_TE.float()
    if expert_bias_E is not None:
        z = z + expert_bias_E.float().clamp(max=0.0)
    if allow_mask is not None:
        z = z.masked_fill(~allow_mask, float("-inf"))
    return z


def route(
    logits_TE: torch.Tensor,
    top_k: int,
    *,
    allow_mask: Optional[torch.Tensor] = None,
    expert_bias: Optional[torch.Tensor] = None,
    norm_topk_prob: bool = False,
    validate: bool = True,
) -> RoutingPlan:
    """Route T tokens to K of E experts.

    Args:
        logits_TE: (T, E) router logits, any float dtype (computed on in float32).
        top_k: K, 1 <= K <= E.
        allow_mask: None, (E,) bool (same for all tokens) or (T, E) bool (per token; use
            :func:`expand_sequence_mask` for a per-sequence (B, E) mask). False = opted out.
        expert_bias: optional (E,) float; ``min(bias, 0)`` is added to the logits.
        norm_topk_prob: renormalise the K selected weights to sum to 1 (off by default).
        validate: check that every row allows at least K experts (one host sync).

    Returns:
        :class:`RoutingPlan`. Weights are float32 and carry gradients to ``logits_TE`` and
        ``expert_bias``.
    """
    check_tensor(logits_TE, "logits", ndim=2, floating=True)
    T, E = logits_TE.shape
    check_positive_int(top_k, "top_k")
    if top_k > E:
        raise ValueError(f"top_k={top_k} is larger than the number of experts E={E}")
    if expert_bias is not None:
        check_tensor(expert_bias, "expert_bias", shape=(E,), floating=True)
    allow_mask = normalize_allow_mask(allow_mask, T, E, logits_TE.device)
    if validate:
        check_allow_mask_rows(allow_mask, top_k, E)

    z_TE = _masked_logits(logits_TE, allow_mask, expert_bias)
    probs_TE = torch.softmax(z_TE, dim=-1)
    # Never select a disallowed expert, even if an allowed probability underflowed to 0.
    sel_TE = probs_TE if allow_mask is None else probs_TE.masked_fill(~allow_mask, -1.0)
    # Stable descending sort: exact ties go to the lower expert id (as the Triton and CUDA
    # routers do); torch.topk leaves the order of ties unspecified.
    topk_ids_TK = torch.sort(sel_TE.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    topk_weights_TK = probs_TE.gather(1, topk_ids_TK)
    if norm_topk_prob:
        topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)

    flat_ids_P = topk_ids_TK.reshape(-1)
    sorted_pairs_P = torch.sort(flat_ids_P, stable=True).indices
    inv_sorted_pairs_P = torch.empty_like(sorted_pairs_P)
    inv_sorted_pairs_P[sorted_pairs_P] = torch.arange(
        sorted_pairs_P.numel(), device=sorted_pairs_P.device
    )
    counts_E = torch.bincount(flat_ids_P, minlength=E)
    offsets_E1 = torch.zeros(E + 1, dtype=torch.int64, device=logits_TE.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    return RoutingPlan(
        topk_ids_TK=topk_ids_TK,
        topk_weights_TK=topk_weights_TK,
        counts_E=counts_E,
        offsets_E1=offsets_E1,
        sorted_pairs_P=sorted_pairs_P,
        inv_sorted_pairs_P=inv_sorted_pairs_P,
        logits_TE=z_TE,
    )


def mask_router_rows(router_weight_ED: torch.Tensor, allow_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero the router rows of experts that no token allows (no host sync).

    Their logits are replaced by -inf anyway, but without this a NaN in an opted-out expert's
    router row would reach dX through the backward of ``x @ R.T`` (0 * NaN = NaN): opted-out
    experts' tensors must never be read, router rows included. The gradient to the zeroed
    rows is exactly 0.
    """
    if allow_mask is None:
        return router_weight_ED
    used_E = allow_mask if allow_mask.ndim == 1 else allow_mask.any(0)
    return torch.where(used_E.to(router_weight_ED.device)[:, None], router_weight_ED, 0.0)


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
