"""Self-check of a layer implementation against the reference before it is timed: the GPU
sweep times only what computes the layer correctly.

Legend: T tokens, D hidden, F expert width, E experts, K top-k.

The check runs the benchmark shape (D, F, E, K) on a token slice (:func:`check_tokens`: at
least 512 rows per expert on a GPU, so training-size 128-row tiles and several tiles per
expert run) with the launch configs the timed run resolves at the full T (pinned through
``FLEXMOE_TRITON_CONFIG``, so the very kernels that are timed are the ones checked), in bf16
on a GPU (fp32 on the CPU): forward + backward of ``loss = <out, dout> + <logits, dlogits>``,
and a forward under ``torch.no_grad()`` (the timed ``fwd`` mode).

The pass rule is the tests' bf16 rule (``tests/helpers.py::assert_matches_reference``): for
each of out, logits and the gradients of x, the router weight, gate_up and down,
``max|got - ref64| <= 2 * max|torch_low - ref64| + 1e-5 + one ulp of max|ref64|``, where
``ref64`` is the float64 reference (the "torch" backend's math in float64, routed by the
low-precision logits straight-through so no top-k choice flips) and ``torch_low`` the
"torch" backend's result in the same dtype; in fp32, ``allclose`` with atol = rtol = 1e-5.

Work split (the reference is the same for every variant): :func:`prepare_reference` computes
``ref64`` (kept as float32: its rounding, ~1e-7 relative, is far below bf16 errors) and
``torch_low``'s errors once per shape into a file; :func:`check_provider` regenerates the same
inputs from the seed, runs one implementation and compares. The sweep runs each check in a
process of its own (``python -m benchmarks.gpu_sweep check``), so a sticky CUDA error of a
broken variant cannot poison the rows measured after it.
"""
from __future__ import annotations

import json
import math
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from .presets import LAYER_PRESETS, LayerPreset

__all__ = ["TENSORS", "check_tokens", "make_inputs", "within_rule", "prepare_reference", "check_provider",
           "reference_path", "ROWS_PER_EXPERT"]

TENSORS = ("out", "logits", "x", "router_weight", "gate_up", "down")  # what is compared
ROWS_PER_EXPERT = 512  # token slice: >= this many (token, expert) rows per expert on average
SEED = 20261206
FP32_TOL = 1e-5  # the tests' float32 tolerance (atol = rtol)


