"""The routing plan: the one hand-off type between the routing stage and the expert stages.

Legend: T tokens, E experts, K top-k, P = T*K routed (token, slot) pairs (pair id
``p = t*K + k``), ``block_m`` the row tile of the grouped GEMMs, Q_max padded pair slots,
NT tiles of ``block_m`` slots.

Every backend's router returns a :class:`RoutingPlan` with the same field names, dtypes
and meanings (int32 ids, float32 weights and logits); the reference router (``route``) fills
the common fields, the kernels' routers also fill ``probs_TE`` (saved for their backward) and,
for the tile-based grouped GEMMs, ``schedule`` (a :class:`TileSchedule`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["RoutingPlan", "TileSchedule", "schedule_sizes"]


def schedule_sizes(num_tokens: int, top_k: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Worst-case buffer sizes ``(Q_max, NT)`` of a padded tile schedule.

    ``Q_max = roundup(T*K + E*(block_m - 1), block_m)`` and ``NT = Q_max // block_m``: every
    expert's group padded up to a multiple of ``block_m`` always fits, so grids sized from
    these numbers are static (no host read of the counts).
    """
    q = num_tokens * top_k + num_experts * (block_m - 1)
    q_max = (q + block_m - 1) // block_m * block_m
    return q_max, q_max // block_m


@dataclass
class TileSchedule:
    """Padded, tile-aligned expert groups for tile-based grouped GEMMs (vLLM's
    ``moe_align_block_size`` idea, in index space only).

    Attributes:
        padded_pairs_Q: (Q_max,) int32 expert-grouped pair ids, each expert's group starting at
            ``padded_offsets_E1[e]`` and padded to a multiple of ``block_m``; padding slots and
            slots past ``padded_offsets_E1[E]`` hold the sentinel ``P`` (an invalid pair id).
        padded_offsets_E1: (E+1,) int32 exclusive prefix sum of the padded counts
            ``ceil(counts_E / block_m) * block_m``.
        tile_expert_E_tiles: (NT,) int32 expert owning each ``block_m`` tile of
            ``padded_pairs_Q``; -1 for tiles ``>= num_tiles``. Experts with no pairs (zero
            tokens or opted out) own no tile, so their weights are never loaded.
        num_tiles: (1,) int32 on the device: tiles in use, ``padded_offsets_E1[E] // block_m``.
        block_m: the tile height the schedule was built for (a power of two).
    """

    padded_pairs_Q: torch.Tensor
    padded_offsets_E1: torch.Tensor
    tile_expert_E_tiles: torch.Tensor
    num_tiles: torch.Tensor
    block_m: int

    @property
    def num_tiles_max(self) -> int:
        """NT, the static tile count a GEMM grid is sized for."""
        return self.tile_expert_E_tiles.shape[0]


@dataclass
class RoutingPlan:
    """Which expert each (token, slot) goes to, with which weight, grouped by expert.

    Attributes:
        topk_ids_TK: (T, K) int32 expert id of each (token, slot), by decreasing weight; exact
            ties (equal masked logits) go to the lower expert id.
        topk_weights_TK: (T, K) float32 routing weight of each (token, slot): the selected
            softmax probabilities (renormalised over the K iff ``norm_topk_prob``). The
            reference router's weights carry autograd; the kernels' routers have their own
            backward (they save ``probs_TE``).
        counts_E: (E,) int32 pairs routed to each expert; sums to P; 0 for opted-out experts.
        offsets_E1: (E+1,) int32 exclusive prefix sum of ``counts_E``; expert e owns sorted
            positions ``offsets_E1[e]:offsets_E1[e+1]``.
        sorted_pairs_P: (P,) int32 pair ids ``t*K + k`` in expert-grouped order, stable
            (within an expert, increasing pair id). Every backend produces the same order.
        inv_sorted_pairs_P: (P,) int32 inverse permutation: ``sorted_pairs_P[inv[p]] == p``.
        logits_TE: (T, E) float32 router logits after ``min(bias, 0)`` and masking (-inf where
            disallowed); returned by the layer for the router z-loss.
        probs_TE: optional (T, E) float32 softmax over the allowed experts (0 where
            disallowed); set by the kernels' routers for their backward.
        schedule: optional :class:`TileSchedule` for tile-based grouped GEMMs.
    """

    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    counts_E: torch.Tensor
    offsets_E1: torch.Tensor
    sorted_pairs_P: torch.Tensor
    inv_sorted_pairs_P: torch.Tensor
    logits_TE: torch.Tensor
    probs_TE: Optional[torch.Tensor] = None
    schedule: Optional[TileSchedule] = None

    @property
    def num_tokens(self) -> int:
        """T."""
        return self.topk_ids_TK.shape[0]

    @property
    def top_k(self) -> int:
        """K."""
        return self.topk_ids_TK.shape[1]

    @property
    def num_experts(self) -> int:
        """E."""
        return self.counts_E.shape[0]

    @property
    def num_pairs(self) -> int:
        """P = T*K (also the sentinel value in ``schedule.padded_pairs_Q``)."""
        return self.topk_ids_TK.numel()

    @property
    def sorted_token_ids_P(self) -> torch.Tensor:
        """(P,) int32 token index of each pair in expert-grouped order."""
        return torch.div(self.sorted_pairs_P, self.top_k, rounding_mode="floor")
