"""Measured backend choice for ``backend="auto"`` (hooked from :func:`flexmoe_kernels.ops.moe.resolve_backend`).

Legend: T tokens, D hidden, F expert width, E experts, K top-k.

:func:`choose_backend` times every available backend ("torch", "triton", "cuda") once per
(device, shape bucket, dtype) on random inputs of the problem's shape (forward only, median
of a few CUDA-event timed runs after a warm-up) and caches the fastest. The bucket rounds T
up to a power of two; D, F, E, K and the dtype are exact. Returns None (static fallback
order in ``resolve_backend``) on CPU, when no problem is given, while a CUDA graph is being
captured or torch.compile is tracing (unless already cached), when measuring would need more
than a quarter of the free device memory, or when ``FLEXMOE_AUTOSELECT=0``.
``FLEXMOE_AUTO_BACKEND=<name>`` pins the choice for CUDA devices.
"""
from __future__ import annotations

import os
import statistics
from typing import Optional

import torch

__all__ = ["choose_backend", "clear_cache", "cached_choices", "bucket_key"]

_CACHE: dict = {}
_CANDIDATES = ("torch", "triton", "cuda")


def bucket_key(device: torch.device, problem: dict) -> tuple:
    """Cache key: (device index, T rounded up to a power of two, D, F, E, K, dtype)."""
    T = max(1, int(problem["T"]))
    t_bucket = 1 << (T - 1).bit_length()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (index, t_bucket, int(problem["D"]), int(problem["F"]), int(problem["E"]),
            int(problem["K"]), problem.get("dtype", torch.bfloat16))


def clear_cache() -> None:
    """Forget every measured choice."""
    _CACHE.clear()


def cached_choices() -> dict:
    """A copy of the cache: key -> (choice, {backend: median ms})."""
    return dict(_CACHE)


def _time_backend(name: str, args: tuple, kwargs: dict, reps: int = 5) -> float:
    from .moe import _backend_module

    fn = _backend_module(name).flexmoe_forward
    with torch.no_grad():
        fn(*args, **kwargs)  # warm-up (compiles / autotunes)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args, **kwargs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def choose_backend(device: torch.device, problem: Optional[dict]) -> Optional[str]:
    """The fastest available backend for ``problem`` on ``device`` (measured once), or None.

    ``problem``: dict with T, D, F, E, K (ints) and optionally dtype (default bfloat16).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    pinned = os.environ.get("FLEXMOE_AUTO_BACKEND")
    if pinned:
        return pinned
    if problem is None or os.environ.get("FLEXMOE_AUTOSELECT", "1") == "0":
        return None
    try:
        key = bucket_key(device, problem)
    except (KeyError, TypeError, ValueError):
        return None
    if key in _CACHE:
        return _CACHE[key][0]
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return None  # never measure inside a graph capture or a torch.compile trace

    from .moe import backend_status

    _, T, D, Fw, E, K, dtype = key
    elt = torch.empty((), dtype=dtype).element_size()
    need = (3 * E * Fw * D + T * D * (2 + 2 * K) + T * K * 2 * Fw) * elt
    free, _total = torch.cuda.mem_get_info(device)
    if need > free // 4:
        return None
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.cuda.device(device):
        x = torch.randn(T, D, device=device, dtype=dtype, generator=gen)
        router = torch.randn(E, D, device=device, dtype=dtype, generator=gen) * D**-0.5
        gate_up = torch.randn(E, 2 * Fw, D, device=device, dtype=dtype, generator=gen) * D**-0.5
        down = torch.randn(E, D, Fw, device=device, dtype=dtype, generator=gen) * Fw**-0.5
        timings = {}
        for name in _CANDIDATES:
            if not backend_status(name, device)[0]:
                continue
            try:
                timings[name] = _time_backend(name, (x, router, gate_up, down, K), {"validate": False})
            except Exception:  # a backend that cannot run this shape is simply not chosen
                continue
        del x, router, gate_up, down
    if not timings:
        return None
    choice = min(timings, key=timings.get)
    _CACHE[key] = (choice, timings)
    return choice
