"""The "cuda" backend's combine stage: the weighted top-k sum, forward and backward
(csrc/combine.cu).

Legend: T tokens, D hidden, K top-k, P = T*K routed pairs (pair id ``p = t*K + k``).

Shapes: y_PD (P, D) expert outputs in expert-grouped order (float32/float16/bfloat16),
weights_TK (T, K) float32 routing weights, inv_sorted_pairs_P (P,) int32 (row of pair p in
y) -> out_TD (T, D) in y's dtype, ``out[t] = sum_k weights[t, k] * y_PD[inv[t*K + k]]``
(``docs/SEMANTICS.md`` §2-§4; the reference is
:func:`~flexmoe_kernels.ops.reference.combine.combine_rows`).

Float32 accumulation in the fixed order k = 0..K-1 and fixed-butterfly dot products in the
backward: bitwise deterministic, no atomics, no host sync.

* :func:`combine` / :func:`combine_backward`: validating, allocating wrappers of
  ``_C.combine_forward`` / ``_C.combine_backward``;
* ``torch.ops.flexmoe_cuda.combine`` / ``combine_bwd``: functional custom ops with fake impls
  (``combine`` with ``weights_TK=None`` is also the gather's backward, see :mod:`.permute`);
* :class:`CudaCombineFunction`: differentiable combine (w.r.t. y and the weights).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._validate import check_positive_int
from ._ext import (
    _DTYPE_CODES, _FLOATS, _check_cuda, _check_pairs, _check_same_device, _on, _ptr, _stream, extension,
)

__all__ = ["CudaCombineFunction", "combine", "combine_backward"]

_NS = "flexmoe_cuda"


def combine(
    y_PD: torch.Tensor, weights_TK: Optional[torch.Tensor], inv_sorted_pairs_P: torch.Tensor, top_k: int
) -> torch.Tensor:
    """(T, D) ``out[t] = sum_k weights[t, k] * y_PD[inv[t*K + k]]`` in y's dtype.

    Float32 accumulation in the fixed order k = 0..K-1 (bitwise deterministic, no atomics).
    ``weights_TK`` None means all ones (this is the backward of
    :func:`.permute.gather_rows`).

    Args: y_PD (P=T*K, D) float CUDA contiguous; weights_TK (T, K) float32 or None;
    inv_sorted_pairs_P (P,) int32 (position of pair t*K+k in y's rows).
    """
    _check_cuda(y_PD, "y", ndim=2, dtypes=_FLOATS)
    check_positive_int(top_k, "top_k")
    P, D = y_PD.shape
    if P % top_k:
        raise ValueError(f"y must have T*K rows (a multiple of top_k={top_k}), got {P}")
    T = P // top_k
    if weights_TK is not None:
        _check_cuda(weights_TK, "weights", shape=(T, top_k), dtypes=(torch.float32,))
        _check_same_device(y_PD, "y", weights=weights_TK)
    _check_pairs(inv_sorted_pairs_P, "inv_sorted_pairs", P, y_PD, "y")
    out = torch.empty(T, D, dtype=y_PD.dtype, device=y_PD.device)
    if T == 0 or D == 0:
        return out.zero_()
    C = extension()
    with _on(y_PD.device):
        C.combine_forward(
            y_PD.data_ptr(), _DTYPE_CODES[y_PD.dtype], T, D, top_k, _ptr(weights_TK),
            inv_sorted_pairs_P.data_ptr(), out.data_ptr(), _stream(y_PD.device),
        )
    return out


def combine_backward(
    grad_out_TD: torch.Tensor,
    y_PD: Optional[torch.Tensor],
    weights_TK: Optional[torch.Tensor],
    inv_sorted_pairs_P: torch.Tensor,
    top_k: int,
    *,
    need_grad_y: bool = True,
    need_grad_weights: bool = True,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of :func:`combine`: ``(grad_y_PD, grad_weights_TK)``.

    ``grad_y[inv[t*K+k]] = weights[t, k] * grad_out[t]`` (y's dtype) and
    ``grad_weights[t, k] = <grad_out[t], y[inv[t*K+k]]>`` (float32, fixed-order reduction).
    ``y_PD`` is needed only for ``grad_weights``. Unrequested results are None.
    """
    _check_cuda(grad_out_TD, "grad_out", ndim=2, dtypes=_FLOATS)
    check_positive_int(top_k, "top_k")
    T, D = grad_out_TD.shape
    P = T * top_k
    if need_grad_weights:
        if y_PD is None:
            raise ValueError("y must be given when need_grad_weights is True")
        _check_cuda(y_PD, "y", shape=(P, D), dtypes=(grad_out_TD.dtype,))
        _check_same_device(grad_out_TD, "grad_out", y=y_PD)
    if weights_TK is not None:
        _check_cuda(weights_TK, "weights", shape=(T, top_k), dtypes=(torch.float32,))
        _check_same_device(grad_out_TD, "grad_out", weights=weights_TK)
    _check_pairs(inv_sorted_pairs_P, "inv_sorted_pairs", P, grad_out_TD, "grad_out")
    dev = grad_out_TD.device
    dy = torch.empty(P, D, dtype=grad_out_TD.dtype, device=dev) if need_grad_y else None
    dw = torch.empty(T, top_k, dtype=torch.float32, device=dev) if need_grad_weights else None
    if (dy is None and dw is None) or T == 0:
        return dy, dw
    if D == 0:
        return dy, (dw.zero_() if dw is not None else None)
    C = extension()
    with _on(dev):
        C.combine_backward(
            grad_out_TD.data_ptr(), _DTYPE_CODES[grad_out_TD.dtype], T, D, top_k,
            _ptr(y_PD if need_grad_weights else None), _ptr(weights_TK),
            inv_sorted_pairs_P.data_ptr(), _ptr(dy), _ptr(dw), _stream(dev),
        )
    return dy, dw


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op(f"{_NS}::combine", mutates_args=())
def _combine_op(
    y_PD: torch.Tensor, weights_TK: Optional[torch.Tensor], inv_sorted_pairs_P: torch.Tensor, top_k: int
) -> torch.Tensor:
    return combine(y_PD.contiguous(), weights_TK, inv_sorted_pairs_P, top_k)


@_combine_op.register_fake
def _combine_fake(y_PD, weights_TK, inv_sorted_pairs_P, top_k):
    return y_PD.new_empty((y_PD.shape[0] // top_k, y_PD.shape[1]))


@torch.library.custom_op(f"{_NS}::combine_bwd", mutates_args=())
def _combine_bwd_op(
    grad_out_TD: torch.Tensor,
    y_PD: torch.Tensor,
    weights_TK: torch.Tensor,
    inv_sorted_pairs_P: torch.Tensor,
    top_k: int,
    need_grad_y: bool,
    need_grad_weights: bool,
) -> list[torch.Tensor]:
    """[grad_y_PD, grad_weights_TK]; an unrequested one is an empty (0,) tensor."""
    dy, dw = combine_backward(grad_out_TD.contiguous(), y_PD, weights_TK, inv_sorted_pairs_P, top_k,
                              need_grad_y=need_grad_y, need_grad_weights=need_grad_weights)
    if dy is None:
        dy = grad_out_TD.new_empty((0,))
    if dw is None:
        dw = grad_out_TD.new_empty((0,), dtype=torch.float32)
    return [dy, dw]


@_combine_bwd_op.register_fake
def _combine_bwd_fake(grad_out_TD, y_PD, weights_TK, inv_sorted_pairs_P, top_k, need_grad_y, need_grad_weights):
    T, D = grad_out_TD.shape
    dy = grad_out_TD.new_empty((T * top_k, D) if need_grad_y else (0,))
    dw = grad_out_TD.new_empty((T, top_k) if need_grad_weights else (0,), dtype=torch.float32)
    return [dy, dw]


# ----------------------------------------------------------------------------- autograd


class CudaCombineFunction(torch.autograd.Function):
    """``apply(y_PD, weights_TK, inv_sorted_pairs_P, top_k) -> out_TD`` (:func:`combine`)."""

    @staticmethod
    def forward(ctx, y_PD, weights_TK, inv_sorted_pairs_P, top_k):
        y_PD = y_PD.contiguous()
        weights_TK = weights_TK.contiguous()
        ctx.save_for_backward(y_PD, weights_TK, inv_sorted_pairs_P)
        ctx.top_k = top_k
        return torch.ops.flexmoe_cuda.combine(y_PD, weights_TK, inv_sorted_pairs_P, top_k)

    @staticmethod
    def backward(ctx, g_TD):
        y, w, inv = ctx.saved_tensors
        need_dy, need_dw = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        if not (need_dy or need_dw):
            return None, None, None, None
        dy, dw = torch.ops.flexmoe_cuda.combine_bwd(g_TD, y, w, inv, ctx.top_k, need_dy, need_dw)
        return (dy if need_dy else None), (dw if need_dw else None), None, None
