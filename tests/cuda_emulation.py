"""A pure-PyTorch stand-in for the compiled extension ``flexmoe_kernels._C`` so that the
"cuda" backend's Python glue runs on CPU tensors.

:class:`EmulatedC` has the raw-pointer API of ``_C`` (pointers, sizes, dtype codes, stream as
plain ints; semantics taken from the reference ops). With it installed (:func:`emulate_cuda`,
or the fixtures registered in conftest: ``emulated_cuda`` and the parametrised
``cuda_glue_device``) the stage wrappers (``ops/cuda/routing.py``, ``permute.py``,
``combine.py``), their ``flexmoe_cuda`` custom ops and autograd Functions, the expert stage
(torch's ``grouped_mm`` on CPU in bf16) and ``fk.flexmoe_forward(..., backend="cuda")`` run on
the CPU tier end to end. It does NOT test the CUDA code: the ``gpu`` tier does.
"""
from __future__ import annotations

import ctypes
import math

import pytest
import torch

from flexmoe_kernels.ops.cuda import _ext as cuda_ext
from flexmoe_kernels.ops.cuda import backend as cuda_backend
from flexmoe_kernels.ops.cuda import experts as cuda_experts
from flexmoe_kernels.ops.reference.routing import route

__all__ = ["EmulatedC", "emulate_cuda", "emulated_cuda", "cuda_glue_device"]

_DT = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}  # csrc/flexmoe.h: enum DType


def _at(ptr: int, shape, dtype) -> torch.Tensor:
    """The CPU memory at ``ptr`` as a tensor (no copy)."""
    n = math.prod(shape)
    if n == 0 or ptr == 0:
        return torch.empty(shape, dtype=dtype)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype, count=n).view(shape)


