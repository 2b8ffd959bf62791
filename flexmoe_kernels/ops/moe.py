"""The FlexMoE layer as one functional op, dispatched to a backend.

Legend: T tokens, D hidden, F expert width, E experts, K top-k.

Backends are modules exposing ``is_available(device) -> (bool, reason)`` and
``flexmoe_forward(...)`` with the signature of :func:`flexmoe_forward` below (minus
``backend``), returning ``(out_TD, logits_TE)``:

* ``"torch"``  -> :mod:`flexmoe_kernels.ops.moe_torch` (reference, any device)
* ``"triton"`` -> :mod:`flexmoe_kernels.ops.moe_triton` (fused Triton kernels)
* ``"cuda"``   -> :mod:`flexmoe_kernels.ops.moe_cuda` (CUDA C++ routing/permute/combine)
* ``"auto"``   -> the fastest available for the device (see :func:`resolve_backend`).
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

__all__ = ["BACKENDS", "available_backends", "backend_status", "resolve_backend", "flexmoe_forward"]

BACKENDS = {
    "torch": "flexmoe_kernels.ops.moe_torch",
    "triton": "flexmoe_kernels.ops.moe_triton",
    "cuda": "flexmoe_kernels.ops.moe_cuda",
}


def _backend_module(name: str):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS) + ['auto']}, got {name!r}")
    return importlib.import_module(BACKENDS[name])


def backend_status(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(available, reason) for backend ``name`` on ``device``; never raises for a missing module."""
    device = torch.device(device)
    try:
        mod = _backend_module(name)
    except ImportError as exc:  # optional dependency (triton) or unbuilt extension
        return False, f"cannot import {BACKENDS[name]}: {exc}"
    return mod.is_available(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``."""
    return [n for n in BACKENDS if backend_status(n, device)[0]]


def resolve_backend(name: str, device: torch.device | str, problem: Optional[dict] = None) -> str:
    """Map ``name`` (possibly ``"auto"``) to a concrete, available backend for ``device``.

    ``problem`` optionally describes the shape (``T, D, F, E, K, dtype``) so "auto" can use
    measured choices (see :mod:`flexmoe_kernels.ops.autoselect` when present).
    Raises ``RuntimeError`` with the reason when a named backend is unavailable.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            from .autoselect import choose_backend  # measured choice, added by the CUDA backend
        except ImportError:
            choose_backend = None
        if choose_backend is not None:
            choice = choose_backend(device, problem)
            if choice is not None:
                return choice
        for cand in ("triton", "cuda", "torch"):
            if backend_status(cand, device)[0]:
                return cand
        return "torch"
    ok, why = backend_status(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available on {device}: {why}")
    return name


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route and run the experts: returns ``(out_TD, logits_TE)``.

    Args:
        x_TD: (T, D) hidden states (the router sees them un-normalised).
        router_weight_ED: (E, D) router embeddings; logits = x @ router_weight.T.
        gate_up_E2FD: (E, 2F, D) gate (rows :F) and up (rows F:) projections.
        down_EDF: (E, D, F) down projections.
        top_k: K.
        allow_mask: None, (E,) or (T, E) bool; False = opted out (logit -inf before softmax).
        expert_bias: optional (E,); ``min(bias, 0)`` added to the logits.
        norm_topk_prob: renormalise the K weights.
        trainable_experts: optional (E,) bool; False = frozen, no dW computed.
        validate: check every row allows >= K experts (a host sync; skipped under graph capture).
        backend: "torch", "triton", "cuda" or "auto".

    Returns:
        out_TD: (T, D) in x's dtype.
        logits_TE: (T, E) float32 masked logits (-inf where disallowed), for the z-loss.
    """
    name = resolve_backend(backend, x_TD.device) if backend == "auto" else backend
    mod = _backend_module(name)
    return mod.flexmoe_forward(
        x_TD,
        router_weight_ED,
        gate_up_E2FD,
        down_EDF,
        top_k,
        allow_mask=allow_mask,
        expert_bias=expert_bias,
        norm_topk_prob=norm_topk_prob,
        trainable_experts=trainable_experts,
        validate=validate,
    )
