"""The "cuda" backend: CUDA C++ routing / permutation / combine + grouped GEMM experts.

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k, P = T*K routed pairs.

Data flow of :func:`flexmoe_forward` (contract: ``docs/DESIGN.md``, semantics:
``shared/FLEXOLMO.md``):

1. ``logits_TE = x @ router_weight.T`` (torch, x's dtype, as the reference);
2. :class:`~flexmoe_kernels.ops.cuda_ops.CudaRouteFunction`: fused masked softmax-top-k,
   histogram, prefix sum and stable permutation (csrc/router.cu);
3. :class:`~flexmoe_kernels.ops.cuda_ops.CudaGatherFunction`: ``x_PD`` in expert-grouped order;
4. expert SwiGLU on the grouped rows with the fastest available grouped GEMM:
   ``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm`` (CUTLASS; bfloat16, D and F
   multiples of 8, compute capability >= 9.0, probed once per device) with device-side int32
   offsets, else a per-expert ``torch`` matmul loop;
5. :class:`~flexmoe_kernels.ops.cuda_ops.CudaCombineFunction`: weighted top-k sum (fp32,
   fixed order).

Host synchronisation: none on the grouped-GEMM path, forward or backward, except the optional
``validate`` mask check (skipped under CUDA-graph capture). The per-expert fallback reads
``counts_E`` on the host once per forward (and cannot be captured in a CUDA graph).

Experts with no pairs (zero tokens or opted out) are never read: grouped_mm gets an empty
group for them and the fallback skips them; their weight gradients are exact zeros (forced
with ``torch.where``, because grouped GEMM backward is not guaranteed to write empty groups).
Frozen experts (``trainable_experts[e] == False``) get exactly zero dW (on the grouped_mm path
the dW GEMM still runs for them and is then discarded; the fallback detaches them).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .._validate import check_positive_int, check_tensor
from . import cuda_ops
from .experts import check_expert_weights, swiglu_expert
from .routing import check_allow_mask_rows, mask_router_rows, normalize_allow_mask, router_logits

__all__ = ["is_available", "flexmoe_forward", "grouped_gemm_path"]

_grouped_mm_fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_grouped_mm_ok: dict = {}


def is_available(device: torch.device) -> tuple[bool, str]:
    """(True, "...") when the CUDA extension imports and ``device`` is a usable CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        why = cuda_ops.cuda_unavailable_reason()
        return False, f"the cuda backend needs a CUDA device, got {device}" + (f"; also: {why}" if why else "")
    why = cuda_ops.cuda_unavailable_reason()
    if why:
        return False, why
    return True, "CUDA extension flexmoe_kernels._C loaded"


def _grouped_mm_usable(device: torch.device, dtype: torch.dtype, D: int, Fw: int) -> bool:
    """Whether the fused grouped GEMM can run this problem (probed once per device/dtype)."""
    if os.environ.get("FLEXMOE_CUDA_GROUPED_MM", "1") == "0" or _grouped_mm_fn is None:
        return False
    if dtype != torch.bfloat16 or D % 8 or Fw % 8:
        return False
    is_cuda = device.type == "cuda"
    index = device.index if device.index is not None or not is_cuda else torch.cuda.current_device()
    key = (device.type, index, dtype)
    if key not in _grouped_mm_ok:
        if is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # cannot probe now; use the fallback (it raises under capture)
        ok = torch.cuda.get_device_capability(device) >= (9, 0) if is_cuda else True
        if ok:
            try:  # tiny probe: 3 groups, the middle one empty
                gen = torch.Generator(device=device).manual_seed(0)  # leave the global RNG alone
                a = torch.randn(6, 16, device=device, dtype=dtype, generator=gen)
                b = torch.randn(3, 8, 16, device=device, dtype=dtype, generator=gen)
                offs = torch.tensor([2, 2, 6], device=device, dtype=torch.int32)
                got = _grouped_mm_fn(a, b.transpose(-2, -1), offs=offs).float()
                ref = torch.cat([a[:2].float() @ b[0].float().T, a[2:].float() @ b[2].float().T])
                ok = bool(torch.allclose(got, ref, atol=1e-1, rtol=2e-2))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _grouped_mm_ok[key] = ok
    return _grouped_mm_ok[key]


def grouped_gemm_path(device: torch.device | str, dtype: torch.dtype, D: int, Fw: int) -> str:
    """"grouped_mm" or "per_expert": which expert GEMM the backend uses for this problem."""
    return "grouped_mm" if _grouped_mm_usable(torch.device(device), dtype, D, Fw) else "per_expert"


