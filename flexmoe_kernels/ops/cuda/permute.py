"""The "cuda" backend's permutation stage: token rows in expert-grouped pair order
(csrc/permute.cu).

Legend: T tokens, D hidden, K top-k, P = T*K routed pairs (pair id ``p = t*K + k``).

Shapes: x_TD (T, D) float32/float16/bfloat16 and sorted_pairs_P (P,) int32 (from the
routing plan) -> x_PD (P, D) in x's dtype, row ``i`` = ``x_TD[sorted_pairs_P[i] // K]``, so
expert e's rows are ``offsets_E1[e]:offsets_E1[e+1]`` (``docs/SEMANTICS.md`` §2-§3; the same
rows as the reference :func:`~flexmoe_kernels.ops.reference.permute.permute_rows`).

* :func:`gather_rows`: validating, allocating wrapper of ``_C.gather_rows`` (one warp per row,
  16-byte vector copies where aligned, int64 row offsets; no host sync);
* ``torch.ops.flexmoe_cuda.gather``: the same as a functional custom op with a fake impl;
* :class:`CudaGatherFunction`: differentiable gather; its backward is the combine with unit
  weights (``torch.ops.flexmoe_cuda.combine``, :mod:`.combine`): a deterministic gather-sum
  of the K copies of each token, no atomics.
"""
from __future__ import annotations

import torch

from ..._validate import check_positive_int
from . import combine as _combine  # noqa: F401  registers flexmoe_cuda::combine (the backward)
from ._ext import _FLOATS, _check_cuda, _check_pairs, _on, _stream, extension

__all__ = ["CudaGatherFunction", "gather_rows"]

_NS = "flexmoe_cuda"


def gather_rows(x_TD: torch.Tensor, sorted_pairs_P: torch.Tensor, top_k: int) -> torch.Tensor:
    """(P, D) rows ``x_TD[sorted_pairs_P[i] // top_k]``: the tokens in expert-grouped order.

    x_TD: (T, D) float32/float16/bfloat16 CUDA contiguous; sorted_pairs_P: (T*K,) int32 (a
    permutation of the pair ids, e.g. from :func:`.routing.router_forward`). Output dtype = x's.
    """
    _check_cuda(x_TD, "x", ndim=2, dtypes=_FLOATS)
    check_positive_int(top_k, "top_k")
    T, D = x_TD.shape
    P = T * top_k
    _check_pairs(sorted_pairs_P, "sorted_pairs", P, x_TD, "x")
    out = torch.empty(P, D, dtype=x_TD.dtype, device=x_TD.device)
    if P == 0 or D == 0:
        return out
    C = extension()
    with _on(x_TD.device):
        C.gather_rows(
            x_TD.data_ptr(), x_TD.element_size(), T, D, sorted_pairs_P.data_ptr(), P, top_k,
            out.data_ptr(), _stream(x_TD.device),
        )
    return out


@torch.library.custom_op(f"{_NS}::gather", mutates_args=())
def _gather_op(x_TD: torch.Tensor, sorted_pairs_P: torch.Tensor, top_k: int) -> torch.Tensor:
    return gather_rows(x_TD.contiguous(), sorted_pairs_P, top_k)


@_gather_op.register_fake
def _gather_fake(x_TD, sorted_pairs_P, top_k):
    return x_TD.new_empty((x_TD.shape[0] * top_k, x_TD.shape[1]))


class CudaGatherFunction(torch.autograd.Function):
    """``apply(x_TD, sorted_pairs_P, inv_sorted_pairs_P, top_k) -> x_PD`` (:func:`gather_rows`).

    Backward: ``dx[t] = sum_k dx_PD[inv[t*K+k]]`` (a deterministic gather-sum, no atomics).
    """

    @staticmethod
    def forward(ctx, x_TD, sorted_pairs_P, inv_sorted_pairs_P, top_k):
        ctx.save_for_backward(inv_sorted_pairs_P)
        ctx.top_k = top_k
        return torch.ops.flexmoe_cuda.gather(x_TD, sorted_pairs_P, top_k)

    @staticmethod
    def backward(ctx, g_PD):
        (inv,) = ctx.saved_tensors
        return torch.ops.flexmoe_cuda.combine(g_PD, None, inv, ctx.top_k), None, None, None
