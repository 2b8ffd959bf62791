"""The "torch" backend: the reference pipeline in plain PyTorch, on any device.

routing (:mod:`.routing`) -> permutation (:mod:`.permute`) -> per-expert SwiGLU
(:mod:`.experts`) -> weighted combine (:mod:`.combine`); autograd comes from torch.
One host synchronisation per call (the expert loop reads ``counts_E``), plus the optional
mask-row validation. Under ``torch.compile`` (fullgraph) the loop runs as the custom op
``flexmoe_reference::experts`` and the mask check as ``flexmoe::checked_allow_mask`` (both
eagerly, when the compiled graph runs), so the same math traces with no graph break.
"""
from __future__ import annotations

import torch

from ..args import LayerArgs
from .experts import grouped_swiglu
from .routing import route_hidden

__all__ = ["is_available", "forward"]


def is_available(device: torch.device) -> tuple[bool, str]:
    """Always ``(True, ...)``: plain PyTorch runs on every device."""
    return True, "always available"


def forward(args: LayerArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out_TD, logits_TE)`` for validated arguments (see :func:`flexmoe_kernels.flexmoe_forward`)."""
    plan = route_hidden(
        args.x_TD, args.router_weight_ED, args.top_k, allow_mask=args.allow_mask,
        expert_bias=args.expert_bias, norm_topk_prob=args.norm_topk_prob, validate=args.validate_rows,
    )
    out_TD = grouped_swiglu(args.x_TD, plan, args.gate_up_E2FD, args.down_EDF,
                            trainable_experts=args.trainable_experts)
    return out_TD, plan.logits_TE
