"""Loading of the CUDA extension ``flexmoe_kernels._C`` (csrc/) and the low-level helpers the
"cuda" backend's stage modules share.

Legend: T tokens, E experts (<= 256), K top-k, P = T*K routed (token, slot) pairs.

Layers, as everywhere in this backend: CUDA kernels (csrc/*.cu) -> raw-pointer launchers
(``_C``, pointers/sizes/dtype codes/stream as plain ints) -> the validating, allocating stage
wrappers (:mod:`.routing`, :mod:`.permute`, :mod:`.combine`) -> their ``torch.library`` custom
ops (namespace ``flexmoe_cuda``) and ``torch.autograd.Function`` s -> :mod:`.backend`.

Conventions the stage wrappers follow:

* every wrapper validates its tensors first (device, dtype, contiguity, shape; errors are
  ``TypeError``/``ValueError`` naming the argument) and only then loads the extension
  (:func:`extension`), so bad input is reported the same way on a machine without CUDA;
* outputs are allocated with ``torch.empty`` and every element is written by a kernel (no
  reliance on zeroed memory), on the current stream (:func:`_stream`); no wrapper
  synchronises with the host, so all of them can be captured in a CUDA graph;
* ``import flexmoe_kernels`` (and importing this package) never imports ``_C``;
  :func:`cuda_is_available` / :func:`cuda_unavailable_reason` say whether it can be used and
  why not.

``_DEVICE_TYPE`` is the device type the wrappers accept ("cuda"). Only the CPU tests change it
(together with :data:`_C`, replaced by a pure-PyTorch stand-in) to exercise the validation and
autograd glue without a GPU; the stage modules therefore read it as ``_ext._DEVICE_TYPE`` at
call time, never copy it.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional

import torch

from ..._validate import check_tensor

__all__ = ["cuda_is_available", "cuda_unavailable_reason", "extension"]

# dtype codes of the launchers (csrc/flexmoe.h: enum DType)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FLOATS = tuple(_DTYPE_CODES)
_MAX_EXPERTS = 256  # csrc/flexmoe.h: kMaxExperts
_INT32_MAX = 2**31 - 1

_C = None  # the imported flexmoe_kernels._C, once loaded
_C_error: Optional[str] = None  # why the import failed, once tried
_ext_ready = False  # extension() succeeded once (hot path skips the checks)
_DEVICE_TYPE = "cuda"


def _load_extension():
    """Import ``flexmoe_kernels._C`` once; remember the error text if it fails."""
    global _C, _C_error
    if _C is None and _C_error is None:
        try:
            _C = importlib.import_module("flexmoe_kernels._C")
        except ImportError as exc:  # not built, or built for another Python / platform
            _C_error = (
                f"the CUDA extension flexmoe_kernels._C is not importable ({exc}); build it with "
                "`python setup.py build_ext --inplace` or `pip install -e .` on a machine with nvcc "
                "(FLEXMOE_SKIP_CUDA_BUILD must not be set)"
            )
    return _C


def cuda_unavailable_reason() -> str:
    """Why the CUDA kernels cannot run here, or ``""`` when they can.

    Checks, in order: the compiled extension imports; torch has CUDA; a CUDA device is present;
    the driver is new enough for the CUDA runtime the extension was built with (the only call
    into the extension, ``cudaDriverGetVersion``, which creates no context).
    """
    if _load_extension() is None:
        return _C_error or "the CUDA extension flexmoe_kernels._C is not importable"
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    built, driver = _C.built_cuda_version(), _C.driver_cuda_version()
    if driver // 1000 < built // 1000:
        return (
            f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10} but flexmoe_kernels._C "
            f"was built with CUDA {built // 1000}.{built % 1000 // 10} (static runtime); rebuild it with a "
            "toolkit no newer than the driver or update the driver"
        )
    return ""


def cuda_is_available() -> bool:
    """True when ``flexmoe_kernels._C`` imports and a CUDA device is present."""
    return cuda_unavailable_reason() == ""


def extension():
    """The loaded ``_C`` module; ``RuntimeError`` with the reason when it cannot be used.

    The availability check runs until it first succeeds, then is cached (hot path)."""
    global _ext_ready
    if not _ext_ready:
        why = cuda_unavailable_reason()
        if why:
            raise RuntimeError(f"flexmoe_kernels CUDA kernels are unavailable: {why}")
        _ext_ready = True
    return _C


# ----------------------------------------------------------------------------- validation


def _check_cuda(t: object, name: str, *, dtypes, shape=None, ndim=None) -> torch.Tensor:
    """Type/shape/dtype checks (``check_tensor``), then CUDA device and contiguity."""
    check_tensor(t, name, ndim=ndim, shape=shape, dtypes=dtypes)
    if t.device.type != _DEVICE_TYPE:
        raise ValueError(f"{name} must be a CUDA tensor, got a tensor on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())} for shape {tuple(t.shape)}")
    return t


def _check_same_device(ref: torch.Tensor, ref_name: str, **others: Optional[torch.Tensor]) -> None:
    """``ValueError`` naming the first of ``others`` (not None) on another device than ``ref``."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_mask(allow_mask, T: int, E: int, ref: torch.Tensor) -> Optional[torch.Tensor]:
    """None, or ``allow_mask`` checked: (E,) or (T, E) bool, CUDA, contiguous, on ref's device."""
    if allow_mask is None:
        return None
    _check_cuda(allow_mask, "allow_mask", dtypes=(torch.bool,))
    if tuple(allow_mask.shape) not in ((E,), (T, E)):
        raise ValueError(
            f"allow_mask must have shape (E,)=({E},) or (T, E)=({T}, {E}), got {tuple(allow_mask.shape)}"
        )
    _check_same_device(ref, "logits", allow_mask=allow_mask)
    return allow_mask


def _check_pairs(t: torch.Tensor, name: str, P: int, ref: torch.Tensor, ref_name: str) -> None:
    """``t`` is a (P,) int32 CUDA contiguous pair-id vector on ref's device."""
    _check_cuda(t, name, shape=(P,), dtypes=(torch.int32,))
    _check_same_device(ref, ref_name, **{name: t})


# ----------------------------------------------------------------------------- launch glue


def _stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an int (0 off CUDA: the emulation tests)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def _on(device: torch.device):
    """Make ``device`` current while launching (the static CUDA runtime in ``_C`` follows the
    context current on the thread, so tensors on another GPU than the current one work)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _ptr(t: Optional[torch.Tensor]) -> int:
    """Data pointer, 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def _mask_mode(mask: Optional[torch.Tensor], T: int, E: int) -> int:
    """Mask layout code of the launchers (csrc/flexmoe.h: enum MaskMode): 0 none, 1 (E,), 2 (T, E)."""
    if mask is None:
        return 0
    return 1 if mask.ndim == 1 else 2
