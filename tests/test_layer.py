"""The layer op ``flexmoe_kernels.flexmoe_forward`` (``ops/layer.py``): every backend against
the float64 per-token reference, the backend registry / "auto" / availability, backend
options, torch.compile and opcheck of the Triton custom ops.

The contract test runs every backend available at collection (``fk.available_backends("cpu")``,
plus "cuda" devices on a GPU machine) and the "cuda" backend's glue over the emulated ``_C``
on the CPU ("cpu-cuda-emulated", tests/cuda_emulation.py) on fresh random inputs with one pass
rule per dtype (helpers.assert_matches_reference): output, logits and every gradient against
the float64 reference; masks of every kind, bias, norm_topk_prob, zero-token experts,
NaN-poisoned opted-out experts (never read: outputs and every gradient finite), frozen experts
(dW exactly 0), T=1, K=E and odd shapes, fp32 / fp16 / bf16 (bf16 with D and F multiples of 8:
the "cuda" backend's grouped_mm path, also on the CPU; F=20: its per-expert fallback).

CPU tier: the Triton backend runs under the interpreter (conftest). The ``gpu`` tier adds
larger shapes, CUDA-graph replay and a no-host-sync check. The "cuda" backend's availability
and errors, its module / "auto" use and torch.compile are here too; its stages are in the op
files (test_routing / test_permute / test_grouped_gemm / test_combine), the compiled extension
in test_cuda_build.py.
"""
import pytest
import torch
from cuda_emulation import emulate_cuda
from helpers import (
    DEVICE,
    GRAD_NAMES,
    assert_matches_reference,
    backend_logits,
    loss_grads,
    make_problem,
    poison_,
    reference_layer,
    run_layer,
    run_reference64,
)

import flexmoe_kernels as fk
from flexmoe_kernels.ops.args import validate_layer_args
from flexmoe_kernels.ops.backends import BACKENDS, backend_module, choose_backend
from flexmoe_kernels.ops.cuda import _ext as cuda_ext
from flexmoe_kernels.ops.cuda import experts as cuda_experts
from flexmoe_kernels.ops.triton import backend as triton_backend
from flexmoe_kernels.ops.triton import configs as tc
from flexmoe_kernels.ops.triton import launch

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

