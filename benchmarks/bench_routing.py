"""Routing benchmark: masked softmax-top-k + grouping, in GB/s against device-copy bandwidth.

Legend: T tokens, E experts, K top-k, P = T*K routed pairs.

Providers (each included only where it can run):

* ``torch_route``: :func:`flexmoe_kernels.route` (the reference).
* ``triton_route``: :func:`flexmoe_kernels.ops.triton.routing.triton_route` (fused kernels +
  padded tile schedule), when :func:`flexmoe_kernels.ops.triton.launch.is_available` says
  Triton can run on the device.
* ``cuda_route``: :func:`flexmoe_kernels.ops.cuda.routing.router_forward` (fused softmax-top-k,
  histogram, prefix sum, stable permutation), when ``backend_status("cuda")`` and
  ``cuda_is_available()`` say the extension can run.
* ``device_copy``: ``dst.copy_(src)`` of a buffer much larger than L2, measured in the same
  run: the bandwidth ceiling.

Every router is charged the same **minimal traffic** so that GB/s compare like for like:
``bytes = T*E*elt(logits) + mask bytes + T*K*(4 weight + 4 id + 4 grouped position) + 4*(E+1)``
(inputs read once, fp32 weights / int32 ids and the grouped order written once). The copy
moves ``2 * buffer bytes``. ``pct_of_copy = router GB/s / copy GB/s``. The router GEMM
``x @ R.T`` is not part of this benchmark (it is in the layer benchmark).
"""
from __future__ import annotations

import importlib
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import harness
from .bench_layer import make_mask, mask_applicable
from .presets import LAYER_PRESETS

ROUTING_MASKS = ["none", "token_mixed"]


@dataclass
class Router:
    name: str
    available: Callable[[torch.device], tuple[bool, str]]
    get: Callable[[], Callable]  # returns fn(logits_TE, K, allow_mask) -> plan


def _torch_available(device):
    return True, "flexmoe_kernels.route (PyTorch reference)"


def _torch_get():
    from flexmoe_kernels import route

    return lambda logits, k, mask: route(logits, k, allow_mask=mask, validate=False)


def _triton_available(device):
    try:
        importlib.import_module("flexmoe_kernels.ops.triton.routing")
        launch = importlib.import_module("flexmoe_kernels.ops.triton.launch")
    except Exception as exc:  # noqa: BLE001
        return False, f"cannot import flexmoe_kernels.ops.triton.routing: {exc}"
    ok, why = launch.is_available(device)
    return bool(ok), str(why)


def _triton_get():
    from flexmoe_kernels.ops.triton.routing import triton_route

    return lambda logits, k, mask: triton_route(logits, k, allow_mask=mask, validate=False)


def _cuda_available(device):
    try:
        import flexmoe_kernels

        ok, why = flexmoe_kernels.backend_status("cuda", device)
    except Exception as exc:  # noqa: BLE001
        return False, f"backend_status('cuda') failed: {exc}"
    if not ok:
        return False, why
    try:
        importlib.import_module("flexmoe_kernels.ops.cuda.routing")
        ext = importlib.import_module("flexmoe_kernels.ops.cuda._ext")
    except Exception as exc:  # noqa: BLE001
        return False, f"cannot import flexmoe_kernels.ops.cuda.routing: {exc}"
    if not ext.cuda_is_available():
        return False, f"CUDA extension unavailable: {ext.cuda_unavailable_reason()}"
    return True, "flexmoe_kernels.ops.cuda.routing.router_forward"


def _cuda_get():
    from flexmoe_kernels.ops.cuda.routing import router_forward

    # Fused softmax-top-k + histogram + prefix sum + stable permutation; no host sync.
    return lambda logits, k, mask: router_forward(logits, k, allow_mask=mask)


