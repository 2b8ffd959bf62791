"""Our grouped experts behind already chosen experts: :func:`plan_from_topk` and the
``"flexmoe"`` experts implementation for transformers' experts registry.

Legend: T tokens, D hidden, F expert width, E experts, K top-k, P = T*K routed pairs.

Some callers choose the experts themselves (a transformers router we do not patch, a custom
gate): they hold ``topk_ids_TK`` and ``topk_weights_TK`` and want only the expert stage.
:func:`plan_from_topk` turns that choice into our :class:`~flexmoe_kernels.ops.plan.RoutingPlan`
(pairs grouped by expert with the same stable grouping as our router), and
:func:`flexmoe_experts_forward` runs the expert stage of the backend that
``FlexMoE(backend="auto")`` would use (:func:`flexmoe_kernels.ops.backends.resolve_backend`:
"torch" off CUDA; on CUDA the fastest measured per shape bucket, or the static order triton,
cuda, torch; ``FLEXMOE_AUTO_BACKEND`` pins it) on it:

===========  ==============================================================================
backend      expert stage given the chosen experts
===========  ==============================================================================
``torch``    :func:`flexmoe_kernels.grouped_swiglu` (the reference: a matmul per expert)
``triton``   our Triton grouped GEMMs (gather fused into the up-projection, SwiGLU, the
             weighted top-k combine fused into the down-projection, and their backward) on
             the tile schedule of :func:`~flexmoe_kernels.ops.triton.routing.triton_route`
             run with an allow-mask of exactly the chosen experts (slot order kept)
``cuda``     the CUDA C++ gather and combine around torch's grouped GEMM (the cuda backend's
             expert stage, :mod:`flexmoe_kernels.ops.cuda`)
===========  ==============================================================================

The chosen experts of a token must be distinct (as a top-k gives). This module imports
transformers only inside :func:`register_experts_implementation`.
"""
from __future__ import annotations

import dataclasses

import torch

from ..ops.backends import resolve_backend
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

    The backend is ``resolve_backend("auto", device, problem)``, the resolution of
    ``FlexMoE(backend="auto")`` (see the module docstring).
    """
    gate_up, down = expert_weights(self)
    (T, K), (E, F2, D) = top_k_index.shape, gate_up.shape
    problem = dict(T=T, D=D, F=F2 // 2, E=E, K=K, dtype=hidden_states.dtype)
    name = resolve_backend("auto", hidden_states.device, problem) if T else "torch"
    return _EXPERT_STAGES[name](hidden_states, top_k_index, top_k_weights, gate_up, down)


def _torch_experts(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    plan = plan_from_topk(ids_TK, weights_TK, gate_up_E2FD.shape[0])
    return grouped_swiglu(x_TD, plan, gate_up_E2FD, down_EDF)


def _cuda_experts(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """The cuda backend's gather -> grouped GEMM -> combine on the grouping of the chosen experts."""
    from ..ops.cuda.combine import CudaCombineFunction
    from ..ops.cuda.experts import experts_forward
    from ..ops.cuda.permute import CudaGatherFunction

    K = ids_TK.shape[1]
    plan = plan_from_topk(ids_TK, weights_TK.detach(), gate_up_E2FD.shape[0], validate=False)
    x_PD = CudaGatherFunction.apply(x_TD, plan.sorted_pairs_P, plan.inv_sorted_pairs_P, K)
    y_PD = experts_forward(x_PD, gate_up_E2FD, down_EDF, plan.counts_E, plan.offsets_E1)
    return CudaCombineFunction.apply(y_PD, weights_TK.float(), plan.inv_sorted_pairs_P, K).to(x_TD.dtype)


def _triton_plan(x_TD, ids_TK, gate_up_E2FD):
    """Our Triton router's plan and tile schedule for experts chosen elsewhere: every expert but
    the chosen ones masked, slot k given logit -k so the top-k keeps the caller's slot order.
    No host synchronisation. The weights are set by the caller."""
    from ..ops.triton.configs import get_configs
    from ..ops.triton.routing import triton_route

    (T, K), (E, F2, D) = ids_TK.shape, gate_up_E2FD.shape
    ids = ids_TK.long()
    slot = -torch.arange(K, dtype=torch.float32, device=ids.device).expand(T, K)
    logits_TE = torch.zeros(T, E, dtype=torch.float32, device=ids.device).scatter(1, ids, slot)
    mask_TE = torch.zeros(T, E, dtype=torch.bool, device=ids.device).scatter(1, ids, True)
    block_m = get_configs(T, D, F2 // 2, E, K, x_TD.dtype, x_TD.device).block_m
    return triton_route(logits_TE, K, allow_mask=mask_TE, block_m=block_m, validate=False)


class _TritonExperts(torch.autograd.Function):
    """Our Triton grouped SwiGLU GEMMs (forward and backward) on a given plan."""

    @staticmethod
    def forward(ctx, x_TD, weights_TK, gate_up_E2FD, down_EDF, plan):
        from ..ops.triton.grouped_gemm import grouped_swiglu_forward

        plan = dataclasses.replace(plan, topk_weights_TK=weights_TK.detach().float().contiguous())
        ctx.save_for_backward(x_TD, gate_up_E2FD, down_EDF)
        ctx.plan, ctx.weights_dtype = plan, weights_TK.dtype
        return grouped_swiglu_forward(x_TD, plan, gate_up_E2FD, down_EDF)

    @staticmethod
    def backward(ctx, dout_TD):
        from ..ops.triton.grouped_gemm import grouped_swiglu_backward

        x_TD, gate_up, down = ctx.saved_tensors
        nig = ctx.needs_input_grad
        dx, dgu, ddown, dw = grouped_swiglu_backward(
            dout_TD, x_TD, ctx.plan, gate_up, down, need_dx=nig[0], need_dgate_up=nig[2],
            need_ddown=nig[3], need_dweights=nig[1])
        return dx, (dw.to(ctx.weights_dtype) if dw is not None else None), dgu, ddown, None


def _triton_experts(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    return _TritonExperts.apply(x_TD, weights_TK, gate_up_E2FD, down_EDF, _triton_plan(x_TD, ids_TK, gate_up_E2FD))


_EXPERT_STAGES = {"torch": _torch_experts, "triton": _triton_experts, "cuda": _cuda_experts}


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