def check_tokens(p: LayerPreset, T_full: int, device: torch.device) -> int:
    """Tokens of the check: on a GPU the power of two with >= :data:`ROWS_PER_EXPERT` rows per
    expert (fine-grained 8192, FlexOlmo-7x7B 1024), never more than the timed T; on the CPU
    (Triton's interpreter) the timed T itself, at most 64."""
    if device.type != "cuda":
        return min(T_full, 64)
    want = 1 << max(4, math.ceil(math.log2(ROWS_PER_EXPERT * p.E / p.K)))
    return min(T_full, want)


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def make_inputs(p: LayerPreset, T: int, device: torch.device, seed: int = SEED) -> dict:
    """The check problem in float32 (master copy), the same in every process for a seed:
    x ~ N(0, 1), router weight 2/sqrt(D), gate_up 1/sqrt(D), down 1/sqrt(F) (every output and
    gradient O(1), as the tests' problems), output and logit gradients."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale

    return dict(x=rnd(T, p.D), router_weight=rnd(p.E, p.D, scale=2.0 / p.D**0.5),
                gate_up=rnd(p.E, 2 * p.F, p.D, scale=1.0 / p.D**0.5), down=rnd(p.E, p.D, p.F, scale=1.0 / p.F**0.5),
                dout=rnd(T, p.D), dz=rnd(T, p.E, scale=0.1))


def _loss(out, z, dout, dz):
    """<out, dout> + <z, dz> over the finite logits (the tests' loss)."""
    zf = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    return (out.to(dout.dtype) * dout).sum() + (zf.to(dz.dtype) * dz).sum()


WEIGHTS = ("x", "router_weight", "gate_up", "down")


def _leaves(inp: dict, dtype: torch.dtype) -> dict:
    return {n: inp[n].to(dtype).detach().requires_grad_() for n in WEIGHTS}


def run_fwd_bwd(fwd: Callable, inp: dict, dtype: torch.dtype, K: int) -> dict:
    """``fwd(x, router_weight, gate_up, down, K) -> (out, logits)`` forward + backward:
    ``{out, logits, x, router_weight, gate_up, down}`` (the last four are gradients)."""
    leaves = _leaves(inp, dtype)
    out, z = fwd(leaves["x"], leaves["router_weight"], leaves["gate_up"], leaves["down"], K)
    _loss(out, z, inp["dout"].to(torch.float32 if dtype != torch.float64 else dtype),
          inp["dz"].to(torch.float32 if dtype != torch.float64 else dtype)).backward()
    got = {"out": out.detach(), "logits": z.detach()}
    got.update({n: (v.grad if v.grad is not None else torch.zeros_like(v)) for n, v in leaves.items()})
    return got


def flexmoe_fwd(backend: str) -> Callable:
    import flexmoe_kernels as fk

    def fwd(x, r, gu, dn, K):
        return fk.flexmoe_forward(x, r, gu, dn, K, backend=backend, validate=False)

    return fwd


def reference64(inp: dict, low_dtype: torch.dtype, K: int) -> dict:
    """Float64 out, logits and gradients, routed by the ``low_dtype`` logits as the backends
    compute them (``x @ R.T`` in x's dtype) straight-through: top-k and its weights see those
    values, the gradient is the float64 one."""
    import flexmoe_kernels as fk

    def fwd(x, r, gu, dn, k):
        z64 = x @ r.t()
        z_low = fk.router_logits(x.detach().to(low_dtype), r.detach().to(low_dtype)).double()
        plan = fk.route(z64 + (z_low - z64).detach(), k)
        return fk.grouped_swiglu(x, plan, gu, dn), plan.logits_TE

    return run_fwd_bwd(fwd, inp, torch.float64, K)


_CHUNK = 1 << 24  # elements per step of _err: bounded memory at FlexOlmo-7x7B's 631M-element gate_up


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, chunk by chunk (``b`` may live on another device: each chunk is
    moved to ``a``'s); equal infinities count as 0, any other non-finite difference is inf."""
    if not a.numel():
        return 0.0
    a, b = a.reshape(-1), b.reshape(-1)
    worst = 0.0
    for i in range(0, a.numel(), _CHUNK):
        x, y = a[i:i + _CHUNK].double(), b[i:i + _CHUNK].to(a.device).double()
        d = torch.where(torch.isinf(x) & (x == y), torch.zeros_like(x), (x - y).abs())
        if not bool(torch.isfinite(d).all()):
            return math.inf
        worst = max(worst, float(d.max()))
    return worst


def _absmax(t: torch.Tensor) -> float:
    """max |t| over the finite elements, chunk by chunk (0 for an empty tensor)."""
    t, worst = t.reshape(-1), 0.0
    for i in range(0, t.numel(), _CHUNK):
        c = t[i:i + _CHUNK]
        c = c[torch.isfinite(c)]
        if c.numel():
            worst = max(worst, float(c.abs().max()))
    return worst


def within_rule(err: float, err_torch: Optional[float], ref_max: float, dtype: torch.dtype) -> tuple[bool, float]:
    """The tests' pass rule for one tensor: ``(passed, bound)``. 16-bit: ``err <= 2 * err_torch
    + 1e-5 + eps(dtype) * ref_max``; float32 / float64: ``err <= atol + rtol * ref_max`` (the
    bound of ``allclose`` at the largest reference value, 1e-5 each)."""
    if dtype in (torch.float16, torch.bfloat16):
        bound = 2 * err_torch + 1e-5 + torch.finfo(dtype).eps * ref_max
    else:
        bound = FP32_TOL + FP32_TOL * ref_max
    return (err <= bound), bound


def reference_path(directory: Path, preset: str, T: int) -> Path:
    return Path(directory) / f"reference-{preset}-T{T}.pt"


def prepare_reference(preset: str, T_full: int, device: torch.device, directory: Path) -> Path:
    """Compute the check's reference for ``preset`` once: ``ref64`` (as float32), each tensor's
    ``max|ref64|`` and the "torch" backend's own error in the check dtype; saved to
    :func:`reference_path` (rewritten only when missing)."""
    p = LAYER_PRESETS[preset]
    T = check_tokens(p, T_full, device)
    path = reference_path(directory, preset, T)
    if path.is_file():
        return path
    dtype = _dtype(device)
    t0 = time.perf_counter()
    inp = make_inputs(p, T, device)
    ref = reference64(inp, dtype, p.K)
    low = run_fwd_bwd(flexmoe_fwd("torch"), inp, dtype, p.K)
    data = {"preset": preset, "T": T, "dtype": str(dtype).replace("torch.", ""), "seed": SEED,
            "ref": {n: ref[n].float().cpu() for n in TENSORS},
            "ref_max": {n: _absmax(ref[n]) for n in TENSORS},
            "err_torch": {n: _err(low[n], ref[n]) for n in TENSORS}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    print(f"[check] reference {preset} T={T} ({data['dtype']}): {time.perf_counter() - t0:.1f} s; torch's own "
          f"errors {', '.join(f'{n} {v:.3g}' for n, v in data['err_torch'].items())}", flush=True)
    return path


def compare(got: dict, ref: dict, dtype: torch.dtype) -> dict:
    """Per tensor ``{err, bound, passed}`` of ``got`` against a reference file's data."""
    res = {}
    for n in TENSORS:
        g, r = got[n], ref["ref"][n]
        if tuple(g.shape) != tuple(r.shape):
            res[n] = dict(err=math.inf, bound=0.0, passed=False, why=f"shape {tuple(g.shape)} vs {tuple(r.shape)}")
            continue
        err = _err(g, r)
        ok, bound = within_rule(err, ref["err_torch"][n], ref["ref_max"][n], dtype)
        res[n] = dict(err=err, bound=bound, passed=bool(ok))
    return res


def check_provider(preset: str, T_full: int, device: torch.device, reference: Path,
                   fwd: Optional[Callable] = None, forward_only: Optional[Callable] = None) -> dict:
    """Check one implementation at ``preset``'s check slice against ``reference``:
    ``fwd(x, router_weight, gate_up, down, K) -> (out, logits)`` (default: the "triton"
    backend under the current environment) forward + backward, and ``forward_only(x, ...)``
    (default: ``fwd`` under ``torch.no_grad()``) against the reference output. Returns
    ``{"status": "PASS" | "FAIL", "error": str, "tensors": {...}, "seconds": s}``; exceptions
    are a FAIL with their message (the traceback is printed)."""
    t0 = time.perf_counter()
    dtype = _dtype(device)
    out = {"preset": preset, "T_full": T_full, "dtype": str(dtype).replace("torch.", "")}
    try:
        ref = torch.load(reference, weights_only=False)
        p = LAYER_PRESETS[preset]
        out["T"] = ref["T"]
        inp = make_inputs(p, ref["T"], device, ref["seed"])
        inp.update({n: inp[n].to(dtype) for n in WEIGHTS})  # drop the float32 masters (memory)
        fwd = fwd or flexmoe_fwd("triton")
        got = run_fwd_bwd(fwd, inp, dtype, p.K)
        res = compare(got, ref, dtype)
        del got
        with torch.no_grad():
            leaves = {n: t.detach() for n, t in _leaves(inp, dtype).items()}
            f = forward_only or fwd
            y = f(leaves["x"], leaves["router_weight"], leaves["gate_up"], leaves["down"], p.K)[0]
        err = _err(y, ref["ref"]["out"])
        ok, bound = within_rule(err, ref["err_torch"]["out"], ref["ref_max"]["out"], dtype)
        res["out_no_grad"] = dict(err=err, bound=bound, passed=bool(ok))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous CUDA error surfaces here, in this check
        bad = [n for n, r in res.items() if not r["passed"]]
        out.update(status="FAIL" if bad else "PASS", tensors=res,
                   error="; ".join(f"{n}: max err {res[n]['err']:.3g} > bound {res[n]['bound']:.3g}" for n in bad))
    except Exception as exc:  # noqa: BLE001 - a broken variant is a FAIL, not a crash
        traceback.print_exc()
        out.update(status="FAIL", tensors={}, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