class EmulatedC:
    """The launchers of ``_C`` on CPU memory (same arguments, same outputs)."""

    MAX_EXPERTS = 256

    @staticmethod
    def router_workspace_bytes(T, E):
        return 16 + 4 * E * ((T + 31) // 32)

    @staticmethod
    def router_forward(logits, dtype, T, E, K, bias, mask, mask_mode, renorm, ids, w, probs, z, counts,
                       offsets, sorted_pairs, inv_pairs, workspace, workspace_bytes, stream):
        lg = _at(logits, (T, E), _DT[dtype]).clone()
        m = None if mask_mode == 0 else _at(mask, (E,) if mask_mode == 1 else (T, E), torch.bool).clone()
        b = None if bias == 0 else _at(bias, (E,), torch.float32).clone()
        plan = route(lg, K, allow_mask=m, expert_bias=b, norm_topk_prob=renorm, validate=False)
        _at(ids, (T, K), torch.int32).copy_(plan.topk_ids_TK)
        _at(w, (T, K), torch.float32).copy_(plan.topk_weights_TK.detach())
        _at(probs, (T, E), torch.float32).copy_(torch.softmax(plan.logits_TE, -1))
        if z:
            _at(z, (T, E), torch.float32).copy_(plan.logits_TE)
        _at(counts, (E,), torch.int32).copy_(plan.counts_E)
        _at(offsets, (E + 1,), torch.int32).copy_(plan.offsets_E1)
        _at(sorted_pairs, (T * K,), torch.int32).copy_(plan.sorted_pairs_P)
        _at(inv_pairs, (T * K,), torch.int32).copy_(plan.inv_sorted_pairs_P)

    @staticmethod
    def router_backward(probs, ids, w, d_w, d_z, mask, mask_mode, T, E, K, renorm, dz_out, stream):
        p = _at(probs, (T, E), torch.float32).clone()
        # csrc/routing.cu allowed_at: no mask = every expert allowed (also one whose probability
        # underflowed to 0, e.g. a bias of -200: its z-loss gradient still flows)
        if mask_mode == 0:
            allowed = torch.ones(T, E, dtype=torch.bool)
        else:
            allowed = _at(mask, (E,) if mask_mode == 1 else (T, E), torch.bool).expand(T, E)
        idx = _at(ids, (T, K), torch.int32).long()
        dp = torch.zeros_like(p)
        if d_w:  # closed form (custom ops run below autograd, so no torch.autograd here)
            gw = _at(d_w, (T, K), torch.float32)
            if renorm:
                pk = p.gather(1, idx)
                S = pk.sum(-1, keepdim=True)
                gw = (gw - (gw * pk / S).sum(-1, keepdim=True)) / S
            dp.scatter_(1, idx, gw)
        g = p * (dp - (p * dp).sum(-1, keepdim=True))
        if d_z:
            g = g + torch.where(allowed, _at(d_z, (T, E), torch.float32), torch.zeros_like(p))
        _at(dz_out, (T, E), torch.float32).copy_(g)

    @staticmethod
    def gather_rows(src, elem_bytes, T, D, sorted_pairs, P, K, dst, stream):
        dt = torch.int16 if elem_bytes == 2 else torch.int32
        idx = _at(sorted_pairs, (P,), torch.int32).long() // K
        _at(dst, (P, D), dt).copy_(_at(src, (T, D), dt)[idx])

    @staticmethod
    def combine_forward(y, dtype, T, D, K, w, inv, out, stream):
        yy = _at(y, (T * K, D), _DT[dtype]).float()[_at(inv, (T * K,), torch.int32).long()].view(T, K, D)
        ww = _at(w, (T, K), torch.float32) if w else torch.ones(T, K)
        _at(out, (T, D), _DT[dtype]).copy_((ww[:, :, None] * yy).sum(1))

    @staticmethod
    def combine_backward(dout, dtype, T, D, K, y, w, inv, dy, dw, stream):
        g = _at(dout, (T, D), _DT[dtype]).float()
        rows = _at(inv, (T * K,), torch.int32).long()
        ww = _at(w, (T, K), torch.float32) if w else torch.ones(T, K)
        if dy:
            out = _at(dy, (T * K, D), _DT[dtype])
            out[rows] = (ww.reshape(-1, 1) * g.repeat_interleave(K, 0)).to(_DT[dtype])
        if dw:
            yy = _at(y, (T * K, D), _DT[dtype]).float()[rows].view(T, K, D)
            _at(dw, (T, K), torch.float32).copy_((g[:, None, :] * yy).sum(-1))


def emulate_cuda(monkeypatch) -> str:
    """Install :class:`EmulatedC` as ``_C``, let the wrappers accept CPU tensors and report
    the "cuda" backend available on the CPU (so ``resolve_backend("cuda", "cpu")`` and the
    module path work); clears the grouped_mm probe cache. All undone by ``monkeypatch``.
    Returns the device to use: "cpu"."""
    real_is_available = cuda_backend.is_available

    def is_available(device):
        if torch.device(device).type == "cpu":
            return True, "emulated _C (tests/cuda_emulation.py)"
        return real_is_available(device)

    monkeypatch.setattr(cuda_backend, "is_available", is_available)
    monkeypatch.setattr(cuda_ext, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda_ext, "_C", EmulatedC)
    monkeypatch.setattr(cuda_ext, "cuda_unavailable_reason", lambda: "")
    monkeypatch.setattr(cuda_ext, "_ext_ready", False)  # restored afterwards
    monkeypatch.setattr(cuda_experts, "_grouped_mm_ok", {})
    return "cpu"


@pytest.fixture
def emulated_cuda(monkeypatch):
    """The "cuda" backend's glue on CPU tensors (:func:`emulate_cuda`); the device: "cpu"."""
    return emulate_cuda(monkeypatch)


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def cuda_glue_device(request, monkeypatch):
    """The device on which the "cuda" stage wrappers run: "cpu" under the emulation (CPU tier),
    "cuda" with the real extension (``gpu`` tier)."""
    if request.param == "emulated":
        return emulate_cuda(monkeypatch)
    return "cuda"
