"""Our grouped experts behind already chosen experts: :func:`plan_from_topk` and the
``"flexmoe"`` experts implementation for transformers' experts registry.

Legend: T tokens, D hidden, F expert width, E experts, K top-k, P = T*K routed pairs.

Some callers choose the experts themselves (a transformers router we do not patch, a custom
gate): they hold ``topk_ids_TK`` and ``topk_weights_TK`` and want only the expert stage.
:func:`plan_from_topk` turns that choice into our :class:`~flexmoe_kernels.ops.plan.RoutingPlan`
(pairs grouped by expert with the same stable grouping as our router), and
:func:`flexmoe_experts_forward` runs :func:`flexmoe_kernels.grouped_swiglu` on it. This module
imports transformers only inside :func:`register_experts_implementation`.
"""
from __future__ import annotations

import torch

from ..ops.reference.experts import grouped_swiglu
from ..ops.reference.routing import plan_from_topk

__all__ = ["plan_from_topk", "expert_weights", "flexmoe_experts_forward", "register_experts_implementation"]

def expert_weights(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up_E2FD, down_EDF)`` of a transformers ``*Experts`` module, as the module's own
    parameters or views of them (never copies).

    transformers stores ``gate_up_proj`` (E, 2F, D) and ``down_proj`` (E, D, F), our layout;
    a module marked ``is_transposed`` holds (E, D, 2F) / (E, F, D) and is passed as transposed
    views. Raises ``ValueError`` for layouts our SwiGLU experts do not compute (biases, no
    gate, interleaved gate/up, an activation other than SiLU).
    """
    name = type(experts).__name__
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise ValueError(f"experts ({name}) must be gated SwiGLU experts without biases")
    if not getattr(experts, "is_concatenated", True):
        raise ValueError(f"experts ({name}) store gate and up interleaved; only [gate; up] is supported")
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"experts ({name}) use hidden_act={act!r}; only 'silu' is supported")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return gate_up, down


def flexmoe_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts-implementation signature, run by our grouped SwiGLU experts.

    Args:
        self: the ``*Experts`` module (its ``gate_up_proj`` / ``down_proj``, see :func:`expert_weights`).
        hidden_states: (T, D) tokens.
        top_k_index: (T, K) chosen expert ids. top_k_weights: (T, K) their weights.

    Returns:
        (T, D) in hidden_states' dtype (fp32 accumulation); differentiable w.r.t. the tokens,
        the expert weights and ``top_k_weights``.
    """
    gate_up, down = expert_weights(self)
    plan = plan_from_topk(top_k_index, top_k_weights, gate_up.shape[0])
    return grouped_swiglu(hidden_states, plan, gate_up, down)


def register_experts_implementation(name: str = "flexmoe") -> bool:
    """Register :func:`flexmoe_experts_forward` as experts implementation ``name`` in
    transformers' registry (``model.set_experts_implementation("flexmoe")``, or
    ``from_pretrained(..., experts_implementation="flexmoe")``).

    Returns False when this transformers has no experts registry (nothing registered).
    Registering again is harmless.
    """
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(name, flexmoe_experts_forward)
    return True
