"""Backend registry, availability, and the measured "auto" choice.

Legend: T tokens, D hidden, F expert width, E experts, K top-k.

A backend is a module exposing

* ``is_available(device) -> (bool, reason)``;
* ``forward(args: LayerArgs) -> (out_TD, logits_TE)`` (see :mod:`.args` and :mod:`.layer`).

===========  =========================================  ====================================
name         module                                     runs on
===========  =========================================  ====================================
``torch``    :mod:`flexmoe_kernels.ops.reference`       any device (the executable spec)
``triton``   :mod:`flexmoe_kernels.ops.triton`          CUDA; CPU under ``TRITON_INTERPRET=1``
``cuda``     :mod:`flexmoe_kernels.ops.cuda`            CUDA with the compiled ``_C``
===========  =========================================  ====================================

``"auto"`` (:func:`resolve_backend`) is "torch" off CUDA; on CUDA it times every available
backend once per (device, shape bucket, dtype) on random inputs of the problem's shape
(forward only, median of a few CUDA-event timed runs after a warm-up) and caches the fastest
(:func:`choose_backend`). The bucket rounds T up to a power of two; D, F, E, K and the dtype
are exact. No measurement (static order triton, cuda, torch) when no problem is given, while
a CUDA graph is captured or torch.compile traces (unless already cached), when measuring
would need more than a quarter of the free device memory, or when ``FLEXMOE_AUTOSELECT=0``.
``FLEXMOE_AUTO_BACKEND=<name>`` pins the choice for CUDA devices.
"""
from __future__ import annotations

import importlib
import os
import statistics
from typing import Optional

import torch

from .args import validate_layer_args

__all__ = [
    "BACKENDS",
    "backend_module",
    "backend_status",
    "available_backends",
    "resolve_backend",
    "choose_backend",
    "clear_cache",
    "cached_choices",
    "bucket_key",
]

BACKENDS = {
    "torch": "flexmoe_kernels.ops.reference.backend",
    "triton": "flexmoe_kernels.ops.triton.backend",
    "cuda": "flexmoe_kernels.ops.cuda.backend",
}
_STATIC_ORDER = ("triton", "cuda", "torch")


_MODULES: dict = {}


def backend_module(name: str):
    """The module of backend ``name``; ``ValueError`` listing the names for an unknown one.

    Modules are imported once and cached (they import neither Triton nor ``_C``); the cache is
    filled when this module loads, so ``torch.compile`` traces a plain dict lookup here.
    """
    mod = _MODULES.get(name)
    if mod is None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS) + ['auto']}, got {name!r}")
        mod = _MODULES[name] = importlib.import_module(BACKENDS[name])
    return mod


def backend_status(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(available, reason) for backend ``name`` on ``device``; never raises for a missing module."""
    device = torch.device(device)
    try:
        mod = backend_module(name)
    except ImportError as exc:  # optional dependency (triton) or unbuilt extension
        return False, f"cannot import {BACKENDS[name]}: {exc}"
    return mod.is_available(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``."""
    return [n for n in BACKENDS if backend_status(n, device)[0]]


def resolve_backend(name: str, device: torch.device | str, problem: Optional[dict] = None) -> str:
    """Map ``name`` (possibly ``"auto"``) to a concrete, available backend for ``device``.

    ``problem`` optionally describes the shape (``T, D, F, E, K, dtype``) so "auto" can use a
    measured choice (:func:`choose_backend`). Raises ``RuntimeError`` with the reason when a
    named backend is unavailable.
    """
    device = torch.device(device)
    if name != "auto":
        ok, why = backend_status(name, device)
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available on {device}: {why}")
        return name
    if device.type != "cuda":
        return "torch"
    choice = choose_backend(device, problem)
    if choice is not None:
        return choice
    return next((c for c in _STATIC_ORDER if backend_status(c, device)[0]), "torch")


for _name in BACKENDS:  # fill the cache now (an import error is reported by backend_status)
    try:
        backend_module(_name)
    except ImportError:
        pass


# ----------------------------------------------------------------------------- measured "auto"
_CACHE: dict = {}


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


def _time_backend(name: str, args, reps: int = 5) -> float:
    fn = backend_module(name).forward
    with torch.no_grad():
        fn(args)  # warm-up (compiles / autotunes)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _measure_all(device: torch.device, key: tuple) -> dict:
    """{backend: median forward ms} on random inputs of the bucket's shape (untimed failures
    are simply not candidates)."""
    _, T, D, Fw, E, K, dtype = key
    gen = torch.Generator(device=device).manual_seed(0)
    timings = {}
    with torch.cuda.device(device):
        def rnd(*shape, scale):
            return torch.randn(*shape, device=device, dtype=dtype, generator=gen) * scale

        args = validate_layer_args(rnd(T, D, scale=1.0), rnd(E, D, scale=D**-0.5),
                                   rnd(E, 2 * Fw, D, scale=D**-0.5), rnd(E, D, Fw, scale=Fw**-0.5),
                                   K, validate=False)
        for name in BACKENDS:
            if not backend_status(name, device)[0]:
                continue
            try:
                timings[name] = _time_backend(name, args)
            except Exception:  # a backend that cannot run this shape is simply not chosen
                continue
    return timings


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
    _, T, D, Fw, E, K, dtype = key
    elt = torch.empty((), dtype=dtype).element_size()
    need = (3 * E * Fw * D + T * D * (2 + 2 * K) + T * K * 2 * Fw) * elt
    free, _total = torch.cuda.mem_get_info(device)
    if need > free // 4:
        return None
    timings = _measure_all(device, key)
    if not timings:
        return None
    choice = min(timings, key=timings.get)
    _CACHE[key] = (choice, timings)
    return choice
