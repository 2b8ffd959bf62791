"""CUDA routing / permutation / combine kernels and the "cuda" backend against the PyTorch path.

Legend: T tokens, D hidden, F expert width, E experts, K top-k, P = T*K pairs.

CPU tier: the wrappers' validation (errors name the argument, raised before any CUDA call) and
the backend's availability report. ``gpu`` tier (needs an NVIDIA GPU and the built extension):
every kernel output on poisoned buffers against a readable reference, every gradient against
the torch backend, per-token masks, zero-token experts, NaN-poisoned opted-out experts, T=1,
K=E, fp32/fp16/bf16, determinism, and CUDA-graph capture + replay with a changed mask.
"""
from __future__ import annotations

import ctypes
import math

import pytest
import torch
from conftest import poison_, tol

import flexmoe_kernels as fk
from flexmoe_kernels.ops.cuda import _ext as cuda_ext
from flexmoe_kernels.ops.cuda import combine as cuda_combine
from flexmoe_kernels.ops.cuda import experts as cuda_experts
from flexmoe_kernels.ops.cuda import permute as cuda_permute
from flexmoe_kernels.ops.cuda import routing as cuda_routing
from flexmoe_kernels.ops.reference.routing import route, router_z_loss

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ============================================================================ CPU tier


def test_cpu_tensors_rejected_with_argument_name():
    logits = torch.randn(5, 4)
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        cuda_routing.router_forward(logits, 2)
    with pytest.raises(ValueError, match="probs must be a CUDA tensor"):
        cuda_routing.router_backward(logits, torch.zeros(5, 2, dtype=torch.int32), torch.rand(5, 2), None)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda_permute.gather_rows(torch.randn(3, 8), torch.arange(6, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="y must be a CUDA tensor"):
        cuda_combine.combine(torch.randn(6, 8), None, torch.arange(6, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="grad_out must be a CUDA tensor"):
        cuda_combine.combine_backward(torch.randn(3, 8), None, None, torch.arange(6, dtype=torch.int32), 2)


def test_wrong_dtypes_and_ranks_rejected():
    with pytest.raises(TypeError, match="logits must have dtype"):
        cuda_routing.router_forward(torch.randint(0, 3, (5, 4)), 2)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        cuda_routing.router_forward(torch.randn(2, 5, 4), 2)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        cuda_routing.router_forward([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match="probs must have dtype"):
        cuda_routing.router_backward(torch.randn(5, 4, dtype=torch.float16), None, None, None)
    with pytest.raises(TypeError, match="x must have dtype"):
        cuda_permute.gather_rows(torch.zeros(3, 8, dtype=torch.int64), torch.arange(6, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="y must have dtype"):
        cuda_combine.combine(torch.zeros(6, 8, dtype=torch.float64), None, torch.arange(6, dtype=torch.int32), 2)


def test_backend_reports_why_unavailable_on_cpu():
    ok, why = fk.backend_status("cuda", "cpu")
    assert not ok and "CUDA device" in why
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available on cpu"):
        fk.resolve_backend("cuda", "cpu")


def test_backend_rejects_cpu_tensors(seed):
    x = torch.randn(4, 8)

    def run(router, K):
        return fk.flexmoe_forward(x, router, torch.randn(3, 6, 8), torch.randn(3, 8, 3), K, backend="cuda")

    with pytest.raises(ValueError, match="x is on cpu"):
        run(torch.randn(3, 8), 2)
    with pytest.raises(ValueError, match="router_weight must have shape"):
        run(torch.randn(4, 8), 2)
    with pytest.raises(ValueError, match="top_k=4 is larger"):
        run(torch.randn(3, 8), 4)


def test_extension_raises_with_reason_on_cpu():
    if fk.cuda_is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA kernels are unavailable: "):
        cuda_ext.extension()


def test_autoselect_is_none_on_cpu():
    from flexmoe_kernels.ops.backends import choose_backend

    assert choose_backend(torch.device("cpu"), dict(T=8, D=16, F=8, E=4, K=2)) is None
    assert fk.resolve_backend("auto", "cpu") == "torch"


# ----------------------------------------------- CPU emulation of _C: the Python glue
# A pure-PyTorch stand-in for the compiled module (same raw-pointer API, semantics taken from
# the reference) lets the CPU tier run the wrappers, the autograd Functions and the backend's
# expert path (grouped_mm included) end to end. It does NOT test the CUDA code: the gpu tier does.

_DT = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


def _at(ptr: int, shape, dtype) -> torch.Tensor:
    """The CPU memory at ``ptr`` as a tensor (no copy)."""
    n = math.prod(shape)
    if n == 0 or ptr == 0:
        return torch.empty(shape, dtype=dtype)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype, count=n).view(shape)


class _EmulatedC:
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
        allowed = p > 0 if mask_mode == 0 else _at(mask, (E,) if mask_mode == 1 else (T, E), torch.bool).expand(T, E)
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


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda_ext, "_C", _EmulatedC)
    monkeypatch.setattr(cuda_ext, "cuda_unavailable_reason", lambda: "")
    monkeypatch.setattr(cuda_ext, "_ext_ready", False)  # restored afterwards
    monkeypatch.setattr(cuda_experts, "_grouped_mm_ok", {})


EMU_CASES = [
    # (dtype, T, D, F, E, K, mask kind, renorm)
    (torch.float32, 1, 12, 5, 4, 2, "none", False),
    (torch.float32, 23, 10, 6, 5, 5, "none", True),  # K = E
    (torch.float32, 31, 12, 7, 6, 2, "token", False),
    (torch.float32, 40, 9, 4, 6, 2, "global", True),  # opted-out experts with NaN weights
    (torch.bfloat16, 29, 16, 8, 6, 2, "global", False),  # grouped_mm path (D, F multiples of 8)
    (torch.bfloat16, 17, 16, 8, 4, 3, "token", True),
]


@pytest.mark.parametrize("dtype,T,D,Fw,E,K,mask_kind,renorm", EMU_CASES)
def test_emulated_backend_glue_matches_torch(emulated, seed, dtype, T, D, Fw, E, K, mask_kind, renorm):
    mask = _mask(mask_kind, T, E, K, device="cpu")
    nan_experts = [] if mask is None or mask.ndim == 2 else (~mask).nonzero().flatten().tolist()
    params = _layer(E, D, Fw, dtype, nan_experts, device="cpu")
    x = torch.randn(T, D, dtype=dtype).requires_grad_()
    path = cuda_experts.grouped_gemm_path("cpu", dtype, D, Fw)
    assert path == ("grouped_mm" if dtype == torch.bfloat16 else "per_expert")
    torch.manual_seed(seed)
    ref = _run("torch", x, params, K, allow_mask=mask, norm_topk_prob=renorm)
    torch.manual_seed(seed)
    got = _run("cuda", x, params, K, allow_mask=mask, norm_topk_prob=renorm)
    _compare_runs(got, ref, dtype, E, nan_experts)


def test_emulated_frozen_and_zero_token_experts(emulated, seed):
    T, D, Fw, E, K = 25, 16, 8, 6, 2
    for dtype in (torch.float32, torch.bfloat16):
        params = _layer(E, D, Fw, dtype, device="cpu")
        with torch.no_grad():  # expert 5 never wins
            params[0][5] = 0
            params[3][5] = -30.0
        trainable = torch.tensor([True, False, True, True, True, True])
        x = torch.randn(T, D, dtype=dtype).requires_grad_()
        torch.manual_seed(seed)
        ref = _run("torch", x, params, K, trainable_experts=trainable)
        torch.manual_seed(seed)
        got = _run("cuda", x, params, K, trainable_experts=trainable)
        for i in (2, 3):
            assert torch.all(got[2][i][1] == 0) and torch.all(got[2][i][5] == 0)
        _compare_runs(got, ref, dtype, E, [])


def test_emulated_custom_ops_fake_impls(emulated, seed):
    """torch.library.opcheck: schemas and fake (meta) implementations match the real ops."""
    T, E, K, D = 9, 6, 2, 16
    logits = torch.randn(T, E)
    mask = _mask("token", T, E, K, device="cpu")
    ops = torch.ops.flexmoe_cuda
    w, z, ids, counts, offsets, sp, inv, probs = ops.route(logits, torch.randn(E), mask, K, True)
    checks = [
        (ops.route, (logits, torch.randn(E), mask, K, True)),
        (ops.route, (logits.bfloat16(), None, None, K, False)),
        (ops.route_bwd, (probs, ids, w, torch.randn(T, K), torch.randn(T, E), mask, True)),
        (ops.gather, (torch.randn(T, D), sp, K)),
        (ops.combine, (torch.randn(T * K, D), w, inv, K)),
        (ops.combine, (torch.randn(T * K, D), None, inv, K)),
        (ops.combine_bwd, (torch.randn(T, D), torch.randn(T * K, D), w, inv, K, True, True)),
        (ops.combine_bwd, (torch.randn(T, D), torch.randn(T * K, D), w, inv, K, False, True)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_emulated_wrapper_validation(emulated):
    logits = torch.randn(6, 5)
    with pytest.raises(ValueError, match="allow_mask must have shape"):
        cuda_routing.router_forward(logits, 2, allow_mask=torch.ones(6, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="allow_mask must have dtype"):
        cuda_routing.router_forward(logits, 2, allow_mask=torch.ones(5))
    with pytest.raises(ValueError, match="expert_bias must have shape"):
        cuda_routing.router_forward(logits, 2, expert_bias=torch.zeros(4))
    with pytest.raises(ValueError, match="logits must be contiguous"):
        cuda_routing.router_forward(torch.randn(5, 6).t(), 2)
    with pytest.raises(ValueError, match="top_k=6 is larger"):
        cuda_routing.router_forward(logits, 6)
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="sorted_pairs must have dtype"):
        cuda_permute.gather_rows(x, torch.arange(6), 2)
    with pytest.raises(ValueError, match="sorted_pairs must have shape"):
        cuda_permute.gather_rows(x, torch.arange(5, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="y must have T\\*K rows"):
        cuda_combine.combine(torch.randn(7, 8), None, torch.arange(7, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="weights must have shape"):
        cuda_combine.combine(torch.randn(6, 8), torch.rand(2, 3), torch.arange(6, dtype=torch.int32), 2)


# ============================================================================ GPU tier
# Everything below needs CUDA (auto-skipped by conftest without a GPU).

gpu = pytest.mark.gpu


def _C():
    return cuda_ext.extension()


def _distinct_logits(T: int, E: int, dtype, device="cuda") -> torch.Tensor:
    """(T, E) logits with pairwise-distinct values per row, exactly representable in ``dtype``
    (integers times a power of two), so top-k has no ties in any dtype."""
    perm = torch.argsort(torch.rand(T, E, device=device), dim=1).float()
    scale = 1.0 / 16 if E > 32 else 0.5
    z = (perm - E / 2) * scale
    return z.to(dtype)


def _mask(kind: str, T: int, E: int, K: int, device="cuda"):
    if kind == "none":
        return None
    if kind == "global":  # opt out about a third of the experts, keep >= K
        m = torch.ones(E, dtype=torch.bool, device=device)
        n_off = min(E - K, max(1, E // 3))
        m[torch.randperm(E, device=device)[:n_off]] = False
        return m
    m = torch.rand(T, E, device=device) < 0.6  # per token, then ensure >= K per row
    keep = torch.argsort(torch.rand(T, E, device=device), dim=1)[:, :K]
    m.scatter_(1, keep, True)
    return m


def _raw_route(logits, K, mask, bias, renorm):
    """Call _C.router_forward directly on NaN/INT_MAX-poisoned outputs and a garbage workspace."""
    C = _C()
    T, E = logits.shape
    dev = logits.device
    out = dict(
        ids=poison_(torch.empty(T, K, dtype=torch.int32, device=dev)),
        w=poison_(torch.empty(T, K, dtype=torch.float32, device=dev)),
        probs=poison_(torch.empty(T, E, dtype=torch.float32, device=dev)),
        z=poison_(torch.empty(T, E, dtype=torch.float32, device=dev)),
        counts=poison_(torch.empty(E, dtype=torch.int32, device=dev)),
        offsets=poison_(torch.empty(E + 1, dtype=torch.int32, device=dev)),
        sorted=poison_(torch.empty(T * K, dtype=torch.int32, device=dev)),
        inv=poison_(torch.empty(T * K, dtype=torch.int32, device=dev)),
    )
    nbytes = C.router_workspace_bytes(T, E)
    ws = torch.full((nbytes,), 0xAB, dtype=torch.uint8, device=dev)
    mode = 0 if mask is None else (1 if mask.ndim == 1 else 2)
    bias32 = None if bias is None else bias.float().contiguous()
    C.router_forward(
        logits.data_ptr(), {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[logits.dtype], T, E, K,
        0 if bias32 is None else bias32.data_ptr(), 0 if mask is None else mask.data_ptr(), mode, renorm,
        out["ids"].data_ptr(), out["w"].data_ptr(), out["probs"].data_ptr(), out["z"].data_ptr(),
        out["counts"].data_ptr(), out["offsets"].data_ptr(), out["sorted"].data_ptr(), out["inv"].data_ptr(),
        ws.data_ptr(), nbytes, torch.cuda.current_stream().cuda_stream,
    )
    return out


ROUTER_SHAPES = [(1, 4, 2), (5, 7, 3), (123, 8, 8), (77, 64, 6), (33, 256, 8), (300, 3, 1), (1000, 7, 2),
                 (129, 40, 5), (2, 128, 128)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", ROUTER_SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "global", "token"])
def test_router_forward_matches_reference(seed, dtype, T, E, K, mask_kind):
    logits = _distinct_logits(T, E, dtype)
    mask = _mask(mask_kind, T, E, K)
    bias = torch.randn(E, device="cuda") if (T + E) % 2 else None
    renorm = (T + K) % 2 == 0
    got = _raw_route(logits, K, mask, bias, renorm)
    ref = route(logits, K, allow_mask=mask, expert_bias=bias, norm_topk_prob=renorm)
    assert torch.equal(got["ids"], ref.topk_ids_TK)
    torch.testing.assert_close(got["w"], ref.topk_weights_TK, **tol(torch.float32))
    torch.testing.assert_close(got["z"], ref.logits_TE, **tol(torch.float32))
    torch.testing.assert_close(got["probs"], torch.softmax(ref.logits_TE, -1), **tol(torch.float32))
    assert torch.equal(got["counts"], ref.counts_E)
    assert torch.equal(got["offsets"], ref.offsets_E1)
    assert torch.equal(got["sorted"], ref.sorted_pairs_P)
    assert torch.equal(got["inv"], ref.inv_sorted_pairs_P)
    if mask is not None:  # opted-out experts get no pairs and probability exactly 0
        m = mask if mask.ndim == 2 else mask.expand(T, E)
        assert torch.all(got["probs"][~m] == 0)
        if mask.ndim == 1:
            assert torch.all(got["counts"][~mask] == 0)


@gpu
def test_router_random_logits_and_determinism(seed):
    T, E, K = 4099, 16, 4  # several router blocks, an odd last block
    logits = torch.randn(T, E, device="cuda")
    a = _raw_route(logits, K, None, None, False)
    b = _raw_route(logits, K, None, None, False)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref = route(logits, K)
    assert torch.equal(a["sorted"], ref.sorted_pairs_P)
    assert int(a["counts"].sum()) == T * K
    assert torch.equal(a["sorted"][a["inv"].long()], torch.arange(T * K, device="cuda", dtype=torch.int32))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", [(1, 4, 2), (37, 7, 3), (64, 8, 8), (50, 64, 6)])
@pytest.mark.parametrize("renorm", [False, True])
def test_router_backward_matches_autograd(seed, dtype, T, E, K, renorm):
    mask = _mask("token", T, E, K)
    logits = _distinct_logits(T, E, dtype).requires_grad_()
    bias = torch.randn(E, device="cuda")
    bias[0] = 0.0  # the clamp's boundary
    bias.requires_grad_()
    g_w = torch.randn(T, K, device="cuda")

    def loss_of(w, z):
        return (w * g_w).sum() + 0.1 * router_z_loss(z)

    ref = route(logits, K, allow_mask=mask, expert_bias=bias, norm_topk_prob=renorm)
    loss_of(ref.topk_weights_TK, ref.logits_TE).backward()
    ref_gl, ref_gb = logits.grad.clone(), bias.grad.clone()
    logits.grad = bias.grad = None
    w, z, ids, *_ = cuda_routing.CudaRouteFunction.apply(logits, bias, mask, K, renorm)
    assert torch.equal(ids, ref.topk_ids_TK)
    loss_of(w, z).backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.float(), ref_gl.float(), **tol(dtype))
    torch.testing.assert_close(bias.grad, ref_gb, **tol(torch.float32))
    assert torch.all(logits.grad[~mask] == 0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,K", [(1, 1, 1), (7, 5, 3), (65, 24, 2), (33, 128, 4), (9, 4096, 2)])
def test_gather_and_combine_match_reference(seed, dtype, T, D, K):
    C = _C()
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    stream = torch.cuda.current_stream().cuda_stream
    P = T * K
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    sorted_pairs = torch.randperm(P, device="cuda").int()
    inv = torch.empty_like(sorted_pairs)
    inv[sorted_pairs.long()] = torch.arange(P, device="cuda", dtype=torch.int32)

    x_PD = poison_(torch.empty(P, D, device="cuda", dtype=dtype))
    C.gather_rows(x.data_ptr(), x.element_size(), T, D, sorted_pairs.data_ptr(), P, K, x_PD.data_ptr(), stream)
    assert torch.equal(x_PD, x[sorted_pairs.long() // K])

    y = torch.randn(P, D, device="cuda", dtype=dtype)
    w = torch.rand(T, K, device="cuda")
    out = poison_(torch.empty(T, D, device="cuda", dtype=dtype))
    C.combine_forward(y.data_ptr(), code, T, D, K, w.data_ptr(), inv.data_ptr(), out.data_ptr(), stream)
    y_pairs = y.float()[inv.long()].view(T, K, D)
    ref = (w[:, :, None] * y_pairs).sum(1)
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), **tol(dtype))

    ones = poison_(torch.empty(T, D, device="cuda", dtype=dtype))
    C.combine_forward(y.data_ptr(), code, T, D, K, 0, inv.data_ptr(), ones.data_ptr(), stream)
    torch.testing.assert_close(ones.float(), y_pairs.sum(1).to(dtype).float(), **tol(dtype))

    dout = torch.randn(T, D, device="cuda", dtype=dtype)
    dy = poison_(torch.empty(P, D, device="cuda", dtype=dtype))
    dw = poison_(torch.empty(T, K, device="cuda", dtype=torch.float32))
    C.combine_backward(dout.data_ptr(), code, T, D, K, y.data_ptr(), w.data_ptr(), inv.data_ptr(),
                       dy.data_ptr(), dw.data_ptr(), stream)
    ref_dy = torch.empty_like(y)
    ref_dy[inv.long()] = (w.reshape(-1, 1) * dout.float().repeat_interleave(K, 0)).to(dtype)
    torch.testing.assert_close(dy.float(), ref_dy.float(), **tol(dtype))
    ref_dw = (dout.float()[:, None, :] * y_pairs).sum(-1)
    # same fp32 products on both sides; only the summation order differs
    torch.testing.assert_close(dw, ref_dw, atol=1e-5 * D, rtol=1e-5)


@gpu
def test_combine_is_deterministic(seed):
    T, D, K = 513, 96, 4
    y = torch.randn(T * K, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, K, device="cuda")
    inv = torch.randperm(T * K, device="cuda").int()
    a = cuda_combine.combine(y, w, inv, K)
    b = cuda_combine.combine(y, w, inv, K)
    assert torch.equal(a, b)
    da = cuda_combine.combine_backward(a, y, w, inv, K)
    db = cuda_combine.combine_backward(a, y, w, inv, K)
    assert torch.equal(da[0], db[0]) and torch.equal(da[1], db[1])


@gpu
def test_wrapper_validation_on_cuda():
    logits = torch.randn(6, 5, device="cuda")
    with pytest.raises(ValueError, match="allow_mask must have shape"):
        cuda_routing.router_forward(logits, 2, allow_mask=torch.ones(6, 4, dtype=torch.bool, device="cuda"))
    with pytest.raises(TypeError, match="allow_mask must have dtype"):
        cuda_routing.router_forward(logits, 2, allow_mask=torch.ones(5, device="cuda"))
    with pytest.raises(ValueError, match="expert_bias must have shape"):
        cuda_routing.router_forward(logits, 2, expert_bias=torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="logits must be contiguous"):
        cuda_routing.router_forward(torch.randn(5, 6, device="cuda").t(), 2)
    with pytest.raises(ValueError, match="logits must have 1 <= E <= 256"):
        cuda_routing.router_forward(torch.randn(2, 300, device="cuda"), 2)
    x = torch.randn(3, 8, device="cuda")
    with pytest.raises(TypeError, match="sorted_pairs must have dtype"):
        cuda_permute.gather_rows(x, torch.arange(6, device="cuda"), 2)
    with pytest.raises(ValueError, match="sorted_pairs must have shape"):
        cuda_permute.gather_rows(x, torch.arange(5, device="cuda", dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="y must have T\\*K rows"):
        cuda_combine.combine(torch.randn(7, 8, device="cuda"), None, torch.arange(7, device="cuda", dtype=torch.int32), 2)


@gpu
@pytest.mark.slow
def test_int64_row_offsets():
    """T*K*D > 2^31: rows past 2^31 elements are addressed correctly (about 5 GB of memory)."""
    T, K, D = 1 << 16, 8, 4160
    assert T * K * D > 2**31
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    sp = torch.arange(T * K, device="cuda", dtype=torch.int32).flip(0)  # last pair first
    inv = torch.empty_like(sp)
    inv[sp.long()] = torch.arange(T * K, device="cuda", dtype=torch.int32)
    x_PD = cuda_permute.gather_rows(x, sp, K)
    assert torch.equal(x_PD[:K], x[-1:].expand(K, D))
    assert torch.equal(x_PD[-1], x[0])
    out = cuda_combine.combine(x_PD, None, inv, K)
    torch.testing.assert_close(out[-3:].float(), K * x[-3:].float(), **tol(torch.bfloat16))
    del x_PD, out


# ------------------------------------------------------------------ the "cuda" backend


def _layer(E, D, Fw, dtype, nan_experts=(), device="cuda"):
    g = dict(device=device, dtype=dtype)
    router = torch.randn(E, D, **g) * D**-0.5
    gate_up = torch.randn(E, 2 * Fw, D, **g) * D**-0.5
    down = torch.randn(E, D, Fw, **g) * Fw**-0.5
    bias = torch.randn(E, **g)
    for e in nan_experts:  # opted-out experts: any read of them shows up as NaN
        gate_up[e] = float("nan")
        down[e] = float("nan")
    return [t.requires_grad_() for t in (router, gate_up, down, bias)]


def _scaled_close(got, ref, dtype, what):
    atol, rtol = tol(dtype)["atol"], tol(dtype)["rtol"]
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.float() - ref.float()).abs().max().item()
    bound = atol + rtol * ref.float().abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _run(backend, x, params, K, **kw):
    router, gate_up, down, bias = params
    for t in (x, *params):
        t.grad = None
    out, logits = fk.flexmoe_forward(x, router, gate_up, down, K, expert_bias=bias, backend=backend, **kw)
    g = torch.randn_like(out)
    loss = (out.float() * g.float()).sum() + 1e-2 * router_z_loss(logits)
    loss.backward()
    grads = [t.grad.clone() for t in (x, *params)]
    return out.detach(), logits.detach(), grads, g


def _compare_runs(got, ref, dtype, E, nan_experts):
    """got/ref: (out, logits, [dx, drouter, dgate_up, ddown, dbias], g) from :func:`_run`."""
    out, logits, grads, _ = got
    ref_out, ref_logits, ref_grads, _ = ref
    assert out.dtype == dtype and logits.dtype == torch.float32
    _scaled_close(out, ref_out, dtype, "out")
    torch.testing.assert_close(logits, ref_logits, **tol(torch.float32))
    names = ("dx", "drouter", "dgate_up", "ddown", "dbias")
    for name, g, r in zip(names, grads, ref_grads):
        if name in ("dgate_up", "ddown") and nan_experts:
            assert torch.all(g[nan_experts] == 0), f"{name} of opted-out experts must be exactly 0"
            keep = [e for e in range(E) if e not in nan_experts]
            g, r = g[keep], r[keep]
        _scaled_close(g, r, dtype, name)


BACKEND_CASES = [
    # (T, D, F, E, K, mask kind)
    (1, 64, 32, 7, 2, "none"),
    (37, 64, 32, 7, 2, "token"),
    (37, 64, 32, 7, 7, "none"),  # K = E
    (50, 40, 24, 5, 2, "global"),  # zero-token (opted-out) experts with NaN weights
    (33, 24, 13, 4, 1, "token"),  # F not a multiple of 8: per-expert fallback even in bf16
]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,Fw,E,K,mask_kind", BACKEND_CASES)
def test_backend_matches_torch(seed, dtype, T, D, Fw, E, K, mask_kind):
    mask = _mask(mask_kind, T, E, K)
    nan_experts = [] if mask is None or mask.ndim == 2 else (~mask).nonzero().flatten().tolist()
    params = _layer(E, D, Fw, dtype, nan_experts)
    x = torch.randn(T, D, device="cuda", dtype=dtype).requires_grad_()
    torch.manual_seed(seed)
    ref = _run("torch", x, params, K, allow_mask=mask, norm_topk_prob=K > 1)
    torch.manual_seed(seed)
    got = _run("cuda", x, params, K, allow_mask=mask, norm_topk_prob=K > 1)
    _compare_runs(got, ref, dtype, E, nan_experts)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backend_zero_token_and_frozen_experts(seed, dtype):
    T, D, Fw, E, K = 29, 64, 32, 6, 2
    params = _layer(E, D, Fw, dtype)
    router = params[0]
    with torch.no_grad():  # expert 5 never wins: a zero-token expert that is allowed
        router[5] = 0
        params[3][5] = -30.0
    trainable = torch.tensor([True, False, True, True, True, True], device="cuda")
    x = torch.randn(T, D, device="cuda", dtype=dtype).requires_grad_()
    torch.manual_seed(seed)
    ref = _run("torch", x, params, K, trainable_experts=trainable)
    torch.manual_seed(seed)
    got = _run("cuda", x, params, K, trainable_experts=trainable)
    for i, name in ((2, "dgate_up"), (3, "ddown")):
        g = got[2][i]
        assert torch.all(g[1] == 0), f"{name}: frozen expert must get dW == 0"
        assert torch.all(g[5] == 0), f"{name}: zero-token expert must get dW == 0"
        _scaled_close(g, ref[2][i], dtype, name)
    _scaled_close(got[0], ref[0], dtype, "out")


@gpu
def test_backend_cuda_graph_replay_with_changed_mask(seed):
    T, D, Fw, E, K = 40, 64, 32, 7, 2
    dtype = torch.bfloat16
    if cuda_experts.grouped_gemm_path("cuda", dtype, D, Fw) != "grouped_mm":
        pytest.skip("graph capture needs the sync-free grouped_mm path (bf16, sm90+)")
    router, gate_up, down, bias = (p.detach() for p in _layer(E, D, Fw, dtype))
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    mask = _mask("token", T, E, K)

    def fwd():
        return fk.flexmoe_forward(x, router, gate_up, down, K, allow_mask=mask, expert_bias=bias,
                                  validate=False, backend="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        fwd()  # warm-up: probes grouped_mm, loads kernels
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out_g, logits_g = fwd()
    for step in range(3):
        if step:
            x.copy_(torch.randn_like(x))
            mask.copy_(_mask("token", T, E, K))
        poison_(out_g)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_logits = fk.flexmoe_forward(x, router, gate_up, down, K, allow_mask=mask,
                                                 expert_bias=bias, backend="torch")
        _scaled_close(out_g, ref_out, dtype, f"graph out step {step}")
        torch.testing.assert_close(logits_g, ref_logits, **tol(torch.float32))


@gpu
def test_module_backend_cuda_and_auto(seed):
    m = fk.FlexMoE(64, 32, 7, 2, backend="cuda", expert_bias=True).cuda().to(torch.bfloat16)
    x = torch.randn(2, 9, 64, device="cuda", dtype=torch.bfloat16)
    y = m(x, allowed_experts=[0, 2, 3, 5])
    m.backend = "torch"
    y_ref = m(x, allowed_experts=[0, 2, 3, 5])
    _scaled_close(y, y_ref, torch.bfloat16, "module out")
    assert fk.resolve_backend("auto", "cuda", dict(T=18, D=64, F=32, E=7, K=2, dtype=torch.bfloat16)) in (
        "torch", "triton", "cuda")


@gpu
def test_backend_traces_under_torch_compile(seed):
    """The custom ops trace with fake tensors (aot_eager: no codegen, same numerics)."""
    T, D, Fw, E, K = 24, 64, 32, 7, 2
    dtype = torch.bfloat16
    router, gate_up, down, bias = _layer(E, D, Fw, dtype)
    x = torch.randn(T, D, device="cuda", dtype=dtype, requires_grad=True)
    mask = _mask("token", T, E, K)

    def layer(x):
        return fk.flexmoe_forward(x, router, gate_up, down, K, allow_mask=mask, expert_bias=bias,
                                  validate=False, backend="cuda")

    eager_out, eager_logits = layer(x)
    compiled_out, compiled_logits = torch.compile(layer, backend="aot_eager")(x)
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(compiled_logits, eager_logits)
    (compiled_out.float().sum()).backward()
    assert torch.isfinite(x.grad).all()
