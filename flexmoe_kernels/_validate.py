"""Argument checks whose errors name the argument and the values seen.

Never ``assert`` for user input (it vanishes under ``python -O``); use these.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = [
    "check_tensor",
    "check_positive_int",
    "check_same_device",
]


def check_tensor(
    t: object,
    name: str,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    floating: bool = False,
) -> torch.Tensor:
    """Validate ``t`` and return it.

    ``shape`` may hold ``None`` for dimensions that are free. Raises ``TypeError`` for a
    non-tensor or a wrong dtype and ``ValueError`` for a wrong rank, shape or device.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on device {device}, got {t.device}")
    return t


def check_positive_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        seen = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"all tensors must be on one device, got {seen}")
