"""The "torch" backend: routing + grouped SwiGLU experts with plain PyTorch ops."""
from __future__ import annotations

from typing import Optional

import torch

from .experts import grouped_swiglu
from .routing import route_hidden

__all__ = ["is_available", "flexmoe_forward"]


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, "always available"


def flexmoe_forward(
    x_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    top_k: int,
    *,
    allow_mask: Optional[torch.Tensor] = None,
    expert_bias: Optional[torch.Tensor] = None,
    norm_topk_prob: bool = False,
    trainable_experts: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`flexmoe_kernels.ops.moe.flexmoe_forward`."""
    plan = route_hidden(
        x_TD,
        router_weight_ED,
        top_k,
        allow_mask=allow_mask,
        expert_bias=expert_bias,
        norm_topk_prob=norm_topk_prob,
        validate=validate,
    )
    out_TD = grouped_swiglu(x_TD, plan, gate_up_E2FD, down_EDF, trainable_experts=trainable_experts)
    return out_TD, plan.logits_TE
