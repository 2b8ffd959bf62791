"""The "cuda" backend's expert stage: SwiGLU experts on expert-grouped rows.

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k, P = T*K routed pairs.

Shapes: x_PD (P, D) rows in expert-grouped order (from :mod:`.permute`), gate_up_E2FD
(E, 2F, D) (rows [0, F) gate, [F, 2F) up), down_EDF (E, D, F), counts_E (E,) / offsets_E1
(E+1,) int32 from the routing plan -> y_PD (P, D) in x's dtype, row ``i`` of expert e =
``down_e @ (silu(gate_e @ x_i) * (up_e @ x_i))`` (``docs/SEMANTICS.md`` §2-§4).

**This backend has no GEMM kernel of its own.** The grouped GEMM is torch's
``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm`` (CUTLASS) when usable: bfloat16,
D and F multiples of 8, compute capability >= 9.0, probed once per (device, dtype) with a tiny
problem (:func:`grouped_gemm_path` says which path a problem takes; ``FLEXMOE_CUDA_GROUPED_MM=0``
disables it). It takes the device-side int32 group ends ``offsets_E1[1:]``: no host sync,
capturable in a CUDA graph. Otherwise the stage is the reference's per-expert matmul loop,
:func:`flexmoe_kernels.ops.reference.experts.experts_per_expert`, which reads ``counts_E`` on
the host once per forward (cannot be captured in a CUDA graph).

Experts with no pairs (zero tokens or opted out) are never read: grouped_mm gets an empty group
for them and the loop skips them; their weight gradients are exact zeros (forced by
:class:`_KeepGrad`, because the grouped GEMM's backward is not guaranteed to write empty
groups). Frozen experts (``trainable_E[e] == False``) get exactly zero dW (on the grouped_mm
path the dW GEMM still runs for them and is then discarded; the loop detaches them).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..reference.experts import experts_per_expert

__all__ = ["experts_forward", "grouped_gemm_path"]

_grouped_mm_fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# (device type, index, dtype) -> whether the grouped_mm probe passed there
_grouped_mm_ok: dict = {}


@torch.compiler.assume_constant_result  # a one-time probe: a constant of a compiled graph
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


def _experts_grouped_mm(x_PD, gate_up_E2FD, down_EDF, counts_E, offsets_E1, trainable_E):
    """The grouped_mm path: two grouped GEMMs over the device-side group ends, no host sync."""
    keep_E = counts_E > 0
    if trainable_E is not None:
        keep_E = keep_E & trainable_E
    if gate_up_E2FD.requires_grad:
        gate_up_E2FD = _KeepGrad.apply(gate_up_E2FD, keep_E)
    if down_EDF.requires_grad:
        down_EDF = _KeepGrad.apply(down_EDF, keep_E)
    offs = offsets_E1[1:]  # (E,) int32 cumulative group ends, on the device
    h_P2F = _grouped_mm_fn(x_PD, gate_up_E2FD.transpose(-2, -1), offs=offs)
    Fw = down_EDF.shape[-1]
    a_PF = F.silu(h_P2F[:, :Fw]) * h_P2F[:, Fw:]
    return _grouped_mm_fn(a_PF, down_EDF.transpose(-2, -1), offs=offs)


def experts_forward(
    x_PD: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    counts_E: torch.Tensor,
    offsets_E1: torch.Tensor,
    trainable_E: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(P, D) expert outputs of the expert-grouped rows ``x_PD`` (see the module docstring for
    which GEMM runs). Differentiable w.r.t. x_PD and the weights; ``trainable_E`` (E,) bool
    marks frozen experts (False: no dW, dX still flows)."""
    D, Fw = x_PD.shape[1], down_EDF.shape[-1]
    if _grouped_mm_usable(x_PD.device, x_PD.dtype, D, Fw):
        return _experts_grouped_mm(x_PD, gate_up_E2FD, down_EDF, counts_E, offsets_E1, trainable_E)
    return experts_per_expert(x_PD, gate_up_E2FD, down_EDF, counts_E, trainable_E)
