"""The one validation of the layer's arguments, and the validated argument object.

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k.

:func:`validate_layer_args` checks every tensor argument of the layer (type, rank, shape,
dtype, device; errors name the argument and the values seen) and returns a
:class:`LayerArgs`. :func:`flexmoe_kernels.flexmoe_forward` calls it once; every backend's
``forward(args)`` takes the result and never re-validates or re-declares the signature.
The mask and expert-weight checks are also used on their own by the public stage
functions (``route``, ``grouped_swiglu``) so each rule is written once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._validate import check_positive_int, check_tensor

__all__ = [
    "LayerArgs",
    "validate_layer_args",
    "normalize_allow_mask",
    "check_allow_mask_rows",
    "check_expert_weights",
    "check_top_k",
    "check_mask_device",
]


def check_mask_device(mask: torch.Tensor, name: str, device: torch.device) -> None:
    """Refuse a mask that holds no data (device ``meta``) before it is copied to ``device``
    (x's): ``ValueError`` naming the argument, its device and what is expected, instead of
    torch's "Cannot copy out of meta tensor" from the copy. A mask on another real device is
    copied to x's (the documented behaviour)."""
    if mask.device.type == "meta" and torch.device(device).type != "meta":
        raise ValueError(
            f"{name} is on device 'meta' (a tensor without data); expected a bool tensor on the CPU "
            f"or on x's device ({device})"
        )


def check_top_k(top_k: object, num_experts: int) -> int:
    """``top_k`` as an int in [1, E]; ``ValueError`` naming both otherwise."""
    check_positive_int(top_k, "top_k")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than the number of experts E={num_experts}")
    return top_k


def normalize_allow_mask(
    allow_mask: Optional[torch.Tensor], num_tokens: int, num_experts: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Validate an allow-mask and return it as a contiguous bool tensor on ``device``.

    Accepted: None (every expert allowed), (E,) bool (the same for every token) or (T, E)
    bool (per token). False = opted out.
    """
    if allow_mask is None:
        return None
    check_tensor(allow_mask, "allow_mask", dtypes=(torch.bool,))
    check_mask_device(allow_mask, "allow_mask", device)
    if allow_mask.shape not in ((num_experts,), (num_tokens, num_experts)):
        raise ValueError(
            f"allow_mask must have shape (E,)=({num_experts},) or (T, E)=({num_tokens}, {num_experts}), "
            f"got {tuple(allow_mask.shape)}"
        )
    return allow_mask.to(device).contiguous()


def check_allow_mask_rows(
    allow_mask: Optional[torch.Tensor], top_k: int, num_experts: int
) -> Optional[torch.Tensor]:
    """Raise ``ValueError`` if ``top_k > E`` or any row of ``allow_mask`` allows fewer than
    ``top_k`` experts (naming the row and the count); return the mask to route with.

    Reads the mask on the host (one synchronisation); skipped while a CUDA graph is being
    captured, where the caller is responsible for valid masks. While ``torch.compile`` traces,
    the read cannot happen at trace time: the check becomes the custom op
    ``flexmoe::checked_allow_mask``, which runs it when the compiled graph runs and returns a
    checked copy of the mask. Callers must route with the returned mask: an unused result is
    removed by the compiler, and the check with it.
    """
    check_top_k(top_k, num_experts)
    if allow_mask is None:
        return None
    if torch.compiler.is_compiling():
        return _checked_allow_mask(allow_mask, top_k)
    _check_rows(allow_mask, top_k)
    return allow_mask


def _check_rows(allow_mask: torch.Tensor, top_k: int) -> None:
    """The host read of :func:`check_allow_mask_rows` (nothing while a CUDA graph is captured)."""
    if allow_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    allowed = allow_mask.sum(-1)
    fewest = int(allowed.min()) if allowed.numel() else top_k
    if fewest < top_k:
        if allow_mask.ndim == 1:
            raise ValueError(f"allow_mask allows {fewest} experts, fewer than top_k={top_k}")
        row = int((allowed < top_k).nonzero()[0, 0])
        raise ValueError(f"allow_mask row {row} allows {fewest} experts, fewer than top_k={top_k}")


@torch.library.custom_op("flexmoe::checked_allow_mask", mutates_args=())
def _checked_allow_mask(allow_mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """:func:`check_allow_mask_rows` run when a compiled graph runs: a copy of the mask."""
    _check_rows(allow_mask, top_k)
    return allow_mask.clone()


@_checked_allow_mask.register_fake
def _checked_allow_mask_fake(allow_mask, top_k):
    return torch.empty_like(allow_mask)


def check_expert_weights(
    x_TD: torch.Tensor, gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor, num_experts: Optional[int] = None
) -> tuple[int, int, int]:
    """Validate x (T, D) and the stacked weights gate_up (E, 2F, D), down (E, D, F) (same
    dtype and device as x); return (E, D, F)."""
    check_tensor(x_TD, "x", ndim=2, floating=True)
    check_tensor(gate_up_E2FD, "gate_up", ndim=3, floating=True)
    check_tensor(down_EDF, "down", ndim=3, floating=True)
    E, F2, D = gate_up_E2FD.shape
    if D != x_TD.shape[1]:
        raise ValueError(f"gate_up must have shape (E, 2F, D={x_TD.shape[1]}), got {tuple(gate_up_E2FD.shape)}")
    if F2 % 2:
        raise ValueError(f"gate_up must have an even second dimension 2F, got {F2}")
    Fw = F2 // 2
    if tuple(down_EDF.shape) != (E, D, Fw):
        raise ValueError(f"down must have shape (E, D, F)=({E}, {D}, {Fw}), got {tuple(down_EDF.shape)}")
    if num_experts is not None and E != num_experts:
        raise ValueError(f"gate_up has {E} experts but the routing plan has {num_experts}")
    for name, t in (("gate_up", gate_up_E2FD), ("down", down_EDF)):
        if t.device != x_TD.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x_TD.device}")
        if t.dtype != x_TD.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x_TD.dtype}; they must match")
    return E, D, Fw


@dataclass(frozen=True)
class LayerArgs:
    """The layer's arguments after :func:`validate_layer_args` (what every backend receives).

    Attributes:
        x_TD: (T, D) hidden states (floating).
        router_weight_ED: (E, D) router embeddings, any float dtype, on x's device.
        gate_up_E2FD: (E, 2F, D) and down_EDF: (E, D, F) stacked expert weights, x's dtype and
            device.
        top_k: K in [1, E].
        allow_mask: None, (E,) or (T, E) contiguous bool on x's device; False = opted out.
        expert_bias: None or (E,) float on x's device (``min(b, 0)`` is added to the logits).
        norm_topk_prob: renormalise the K weights.
        trainable_experts: None or (E,) bool on x's device; False = frozen (no dW work).
        validate_rows: the mask rows still have to be checked (>= K allowed) when the op runs
            (a backend checks them then). Never set by :func:`validate_layer_args`, which checks
            them itself, once: eagerly, or while ``torch.compile`` traces through the op
            ``flexmoe::checked_allow_mask`` (see :func:`check_allow_mask_rows`), whose checked
            copy is ``allow_mask``, so the check runs when the compiled graph runs.
        deterministic: backend option: fixed-order top-k combine (None = the backend's
            default; the torch and cuda backends are always deterministic).
    """

    x_TD: torch.Tensor
    router_weight_ED: torch.Tensor
    gate_up_E2FD: torch.Tensor
    down_EDF: torch.Tensor
    top_k: int
    allow_mask: Optional[torch.Tensor] = None
    expert_bias: Optional[torch.Tensor] = None
    norm_topk_prob: bool = False
    trainable_experts: Optional[torch.Tensor] = None
    validate_rows: bool = False
    deterministic: Optional[bool] = None

    num_tokens = property(lambda self: self.x_TD.shape[0], doc="T.")
    num_experts = property(lambda self: self.gate_up_E2FD.shape[0], doc="E.")

    @property
    def problem(self) -> dict:
        """Shape description used by the measured "auto" backend choice."""
        E, F2, D = self.gate_up_E2FD.shape
        return dict(T=self.num_tokens, D=D, F=F2 // 2, E=E, K=self.top_k, dtype=self.x_TD.dtype)


_OPTIONS = ("allow_mask", "expert_bias", "norm_topk_prob", "trainable_experts", "validate", "deterministic")


def validate_layer_args(
    x_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    top_k: int,
    **options,
) -> LayerArgs:
    """Check every argument of :func:`flexmoe_kernels.flexmoe_forward` and return them as a
    :class:`LayerArgs` (masks moved to x's device).

    ``options``: the keyword arguments of ``flexmoe_forward`` other than ``backend``
    (``allow_mask``, ``expert_bias``, ``norm_topk_prob``, ``trainable_experts``, ``validate``
    (default True), ``deterministic``), with its meanings. ``validate=True`` also checks that
    every mask row allows >= K experts (one host sync), or defers that check to the compiled
    graph's run time while ``torch.compile`` traces (the returned ``allow_mask`` is then the
    output of the checking op ``flexmoe::checked_allow_mask``, so no backend can lose it).
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the layer takes {list(_OPTIONS)}")
    allow_mask, expert_bias = options.get("allow_mask"), options.get("expert_bias")
    trainable_experts, deterministic = options.get("trainable_experts"), options.get("deterministic")
    validate = options.get("validate", True)
    E, D, _ = check_expert_weights(x_TD, gate_up_E2FD, down_EDF)
    device = x_TD.device
    top_k = check_top_k(top_k, E)
    check_tensor(router_weight_ED, "router_weight", shape=(E, D), floating=True, device=device)
    if expert_bias is not None:
        check_tensor(expert_bias, "expert_bias", shape=(E,), floating=True, device=device)
    mask = normalize_allow_mask(allow_mask, x_TD.shape[0], E, device)
    if trainable_experts is not None:
        check_tensor(trainable_experts, "trainable_experts", shape=(E,), dtypes=(torch.bool,))
        check_mask_device(trainable_experts, "trainable_experts", device)
        trainable_experts = trainable_experts.to(device)
    deterministic = None if deterministic is None else bool(deterministic)
    if validate:  # under torch.compile: the checked copy, checked when the graph runs
        mask = check_allow_mask_rows(mask, top_k, E)
    return LayerArgs(
        x_TD=x_TD, router_weight_ED=router_weight_ED, gate_up_E2FD=gate_up_E2FD, down_EDF=down_EDF,
        top_k=int(top_k), allow_mask=mask, expert_bias=expert_bias,
        norm_topk_prob=bool(options.get("norm_topk_prob", False)),
        trainable_experts=trainable_experts, deterministic=deterministic,
    )
