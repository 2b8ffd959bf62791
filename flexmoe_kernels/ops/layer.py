"""The FlexMoE layer as one functional op: validate once, resolve the backend, call it.

Legend: T tokens, D hidden, F expert width, E experts, K top-k.
"""
from __future__ import annotations

from typing import Optional

import torch

from .args import validate_layer_args
from .backends import backend_module, resolve_backend

__all__ = ["flexmoe_forward"]


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
    backend: str = "torch",
    deterministic: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route and run the experts: returns ``(out_TD, logits_TE)``.

    The pipeline (``docs/SEMANTICS.md`` §2-§4): routing (masked softmax-top-k) -> permutation
    (pairs grouped by expert) -> grouped SwiGLU GEMMs -> weighted top-k combine.

    Args:
        x_TD: (T, D) hidden states (the router sees them un-normalised).
        router_weight_ED: (E, D) router embeddings; logits = x @ router_weight.T in x's dtype.
        gate_up_E2FD: (E, 2F, D) gate (rows :F) and up (rows F:) projections, x's dtype.
        down_EDF: (E, D, F) down projections, x's dtype.
        top_k: K in [1, E].
        allow_mask: None, (E,) or (T, E) bool; False = opted out (logit -inf before the
            softmax: exactly the model without those experts; their weights are never read).
        expert_bias: optional (E,); ``min(bias, 0)`` added to the logits.
        norm_topk_prob: renormalise the K weights (off in FlexOlmo).
        trainable_experts: optional (E,) bool; False = frozen, no dW computed (dX still flows).
        validate: check every row allows >= K experts (a host sync; skipped under CUDA graph
            capture, deferred to run time under torch.compile).
        backend: "torch", "triton", "cuda" or "auto" (see :mod:`.backends`).
        deterministic: triton only: fixed-order top-k combine (None = its default,
            ``FLEXMOE_TRITON_DETERMINISTIC``, "1" if unset); other backends always are.

    Returns:
        out_TD: (T, D) in x's dtype.
        logits_TE: (T, E) float32 masked logits (-inf where disallowed), for the z-loss.

    Every argument is checked here (errors name the argument); backends receive the
    validated :class:`~flexmoe_kernels.ops.args.LayerArgs`.
    """
    args = validate_layer_args(
        x_TD, router_weight_ED, gate_up_E2FD, down_EDF, top_k, allow_mask=allow_mask,
        expert_bias=expert_bias, norm_topk_prob=norm_topk_prob, trainable_experts=trainable_experts,
        validate=validate, deterministic=deterministic,
    )
    name = resolve_backend(backend, x_TD.device, args.problem) if backend == "auto" else backend
    return backend_module(name).forward(args)