TRITON_OK, TRITON_WHY = launch.is_available(DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")
# Blocks of 16 so that D=40 / F=36 take several K-loop steps and column blocks.
SMALL_CONFIG = "BLOCK_M=16,BLOCK_N=16,BLOCK_K=16,GROUP_M=2"
LOW = (torch.float16, torch.bfloat16)


def _backend_params():
    """(device, backend, variant) for every backend available here; the triton backend also
    runs with small GEMM blocks and the atomic (non-deterministic) combine; the cuda backend's
    Python glue (routing / gather / experts / combine autograd Functions and custom ops) also
    runs on the CPU over the emulated _C (variant "emulated", tests/cuda_emulation.py)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    params = []
    for dev in devices:
        for name in fk.available_backends(dev):
            params.append(pytest.param((dev, name, None), id=f"{dev}-{name}"))
            if name == "triton":
                params.append(pytest.param((dev, name, "small-atomic"), id=f"{dev}-{name}-small-atomic"))
    params.append(pytest.param(("cpu", "cuda", "emulated"), id="cpu-cuda-emulated"))
    return params


BACKEND_PARAMS = _backend_params()
# backends that run here without emulation (for the tests that take a name only)
BACKEND_NAMES = sorted({p.values[0][1] for p in BACKEND_PARAMS if p.values[0][2] != "emulated"})


def _options(name, variant, monkeypatch):
    """Keyword arguments (and environment) of a backend variant."""
    if variant == "emulated":
        emulate_cuda(monkeypatch)
        return {}
    if name != "triton":
        return {}
    if variant == "small-atomic":
        monkeypatch.setenv(tc.ENV_VAR, SMALL_CONFIG)
        return {"deterministic": False}
    return {"deterministic": True}


def check_against_reference(p, runs, *, trainable=None, norm=False, ulp_slack=True):
    """Forward + backward of each ``(backend, options)`` in ``runs`` on problem ``p`` against the
    float64 reference (computed once) with the one pass rule per dtype (16-bit: against the
    "torch" backend's own error in that dtype, which makes the rule vacuous for "torch"
    itself: there only the other checks bite). Returns ``(ref64, [got, ...])``, each
    ``(out, logits, {name: grad})``."""
    dtype = p["x"].dtype
    T, D = p["x"].shape
    E = p["gate_up"].shape[0]
    dout, dz = loss_grads(T, D, E, p["x"].device)
    ref = run_reference64(p, dout, dz, trainable=trainable, norm=norm)
    assert float(ref[0].abs().max()) > 0.1  # the comparison is not vacuous
    low = run_layer(p, "torch", dout, dz, trainable=trainable, norm=norm) if dtype in LOW else None
    results = []
    for backend, kw in runs:
        got = run_layer(p, backend, dout, dz, trainable=trainable, norm=norm, **kw)
        what = f"{backend} {kw}"
        assert got[0].dtype == dtype and got[1].dtype == torch.float32, what
        assert bool(torch.isfinite(got[0]).all()), f"{what}: out not finite"
        assert_matches_reference(got[0], ref[0], dtype, f"{what}: out", low and low[0], ulp_slack=ulp_slack)
        assert_matches_reference(got[1], ref[1], torch.float32, f"{what}: logits")
        assert set(got[2]) == set(ref[2])
        for n, g in got[2].items():
            assert g is not None, f"{what}: d{n} missing"
            assert g.dtype == p[n].dtype, f"{what}: d{n} dtype"
            assert bool(torch.isfinite(g).all()), f"{what}: d{n} not finite"
            assert_matches_reference(g, ref[2][n], dtype, f"{what}: d{n}", low and low[2][n], ulp_slack=ulp_slack)
        results.append(got)
    return ref, results


# =========================================================================== the contract
# T, D, F, E, K, dtype, mask, bias, norm, frozen experts, opted-out experts, zero-token expert
CONTRACT_CASES = [
    pytest.param(37, 40, 36, 7, 2, torch.float32, "token", True, False, (3,), (5,), 6, id="token-fp32"),
    pytest.param(37, 24, 20, 7, 2, torch.float16, "token", True, False, (), (), None, id="token-fp16"),
    pytest.param(5, 40, 20, 3, 3, torch.float32, None, True, False, (), (), None, id="K=E-fp32"),
    pytest.param(5, 24, 36, 3, 3, torch.float16, None, False, True, (), (), None, id="K=E-norm-fp16"),
    pytest.param(1, 24, 20, 7, 2, torch.float32, "global", True, False, (), (), None, id="T=1-global-fp32"),
    pytest.param(1, 40, 36, 3, 1, torch.float16, None, False, False, (), (), None, id="T=1-K=1-fp16"),
    pytest.param(37, 24, 36, 1, 1, torch.float16, None, False, False, (), (), None, id="E=1-fp16"),
    pytest.param(37, 40, 20, 7, 1, torch.float32, "global", False, True, (2,), (), None, id="K=1-global-norm-fp32"),
    pytest.param(29, 24, 20, 6, 2, torch.float32, "sequence", True, True, (0,), (3,), None, id="sequence-fp32"),
    pytest.param(37, 24, 20, 7, 2, torch.float32, None, True, False, (), (1, 4), 5, id="zero-token-nan-fp32"),
    pytest.param(13, 24, 20, 5, 2, torch.float16, "sequence", True, False, (1,), (2,), None, id="sequence-fp16"),
    # bf16: D and F multiples of 8 take the "cuda" backend's grouped_mm path (its rows rounded
    # differently from torch's per-expert matmuls: the reason bf16 is judged against torch's
    # own error, see helpers.assert_matches_reference), F=20 its per-expert fallback
    pytest.param(37, 40, 24, 7, 2, torch.bfloat16, "token", True, False, (3,), (5,), 6, id="token-bf16"),
    pytest.param(50, 40, 24, 5, 2, torch.bfloat16, "global", True, True, (1,), (), None, id="global-nan-norm-bf16"),
    pytest.param(29, 40, 24, 6, 2, torch.bfloat16, None, True, False, (1,), (), 5, id="zero-token-frozen-bf16"),
    pytest.param(1, 40, 24, 3, 3, torch.bfloat16, None, False, True, (), (), None, id="T=1-K=E-norm-bf16"),
    pytest.param(33, 24, 20, 4, 1, torch.bfloat16, "token", True, False, (), (), None, id="F=20-K=1-bf16"),
]


@pytest.mark.parametrize("T,D,F,E,K,dtype,mask,bias,norm,frozen,opted_out,zero_token", CONTRACT_CASES)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_backend_matches_reference(seed, monkeypatch, backend, T, D, F, E, K, dtype, mask, bias, norm, frozen,
                                   opted_out, zero_token):
    device, name, variant = backend
    kw = _options(name, variant, monkeypatch)
    p = make_problem(T, D, F, E, K, dtype, mask=mask, bias=bias, opted_out=opted_out, device=device)
    if zero_token is not None:  # allowed, but never in anyone's top-K
        p["expert_bias"][zero_token] = -200.0
    allow = p["allow_mask"]
    never = [] if allow is None else [e for e in range(E) if not bool(allow.reshape(-1, E)[:, e].any())]
    assert set(opted_out) <= set(never)
    for e in never:  # opted out for every token: NaN everywhere (must never be read)
        for n in ("gate_up", "down", "router_weight"):
            p[n][e] = float("nan")
        if p["expert_bias"] is not None:
            p["expert_bias"][e] = float("nan")
    trainable = None
    if frozen:
        trainable = torch.ones(E, dtype=torch.bool, device=device)
        trainable[list(frozen)] = False
    _, (got,) = check_against_reference(p, [(name, kw)], trainable=trainable, norm=norm)
    # experts without pairs (opted out, or zero tokens) and frozen experts: dW exactly 0
    counts = fk.route(backend_logits(p), K, allow_mask=allow, norm_topk_prob=norm).counts_E.cpu()
    if zero_token is not None and (allow is None or allow.ndim == 1):  # a per-token mask may force it
        assert int(counts[zero_token]) == 0
    assert all(int(counts[e]) == 0 for e in never)
    for e in sorted(set((counts == 0).nonzero().flatten().tolist()) | set(frozen)):
        assert bool((got[2]["gate_up"][e] == 0).all()) and bool((got[2]["down"][e] == 0).all()), e
    for e in never:  # nor do their router rows / bias get a gradient
        assert bool((got[2]["router_weight"][e] == 0).all()), e
        if p["expert_bias"] is not None:
            assert float(got[2]["expert_bias"][e]) == 0.0, e


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_frozen_experts_keep_existing_grad_bitwise(seed, monkeypatch, backend):
    """trainable_experts=False: an existing .grad of that expert stays bitwise unchanged; the
    other experts' dW accumulate."""
    device, name, variant = backend
    kw = _options(name, variant, monkeypatch)
    for dtype in (torch.float32, torch.float16):
        T, D, F, E, K = 37, 24, 20, 3, 2
        p = make_problem(T, D, F, E, K, dtype, bias=True, device=device)
        trainable = torch.tensor([False, True, True], device=device)
        gu = p["gate_up"].clone().requires_grad_()
        dn = p["down"].clone().requires_grad_()
        gu.grad = torch.randn_like(gu)
        dn.grad = torch.randn_like(dn)
        before = gu.grad.clone(), dn.grad.clone()
        out, _ = fk.flexmoe_forward(p["x"], p["router_weight"], gu, dn, K, trainable_experts=trainable,
                                    backend=name, **kw)
        out.float().square().sum().backward()
        assert torch.equal(gu.grad[0], before[0][0]) and torch.equal(dn.grad[0], before[1][0])
        assert not torch.equal(gu.grad[1], before[0][1])


@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.values[0][2] != "small-atomic"])
def test_bitwise_reproducible(seed, monkeypatch, backend):
    """Every backend's default (the atomic triton combine is not reproducible by design)."""
    device, name, variant = backend
    kw = _options(name, variant, monkeypatch)
    T, D, F, E, K = 37, 40, 36, 7, 3
    p = make_problem(T, D, F, E, K, torch.float32, mask="token", bias=True, device=device)
    dout, dz = loss_grads(T, D, E, device)
    a = run_layer(p, name, dout, dz, **kw)
    b = run_layer(p, name, dout, dz, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for n in a[2]:
        assert torch.equal(a[2][n], b[2][n]), n


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_errors_name_the_argument(seed, name):
    p = make_problem(5, 24, 20, 3, 2, torch.float32)
    args = (p["x"], p["router_weight"], p["gate_up"], p["down"], 2)

    def fwd(*a, **kw):
        return fk.flexmoe_forward(*a, backend=name, **kw)

    with pytest.raises(ValueError, match="down must have shape"):
        fwd(*args[:3], p["down"][:, :, :-1], 2)
    with pytest.raises(TypeError, match="gate_up has dtype"):
        fwd(args[0], args[1], p["gate_up"].half(), *args[3:])
    with pytest.raises(ValueError, match="router_weight must have shape"):
        fwd(args[0], p["router_weight"][:2], *args[2:])
    with pytest.raises(ValueError, match="top_k=4 is larger"):
        fwd(*args[:4], 4)
    with pytest.raises(TypeError, match="trainable_experts must have dtype"):
        fwd(*args, trainable_experts=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="allow_mask must have shape"):
        fwd(*args, allow_mask=torch.ones(4, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="allow_mask row 1 allows 1 experts"):
        m = torch.ones(5, 3, dtype=torch.bool, device=DEVICE)
        m[1, :2] = False
        fwd(*args, allow_mask=m)
    with pytest.raises(ValueError, match="expert_bias must have shape"):
        fwd(*args, expert_bias=torch.zeros(4, device=DEVICE))


def test_backend_forward_takes_validated_args(seed):
    """Every available backend's ``forward(args)`` on one LayerArgs equals the layer op."""
    p = make_problem(9, 24, 20, 4, 2, torch.float32, mask="token", bias=True)
    args = validate_layer_args(p["x"], p["router_weight"], p["gate_up"], p["down"], 2,
                               allow_mask=p["allow_mask"], expert_bias=p["expert_bias"])
    for name in BACKEND_NAMES:
        out, z = backend_module(name).forward(args)
        ref_out, ref_z = fk.flexmoe_forward(p["x"], p["router_weight"], p["gate_up"], p["down"], 2,
                                            allow_mask=p["allow_mask"], expert_bias=p["expert_bias"],
                                            backend=name)
        assert torch.equal(out, ref_out) and torch.equal(z, ref_z), name


# =========================================================================== registry / auto
def test_torch_backend_always_available():
    assert fk.backend_status("torch", "cpu") == (True, "always available")
    assert "torch" in fk.available_backends("cpu")


def test_auto_on_cpu_is_torch():
    assert choose_backend(torch.device("cpu"), dict(T=8, D=16, F=8, E=4, K=2)) is None  # no measuring
    assert fk.resolve_backend("auto", "cpu") == "torch"


def test_unknown_backend_named_in_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.backend_status("tpu", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.FlexMoE(8, 8, 2, 1, backend="tpu")


def test_every_backend_reports_a_reason():
    for name in BACKENDS:
        ok, why = fk.backend_status(name, "cpu")
        assert isinstance(ok, bool) and isinstance(why, str) and why


@pytest.mark.skipif(fk.backend_status("cuda", "cpu")[0], reason="cuda backend runs on CPU here")
def test_unavailable_backend_raises_with_reason():
    ok, why = fk.backend_status("cuda", "cpu")
    assert not ok and "CUDA device" in why
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available on cpu"):
        fk.resolve_backend("cuda", "cpu")


def test_cuda_backend_rejects_cpu_tensors(seed):
    """An explicit backend="cuda" on CPU tensors: the layer's own checks first (errors name
    the argument), then the backend's device check."""
    x = torch.randn(4, 8)

    def run(router, K):
        return fk.flexmoe_forward(x, router, torch.randn(3, 6, 8), torch.randn(3, 8, 3), K, backend="cuda")

    with pytest.raises(ValueError, match="x is on cpu"):
        run(torch.randn(3, 8), 2)
    with pytest.raises(ValueError, match="router_weight must have shape"):
        run(torch.randn(4, 8), 2)
    with pytest.raises(ValueError, match="top_k=4 is larger"):
        run(torch.randn(3, 8), 4)


def test_cuda_extension_raises_with_reason_without_gpu():
    if fk.cuda_is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA kernels are unavailable: "):
        cuda_ext.extension()


def test_flexmoe_forward_torch_matches_module(seed):
    m = fk.FlexMoE(12, 10, 5, 2, backend="torch", expert_bias=True)
    with torch.no_grad():
        m.gate.expert_bias.normal_()
    x = torch.randn(3, 4, 12)
    out, logits = fk.flexmoe_forward(
        x.reshape(-1, 12), m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj, 2,
        expert_bias=m.gate.expert_bias, backend="torch",
    )
    y, lg = m(x, return_router_logits=True)
    torch.testing.assert_close(out.reshape(3, 4, 12), y)
    torch.testing.assert_close(logits, lg)


@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.values[0][2] != "small-atomic"])
def test_module_backend_matches_reference(seed, monkeypatch, backend):
    """fk.FlexMoE(backend=name) (the module path: allowed_experts -> mask, resolve_backend)
    against the float64 reference with the one pass rule; bf16 on a CUDA device, fp32 on the
    CPU; the opted-out experts' weights are NaN (never read)."""
    device, name, variant = backend
    _options(name, variant, monkeypatch)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    D, F, E, K, allowed = 64, 32, 7, 2, [0, 2, 3, 5]
    p = make_problem(18, D, F, E, K, dtype, bias=True, device=device)
    mask = torch.zeros(E, dtype=torch.bool, device=device)
    mask[allowed] = True
    p["allow_mask"] = mask
    m = fk.FlexMoE(D, F, E, K, backend=name, expert_bias=True).to(device=device, dtype=dtype)
    with torch.no_grad():
        for dst, src in ((m.gate.weight, "router_weight"), (m.experts.gate_up_proj, "gate_up"),
                         (m.experts.down_proj, "down"), (m.gate.expert_bias, "expert_bias")):
            dst.copy_(p[src])
            dst[~mask] = float("nan")
        y = m(p["x"].reshape(2, 9, D), allowed_experts=allowed)
        args = (p["x"], p["router_weight"], p["gate_up"], p["down"], K)
        kw = dict(allow_mask=mask, expert_bias=p["expert_bias"])
        low = None if dtype == torch.float32 else fk.flexmoe_forward(*args, **kw, backend="torch")[0]
        ref64, _ = reference_layer(*args, **kw, route_logits=backend_logits(p))
    assert y.shape == (2, 9, D) and y.dtype == dtype
    assert_matches_reference(y.reshape(-1, D), ref64, dtype, f"module {name} out", low)


@pytest.mark.gpu
def test_gpu_auto_resolves_to_an_available_backend():
    got = fk.resolve_backend("auto", "cuda", dict(T=18, D=64, F=32, E=7, K=2, dtype=torch.bfloat16))
    assert got in fk.available_backends("cuda")


@needs_triton
def test_backend_registry_reports_triton():
    ok, why = fk.backend_status("triton", DEVICE)
    assert ok, why
    assert "triton" in fk.available_backends(DEVICE)
    assert triton_backend.is_available(DEVICE) == launch.is_available(DEVICE)


# =========================================================================== Triton backend options
def test_triton_deterministic_env_default(monkeypatch):
    monkeypatch.delenv("FLEXMOE_TRITON_DETERMINISTIC", raising=False)
    assert triton_backend.default_deterministic() is True
    monkeypatch.setenv("FLEXMOE_TRITON_DETERMINISTIC", "0")
    assert triton_backend.default_deterministic() is False
    monkeypatch.setenv("FLEXMOE_TRITON_DETERMINISTIC", "maybe")
    with pytest.raises(ValueError, match="FLEXMOE_TRITON_DETERMINISTIC"):
        triton_backend.default_deterministic()


@needs_triton
def test_triton_saved_activations_do_not_grow_with_F(seed):
    """The autograd graph keeps x, the plan and the weights: nothing whose size depends on F
    other than the weights themselves (the SwiGLU intermediate is recomputed)."""

    def saved_activation_bytes(F):
        p = make_problem(19, 24, F, 3, 2, torch.float32)
        params = {p["gate_up"].data_ptr(), p["down"].data_ptr(), p["router_weight"].data_ptr()}
        seen = []

        def pack(t):
            seen.append(t)
            return t

        x = p["x"].clone().requires_grad_()
        gu, dn = p["gate_up"].requires_grad_(), p["down"].requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fk.flexmoe_forward(x, p["router_weight"], gu, dn, 2, backend="triton")
        return sum(t.numel() * t.element_size() for t in seen if t.data_ptr() not in params and t.numel())

    assert saved_activation_bytes(16) == saved_activation_bytes(64)


# =========================================================================== torch.compile / opcheck
@needs_triton
def test_torch_compile_traces_the_layer(seed):
    """torch.compile traces the layer through the registered custom ops (fullgraph for the
    backend's ``forward(validate_layer_args(...))``; the module too; the public op: below).
    On CPU the ``aot_eager`` backend (no C++ toolchain needed) runs the traced graph with the
    real ops; on CUDA, inductor."""
    backend = "aot_eager" if DEVICE.type == "cpu" else "inductor"
    p = make_problem(9, 24, 20, 3, 2, torch.float32, mask="token", bias=True)

    def layer(x, R, gu, dn, b, mask):
        return triton_backend.forward(validate_layer_args(x, R, gu, dn, 2, allow_mask=mask, expert_bias=b))

    names = ("x", "router_weight", "gate_up", "down", "expert_bias")
    leaves = [p[n].clone().requires_grad_() for n in names]
    out, z = layer(*leaves, p["allow_mask"])
    grads = torch.autograd.grad(out.square().sum() + z.clamp(min=-1e4).sum(), leaves)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    out_c, z_c = compiled(*leaves, p["allow_mask"])
    grads_c = torch.autograd.grad(out_c.square().sum() + z_c.clamp(min=-1e4).sum(), leaves)
    f32 = torch.float32
    assert_matches_reference(out_c, out.double(), f32, "compiled output")
    assert_matches_reference(z_c, z.double(), f32, "compiled logits")
    for n, a, b in zip(names, grads_c, grads):
        assert_matches_reference(a, b.double(), f32, f"compiled d{n}")

    m = fk.FlexMoE(24, 20, 3, 2, backend="triton", expert_bias=True).to(DEVICE)
    x = torch.randn(2, 5, 24, device=DEVICE)
    with torch.no_grad():
        assert_matches_reference(torch.compile(m, backend=backend)(x), m(x).double(), f32, "compiled module")


@needs_triton
def test_torch_compile_fullgraph_public_op(seed):
    """``torch.compile(fullgraph=True)`` through the public op, as for the backend's forward."""
    backend = "aot_eager" if DEVICE.type == "cpu" else "inductor"
    p = make_problem(9, 24, 20, 3, 2, torch.float32, mask="token", bias=True)

    def layer(x, R, gu, dn, b, mask):
        return fk.flexmoe_forward(x, R, gu, dn, 2, allow_mask=mask, expert_bias=b, backend="triton")

    args = (p["x"], p["router_weight"], p["gate_up"], p["down"], p["expert_bias"], p["allow_mask"])
    torch._dynamo.reset()
    out_c, z_c = torch.compile(layer, backend=backend, fullgraph=True)(*args)
    out, z = layer(*args)
    assert_matches_reference(out_c, out.double(), torch.float32, "compiled output")
    assert_matches_reference(z_c, z.double(), torch.float32, "compiled logits")


@needs_triton
def test_custom_ops_opcheck(seed):
    """torch.library.opcheck: schemas, fake (meta) kernels and autograd registration."""
    T, D, F, E, K = 5, 24, 20, 3, 2
    p = make_problem(T, D, F, E, K, torch.float32, mask="token", bias=True)
    logits = fk.router_logits(p["x"], p["router_weight"])
    args = (p["x"], logits, p["gate_up"], p["down"], p["expert_bias"], p["allow_mask"], K, False, True, 1)
    torch.library.opcheck(torch.ops.flexmoe_triton.moe_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    res = torch.ops.flexmoe_triton.moe_fwd(*args)
    bargs = (torch.randn(T, D, device=DEVICE), torch.randn(T, E, device=DEVICE), p["x"], p["gate_up"], p["down"],
             p["expert_bias"], p["allow_mask"], None, res[2], list(res[3:]), torch.float32, False, 1,
             [True, True, True, True, True])
    torch.library.opcheck(torch.ops.flexmoe_triton.moe_bwd.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_cuda_backend_traces_under_torch_compile(seed, cuda_glue_device):
    """The flexmoe_cuda custom ops trace with fake tensors (aot_eager: no codegen, the same
    ops): the compiled layer equals eager and its output, logits and every gradient pass the
    one rule against the float64 reference. bf16 (the grouped_mm path); CPU tier: over the
    emulated _C."""
    device = cuda_glue_device
    T, D, F, E, K = 24, 64, 32, 7, 2
    dtype = torch.bfloat16
    p = make_problem(T, D, F, E, K, dtype, mask="token", bias=True, device=device)
    dout, dz = loss_grads(T, D, E, device)
    ref = run_reference64(p, dout, dz)
    low = run_layer(p, "torch", dout, dz)
    eager = run_layer(p, "cuda", dout, dz, validate=False)  # also probes grouped_mm outside the trace
    torch._dynamo.reset()
    compiled = run_layer(p, "cuda", dout, dz, validate=False,
                         forward=torch.compile(fk.flexmoe_forward, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    assert_matches_reference(compiled[0], ref[0], dtype, "compiled out", low[0])
    assert_matches_reference(compiled[1], ref[1], torch.float32, "compiled logits")
    for n, g in compiled[2].items():
        assert_matches_reference(g, ref[2][n], dtype, f"compiled d{n}", low[2][n])


# =========================================================================== gpu tier
@pytest.mark.gpu
@pytest.mark.parametrize("T,D,F,E,K,mask", [(1024, 256, 512, 8, 2, "token"), (333, 512, 384, 7, 5, "global"),
                                             (4, 256, 512, 16, 4, None), (2048, 128, 96, 64, 8, "token")])
def test_gpu_bf16_error_within_2x_torch(seed, T, D, F, E, K, mask):
    """bf16: max|ours - ref64| <= 2 * max|torch_bf16 - ref64| + 1e-5 for the output and every
    gradient, for every backend on the GPU."""
    p = make_problem(T, D, F, E, K, torch.bfloat16, mask=mask, bias=True)
    runs = [(name, {"deterministic": det} if name == "triton" else {})
            for name in fk.available_backends(DEVICE) for det in ((True, False) if name == "triton" else (None,))]
    # exact rule; with few rows per expert a dW element is a single product, so the one-ulp
    # slack of the CPU tier applies there too
    check_against_reference(p, runs, ulp_slack=T * K < 8 * E)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_larger_shapes_match_reference(seed, dtype):
    p = make_problem(1000, 256, 352, 8, 2, dtype, mask="token", bias=True)
    check_against_reference(p, [(name, {}) for name in fk.available_backends(DEVICE)])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_cuda_graph_replay_with_new_mask_and_inputs(seed, backend):
    """Capture the forward once, replay it with new inputs and a new mask into a poisoned
    output: equal to eager bit for bit (both backends are deterministic) and within the one
    rule of the float64 reference."""
    T, D, F, E, K = 256, 128, 192, 8, 2
    dtype = torch.bfloat16
    if not fk.backend_status(backend, DEVICE)[0]:
        pytest.skip(fk.backend_status(backend, DEVICE)[1])
    if backend == "cuda" and cuda_experts.grouped_gemm_path(DEVICE, dtype, D, F) != "grouped_mm":
        pytest.skip("graph capture needs the cuda backend's sync-free grouped_mm path (bf16, sm90+)")
    p = make_problem(T, D, F, E, K, dtype, mask="token", bias=True)
    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}

    def step():
        return fk.flexmoe_forward(static["x"], static["router_weight"], static["gate_up"], static["down"], K,
                                  allow_mask=static["allow_mask"], expert_bias=static["expert_bias"],
                                  validate=False, backend=backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (Triton compilation / the grouped_mm probe happen outside the capture)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g, z_g = step()
    for _ in range(2):
        p2 = make_problem(T, D, F, E, K, dtype, mask="token", bias=True)
        for k in ("x", "router_weight", "gate_up", "down", "expert_bias", "allow_mask"):
            static[k].copy_(p2[k])
        poison_(out_g)
        g.replay()
        torch.cuda.synchronize()
        args = (p2["x"], p2["router_weight"], p2["gate_up"], p2["down"], K)
        kw = dict(allow_mask=p2["allow_mask"], expert_bias=p2["expert_bias"])
        torch_low, zr = fk.flexmoe_forward(*args, **kw, backend="torch")
        eager, _ = fk.flexmoe_forward(*args, **kw, backend=backend)
        assert torch.equal(out_g, eager)  # deterministic: replay == eager bit for bit
        with torch.no_grad():
            ref64, _ = reference_layer(*args, **kw, route_logits=backend_logits(p2))
        assert_matches_reference(out_g, ref64, dtype, "graph replay", torch_low)
        torch.testing.assert_close(z_g, zr)


@pytest.mark.gpu
def test_gpu_no_host_synchronisation_in_forward_and_backward(seed):
    """With validate=False the layer's forward and backward never synchronise with the host."""
    T, D, F, E, K = 300, 128, 192, 8, 2
    p = make_problem(T, D, F, E, K, torch.bfloat16, mask="token", bias=True)
    leaves = [p[n].clone().requires_grad_() for n in GRAD_NAMES]
    trainable = torch.ones(E, dtype=torch.bool, device=DEVICE)
    trainable[0] = False
    dout = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
    for attempt in range(2):  # the first call compiles the kernels (may sync); the second must not
        if attempt:
            torch.cuda.set_sync_debug_mode("error")
        try:
            out, z = fk.flexmoe_forward(leaves[0], leaves[1], leaves[3], leaves[4], K, allow_mask=p["allow_mask"],
                                        expert_bias=leaves[2], trainable_experts=trainable, validate=False,
                                        backend="triton")
            torch.autograd.backward([out, z], [dout, torch.zeros_like(z)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(v.grad).all()) for v in leaves)


# --------------------------------------------------------------------------- issue 12, items 3-4
# Every tensor argument is checked (device, dtype, shape) by the one validation, whatever the
# backend; and a NaN expert bias has one meaning everywhere: it propagates (never read as 0).
_BAD_ARGS = [
    ("router_weight", "meta", ValueError, "router_weight must be on device"),
    ("gate_up", "meta", ValueError, "gate_up is on meta"),
    ("down", "meta", ValueError, "down is on meta"),
    ("expert_bias", "meta", ValueError, "expert_bias must be on device"),
    ("router_weight", torch.int32, TypeError, "router_weight must be a floating-point tensor"),
    ("expert_bias", torch.int64, TypeError, "expert_bias must be a floating-point tensor"),
    ("allow_mask", torch.float32, TypeError, "allow_mask must have dtype in \\(bool\\)"),
    ("trainable_experts", torch.int64, TypeError, "trainable_experts must have dtype in \\(bool\\)"),
    ("x", (5, 24, 1), ValueError, "x must have 2 dimensions"),
    ("expert_bias", (4,), ValueError, "expert_bias must have shape \\(3\\), got \\(4,\\)"),
    ("trainable_experts", (2,), ValueError, "trainable_experts must have shape \\(3\\), got \\(2,\\)"),
]


@pytest.mark.parametrize("backend_param", BACKEND_PARAMS)
@pytest.mark.parametrize("arg,bad,exc,match", _BAD_ARGS, ids=[f"{a}-{b}" for a, b, *_ in _BAD_ARGS])
def test_every_tensor_argument_is_validated(seed, monkeypatch, backend_param, arg, bad, exc, match):
    """A wrong device, dtype or shape of any tensor argument raises before any backend runs,
    naming the argument (the torch backend once computed a result from a router on ``meta``)."""
    _dev, name, variant = backend_param
    kw = _options(name, variant, monkeypatch)
    p = make_problem(5, 24, 20, 3, 2, torch.float32, bias=True)
    args = dict(x=p["x"], router_weight=p["router_weight"], gate_up=p["gate_up"], down=p["down"],
                expert_bias=p["expert_bias"], allow_mask=torch.ones(3, dtype=torch.bool, device=DEVICE),
                trainable_experts=torch.ones(3, dtype=torch.bool, device=DEVICE))
    good = args[arg]
    if isinstance(bad, str):
        args[arg] = torch.empty(good.shape, dtype=good.dtype, device=bad)
    elif isinstance(bad, torch.dtype):
        args[arg] = good.to(bad)
    else:
        args[arg] = torch.ones(bad, dtype=good.dtype, device=good.device)
    with pytest.raises(exc, match=match):
        fk.flexmoe_forward(args["x"], args["router_weight"], args["gate_up"], args["down"], 2,
                           expert_bias=args["expert_bias"], allow_mask=args["allow_mask"],
                           trainable_experts=args["trainable_experts"], backend=name, **kw)


@pytest.mark.parametrize("backend_param", BACKEND_PARAMS)
def test_nan_expert_bias_propagates_on_every_backend(seed, monkeypatch, backend_param):
    """A NaN bias of an allowed expert makes the output of every token that allows it NaN (as
    NaN in any weight would); tokens that opted out of that expert never read it and equal the
    run with a finite bias. Before: the triton backend read the NaN as 0 (finite output)."""
    _dev, name, variant = backend_param
    kw = _options(name, variant, monkeypatch)
    T, E, K = 7, 4, 2
    p = make_problem(T, 24, 20, E, K, torch.float32, bias=True)
    mask = torch.ones(T, E, dtype=torch.bool, device=DEVICE)
    mask[::2, 1] = False  # even tokens opted out of expert 1
    nan_bias = p["expert_bias"].clone()
    nan_bias[1] = float("nan")
    args = (p["x"], p["router_weight"], p["gate_up"], p["down"], K)
    out, z = fk.flexmoe_forward(*args, allow_mask=mask, expert_bias=nan_bias, backend=name, **kw)
    ref, _ = fk.flexmoe_forward(*args, allow_mask=mask, expert_bias=p["expert_bias"], backend="torch")
    allows = mask[:, 1].cpu()
    assert torch.isnan(out.cpu()[allows]).all(), "a NaN bias vanished for tokens allowing its expert"
    assert torch.isnan(z.cpu()[allows, 1]).all()
    assert_matches_reference(out[~allows.to(out.device)], ref[~allows.to(ref.device)].double(), torch.float32,
                             "tokens that opted out of the NaN-bias expert")
