"""The small launch helpers every Triton op of this backend shares.

* :func:`is_available`: can the kernels run on a device (CUDA, or CPU under Triton's
  interpreter, ``TRITON_INTERPRET=1`` set before the kernel modules were imported)?
* :func:`kernels`: a kernel module, imported on first use (``TRITON_INTERPRET`` is read then).
* :func:`alloc`: every output/scratch buffer the kernels fully write comes from here; tests
  replace it (``monkeypatch.setattr(launch, "alloc", ...)``) with NaN/sentinel-poisoned
  buffers so an unwritten element fails. Callers use ``launch.alloc(...)`` (module
  attribute, so the patch is seen).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

__all__ = ["is_available", "check_runnable", "kernels", "interpreting", "alloc", "next_pow2", "cdiv",
           "dot_precision"]

_KERNEL_MODULES = ("routing_kernels", "grouped_gemm_kernels")


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton cannot be imported: {exc}"
    return None


def kernels(name: str):
    """The kernel module ``flexmoe_kernels.ops.triton.<name>`` (``routing_kernels`` or
    ``grouped_gemm_kernels``), imported on first use."""
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
