"""The small launch helpers every Triton op of this backend shares.

* :func:`is_available`: can the kernels run on a device (CUDA, or CPU under Triton's
  interpreter, ``TRITON_INTERPRET=1`` set before the kernel modules were imported)?
* :func:`kernels`: a kernel module, imported on first use (``TRITON_INTERPRET`` is read then).
* :func:`alloc`: every output/scratch buffer the kernels fully write comes from here; tests
  replace it (``monkeypatch.setattr(launch, "alloc", ...)``) with NaN/sentinel-poisoned
  buffers so an unwritten element fails. Callers use ``launch.alloc(...)`` (module
  attribute, so the patch is seen).
* :func:`tma_supported` / :func:`tma_compatible`: can a kernel read an operand through a TMA
  tensor descriptor (``tl.make_tensor_descriptor``: Triton >= 3.4, sm_90+ or the interpreter;
  16-byte aligned base and leading strides, unit last stride)? Configs ask for ``tma`` and the
  launchers resolve it off where these say no (sm_80, old Triton, odd strides).
* :func:`ensure_triton_allocator`: device-side descriptors need a global scratch buffer from
  the allocator set by ``triton.set_allocator``; set one (torch memory) if none is set. It is a
  context variable, so it is checked in the launching thread (autograd's backward thread too).
* :func:`num_programs`: the grid of a persistent kernel (SM count; 3 under the interpreter, so
  each program loops over several tiles).
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

__all__ = ["is_available", "check_runnable", "kernels", "interpreting", "alloc", "next_pow2", "cdiv",
           "dot_precision", "tma_supported", "tma_compatible", "ensure_triton_allocator", "num_programs"]

_KERNEL_MODULES = ("routing_kernels", "grouped_gemm_kernels", "grouped_gemm_bwd_kernels")


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton cannot be imported: {exc}"
    return None


def kernels(name: str):
    """The kernel module ``flexmoe_kernels.ops.triton.<name>`` (one of ``_KERNEL_MODULES``),
    imported on first use."""
    if name not in _KERNEL_MODULES:
        raise ValueError(f"name must be one of {_KERNEL_MODULES}, got {name!r}")
    return importlib.import_module(f"{__package__}.{name}")


def interpreting() -> bool:
    """True when the kernels were created under ``TRITON_INTERPRET=1``."""
    return type(kernels("routing_kernels")._topk_softmax_kernel).__name__ == "InterpretedFunction"


def is_available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """``(available, reason)``: can the Triton kernels run on ``device``?

    CUDA devices need an importable Triton and a visible GPU; CPU tensors need Triton's
    interpreter (``TRITON_INTERPRET=1`` in the environment before the kernels are imported).
    """
    device = torch.device(device)
    err = _triton_import_error()
    if err is not None:
        return False, err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, "triton on CUDA"
    if device.type == "cpu":
        try:
            interp = interpreting()
        except Exception as exc:  # noqa: BLE001 - a kernel module that fails to import
            return False, f"cannot import the Triton kernels: {exc}"
        if interp:
            return True, "triton interpreter (TRITON_INTERPRET=1)"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return False, "TRITON_INTERPRET=1 was set after the Triton kernels were imported"
        return False, "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing"
    return False, f"device type {device.type!r} is not supported by the Triton kernels"


def check_runnable(device: torch.device, what: str) -> None:
    """``RuntimeError`` naming ``what`` and the reason when the kernels cannot run on ``device``."""
    if device.type == "cuda" and torch.cuda.is_available():
        return  # the tensors are there, so CUDA works; triton imports on first launch
    ok, why = is_available(device)
    if not ok:
        raise RuntimeError(f"{what} cannot run on {device}: {why}")


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output/scratch buffer (every element is written by a kernel)."""
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch (IEEE unless ``allow_tf32``); 16-bit: default."""
    if dtype != torch.float32:
        return "default"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def tma_supported(device: torch.device) -> bool:
    """True when kernels on ``device`` can use ``tl.make_tensor_descriptor``: the Triton has it
    and the device is a CUDA GPU of compute capability >= 9.0 (TMA) or the CPU interpreter."""
    import triton.language as tl

    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu" and interpreting()


def tma_compatible(t: torch.Tensor, strides: tuple[int, ...], offset_elems: int = 0) -> bool:
    """Can a descriptor over ``t``'s storage with these ``strides`` (elements; the last must be
    1, the others 16-byte multiples) starting ``offset_elems`` past ``t.data_ptr()`` be made?"""
    size = t.element_size()
    return (strides[-1] == 1 and all(s * size % 16 == 0 for s in strides[:-1])
            and (t.data_ptr() + offset_elems * size) % 16 == 0)


def _triton_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_triton_allocator(device: torch.device) -> None:
    """Set ``triton.set_allocator`` to torch memory if no allocator is set in this thread (CUDA
    only; the interpreter needs none). Leaves a caller's own allocator alone."""
    if device.type != "cuda":
        return
    import triton

    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # a Triton without these internals: set ours
        pass
    triton.set_allocator(_triton_scratch)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_programs(device: torch.device) -> int:
    """Programs of a persistent kernel: the device's SM count (3 off CUDA: the interpreter runs
    several tiles per program, which is what the tests exercise)."""
    if device.type == "cuda":
        return _sm_count(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))
    return 3