class _KeepGrad(torch.autograd.Function):
    """Identity on a stacked (E, ...) weight whose backward zeroes the slices of experts that
    must get no dW (``keep_E`` False: zero pairs or frozen), exactly, even if the GEMM left
    garbage or NaN there."""

    @staticmethod
    def forward(ctx, w, keep_E):
        ctx.save_for_backward(keep_E)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        shape = (-1,) + (1,) * (g.ndim - 1)
        return torch.where(keep.view(shape), g, torch.zeros((), dtype=g.dtype, device=g.device)), None


def _experts_grouped_mm(x_PD, gate_up_E2FD, down_EDF, counts_E, offsets_E1, trainable):
    keep_E = counts_E > 0
    if trainable is not None:
        keep_E = keep_E & trainable
    if gate_up_E2FD.requires_grad:
        gate_up_E2FD = _KeepGrad.apply(gate_up_E2FD, keep_E)
    if down_EDF.requires_grad:
        down_EDF = _KeepGrad.apply(down_EDF, keep_E)
    offs = offsets_E1[1:]  # (E,) int32 cumulative group ends, on the device
    h_P2F = _grouped_mm_fn(x_PD, gate_up_E2FD.transpose(-2, -1), offs=offs)
    Fw = down_EDF.shape[-1]
    a_PF = F.silu(h_P2F[:, :Fw]) * h_P2F[:, Fw:]
    return _grouped_mm_fn(a_PF, down_EDF.transpose(-2, -1), offs=offs)


def _experts_per_expert(x_PD, gate_up_E2FD, down_EDF, counts_E, trainable):
    counts = counts_E.tolist()  # host sync (documented); never under graph capture
    frozen = [False] * len(counts) if trainable is None else [not v for v in trainable.tolist()]
    pieces, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue  # zero-token / opted-out expert: weights never read, dW exactly 0
        w1, w2 = gate_up_E2FD[e], down_EDF[e]
        if frozen[e]:
            w1, w2 = w1.detach(), w2.detach()
        pieces.append(swiglu_expert(x_PD[start : start + n], w1, w2))
        start += n
    if not pieces:
        return x_PD.new_zeros(0, x_PD.shape[1])
    return torch.cat(pieces, 0)


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
    """See :func:`flexmoe_kernels.ops.moe.flexmoe_forward`; CUDA tensors only.

    Returns ``(out_TD, logits_TE)``: out in x's dtype, logits float32 masked (-inf where
    disallowed), both differentiable (x, router weight, expert bias, gate_up, down).
    """
    E, D, Fw = check_expert_weights(x_TD, gate_up_E2FD, down_EDF)
    check_tensor(router_weight_ED, "router_weight", shape=(E, D), floating=True)
    check_positive_int(top_k, "top_k")
    if top_k > E:
        raise ValueError(f"top_k={top_k} is larger than the number of experts E={E}")
    if x_TD.device.type != cuda_ops._DEVICE_TYPE:
        raise ValueError(f"the cuda backend needs CUDA tensors, x is on {x_TD.device}")
    if router_weight_ED.device != x_TD.device:
        raise ValueError(f"router_weight is on {router_weight_ED.device} but x is on {x_TD.device}")
    T = x_TD.shape[0]
    mask = normalize_allow_mask(allow_mask, T, E, x_TD.device)
    if mask is not None:
        mask = mask.contiguous()
    if validate:
        check_allow_mask_rows(mask, top_k, E)
    trainable = None
    if trainable_experts is not None:
        check_tensor(trainable_experts, "trainable_experts", shape=(E,), dtypes=(torch.bool,))
        trainable = trainable_experts.to(x_TD.device)
    if T == 0:
        from . import moe_torch

        return moe_torch.flexmoe_forward(
            x_TD, router_weight_ED, gate_up_E2FD, down_EDF, top_k, allow_mask=mask,
            expert_bias=expert_bias, norm_topk_prob=norm_topk_prob,
            trainable_experts=trainable_experts, validate=False,
        )

    # Opted-out experts' router rows are never read (a NaN there must not reach dX).
    logits_TE = router_logits(x_TD, mask_router_rows(router_weight_ED, mask))
    w_TK, z_TE, _ids, counts_E, offsets_E1, sorted_P, inv_P = cuda_ops.CudaRouteFunction.apply(
        logits_TE, expert_bias, mask, top_k, bool(norm_topk_prob)
    )
    x_PD = cuda_ops.CudaGatherFunction.apply(x_TD, sorted_P, inv_P, top_k)
    if _grouped_mm_usable(x_TD.device, x_TD.dtype, D, Fw):
        y_PD = _experts_grouped_mm(x_PD, gate_up_E2FD, down_EDF, counts_E, offsets_E1, trainable)
    else:
        y_PD = _experts_per_expert(x_PD, gate_up_E2FD, down_EDF, counts_E, trainable)
    out_TD = cuda_ops.CudaCombineFunction.apply(y_PD, w_TK, inv_P, top_k)
    return out_TD, z_TE