ROUTERS = {
    r.name: r
    for r in [
        Router("torch_route", _torch_available, _torch_get),
        Router("triton_route", _triton_available, _triton_get),
        Router("cuda_route", _cuda_available, _cuda_get),
    ]
}


def routing_bytes(T: int, E: int, K: int, logits_elt: int, mask: Optional[torch.Tensor]) -> int:
    """Minimal traffic charged to every router (see module docstring)."""
    mask_bytes = 0 if mask is None else mask.numel() * mask.element_size()
    return T * E * logits_elt + mask_bytes + T * K * 12 + 4 * (E + 1)


def measure_copy(device: torch.device, rec: harness.Recorder, timing: harness.TimingConfig,
                 nbytes: Optional[int] = None) -> Optional[float]:
    """Device-copy bandwidth (GB/s) of a buffer >> L2; one row, returns GB/s."""
    if nbytes is None:
        nbytes = 512 * 2**20 if device.type == "cuda" else 16 * 2**20
    try:
        src = torch.randn(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        t = harness.bench(lambda: dst.copy_(src), device, timing)
        moved = 2 * src.numel() * 4
        gbps = moved / (t.ms * 1e-3) / 1e9
        rec.add(bench="routing", provider="device_copy", mode="copy", mask="none", T=None,
                ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, bytes=moved, gbps=gbps,
                note=f"dst.copy_(src), {nbytes / 2**20:.0f} MiB buffer")
        return gbps
    except Exception as exc:  # noqa: BLE001
        rec.log(traceback.format_exc())
        rec.add(bench="routing", provider="device_copy", mode="copy", status="error", note=repr(exc)[:300])
        return None


def run_routing(presets, tokens, routers, masks, device, dtype, rec: harness.Recorder,
                timing: harness.TimingConfig, show_progress: bool = True,
                l2_bytes: int = harness.DEFAULT_L2_BYTES) -> None:
    copy_gbps = measure_copy(device, rec, timing)
    jobs = [(pn, T, r, m) for pn in presets for T in tokens for r in routers for m in masks
            if mask_applicable(m, LAYER_PRESETS[pn])]
    status = {r: ROUTERS[r].available(device) for r in routers}
    fns: dict[str, Callable] = {}
    elt = torch.empty((), dtype=dtype).element_size()
    for pn, T, r, m in harness.progress(jobs, len(jobs), "routing", show_progress):
        p = LAYER_PRESETS[pn]
        base = dict(bench="routing", preset=pn, provider=r, mode="fwd", mask=m, T=T, D=p.D, F=p.F,
                    E=p.E, K=p.K, dtype=str(dtype).replace("torch.", ""))
        ok, why = status[r]
        if not ok:
            rec.add(**base, status="skipped", note=why)
            continue
        try:
            if r not in fns:
                fns[r] = ROUTERS[r].get()
            fn = fns[r]
            n_sets = harness.num_buffer_sets(T * p.E * (elt + 1) + T * p.K * 12, l2_bytes, max_sets=16)
            logits = [torch.randn(T, p.E, device=device, dtype=dtype) for _ in range(n_sets)]
            mks = [make_mask(m, T, p, device) for _ in range(n_sets)]
            state = {"i": 0}

            def call():
                state["i"] = (state["i"] + 1) % n_sets
                return fn(logits[state["i"]], p.K, mks[state["i"]])

            t = harness.bench(call, device, timing)
            nbytes = routing_bytes(T, p.E, p.K, elt, mks[0])
            gbps = nbytes / (t.ms * 1e-3) / 1e9
            rec.add(**base, ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, bytes=nbytes, gbps=gbps,
                    copy_gbps=copy_gbps, pct_of_copy=(gbps / copy_gbps) if copy_gbps else None,
                    n_buffers=n_sets)
        except Exception as exc:  # noqa: BLE001
            rec.log(traceback.format_exc())
            rec.add(**base, status="error", note=f"{type(exc).__name__}: {str(exc)[:300]}")
            harness.free_memory(device)
