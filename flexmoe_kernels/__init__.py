"""flexmoe_kernels: kernels, modules and models for FlexOlmo-style mixture-of-experts.

Quick map (T tokens, D hidden, F expert width, E experts, K top-k):

* :func:`route` / :func:`route_hidden`: masked softmax-top-k routing -> :class:`RoutingPlan`.
* :func:`grouped_swiglu`: grouped SwiGLU experts (HF layout gate_up (E, 2F, D), down (E, D, F)).
* :func:`flexmoe_forward`: the whole layer as one op, dispatched to a backend.
* :class:`FlexMoE`: the nn.Module; :class:`FlexOlmoConfig` / :class:`FlexOlmoForCausalLM`: the model.

``import flexmoe_kernels`` needs only torch: Triton, the CUDA extension, flash-attn and
DeepSpeed are optional and probed lazily.
"""
from __future__ import annotations

import importlib

from .modules import FlexMoE, resolve_allowed_experts
from .ops import RoutingPlan, available_backends, backend_status, flexmoe_forward, resolve_backend
from .ops.reference.experts import grouped_swiglu, swiglu_expert
from .ops.reference.routing import (
    expand_sequence_mask,
    plan_from_topk,
    route,
    route_hidden,
    router_logits,
    router_z_loss,
)

__version__ = "0.1.0"

# Names resolved on first use so that heavier modules load only when needed.
_LAZY = {
    "FlexOlmoConfig": "flexmoe_kernels.models.flex_olmo",
    "FlexOlmoForCausalLM": "flexmoe_kernels.models.flex_olmo",
    "FlexOlmoModel": "flexmoe_kernels.models.flex_olmo",
    "cuda_is_available": "flexmoe_kernels.ops.cuda._ext",
    "cuda_unavailable_reason": "flexmoe_kernels.ops.cuda._ext",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexmoe_kernels' has no attribute {name!r}")


__all__ = [
    "FlexMoE",
    "RoutingPlan",
    "available_backends",
    "backend_status",
    "expand_sequence_mask",
    "plan_from_topk",
    "flexmoe_forward",
    "grouped_swiglu",
    "resolve_allowed_experts",
    "resolve_backend",
    "route",
    "route_hidden",
    "router_logits",
    "router_z_loss",
    "swiglu_expert",
    *_LAZY,
]
