"""FlexMoE module: equals a readable per-token reference, exact masking, expert editing, errors.

Legend: T tokens, D hidden, F expert width, E experts, K top-k, B batch, S sequence.
"""
import pytest
import torch
from helpers import (DEVICE, assert_matches_reference, backend_logits, make_mask, make_problem, reference_layer,
                     tol)

import flexmoe_kernels as fk
from flexmoe_kernels.ops.triton import launch

pytestmark = pytest.mark.usefixtures("one_thread", "poisoned_outputs")

TRITON_OK, TRITON_WHY = launch.is_available(DEVICE)
F32 = torch.float32


# ---------------------------------------------------------------------------- reference
def ref_moe(moe, x, allow_TE=None):
    """The module's output by the readable float64 per-token reference (helpers.reference_layer)
    on its parameters, routed by the module's fp32 logits; only the chosen experts' weights are
    read (so NaN in opted-out experts cannot leak). Returns float64 in x's shape."""
    D = moe.hidden_size
    bias = moe.gate.expert_bias.detach() if moe.gate.expert_bias is not None else None
    x_TD, R = x.detach().reshape(-1, D), moe.gate.weight.detach()
    out, _ = reference_layer(
        x_TD, R, moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach(), moe.top_k,
        allow_mask=allow_TE, expert_bias=bias, norm_topk_prob=moe.norm_topk_prob,
        route_logits=backend_logits(dict(x=x_TD, router_weight=R, expert_bias=bias)),  # routed like the module
    )
    return out.reshape(x.shape)


def make_moe(D=12, Fw=10, E=5, K=2, std=0.3, **kw):
    m = fk.FlexMoE(D, Fw, E, K, backend="torch", init_std=std, **kw)
    if m.gate.expert_bias is not None:
        with torch.no_grad():
            m.gate.expert_bias.normal_()  # some positive (clamped to 0), some negative
    return m


# ---------------------------------------------------------------------------- forward vs reference
@pytest.mark.parametrize("T,E,K,norm,bias", [(1, 5, 2, False, False), (5, 4, 3, True, False),
                                             (37, 6, 2, False, True), (9, 3, 3, True, True)])
def test_forward_matches_reference(seed, T, E, K, norm, bias):
    m = make_moe(E=E, K=K, norm_topk_prob=norm, expert_bias=bias)
    x = torch.randn(T, 12)
    assert_matches_reference(m(x), ref_moe(m, x), F32, "out")


def test_gradients_match_reference(seed):
    m = make_moe(E=4, K=2, expert_bias=True)
    x = torch.randn(2, 5, 12, requires_grad=True)
    w = torch.randn(2, 5, 12)
    (m(x) * w).sum().backward()
    names = ("x", "router_weight", "gate_up", "down", "expert_bias")
    got = [x.grad, m.gate.weight.grad, m.experts.gate_up_proj.grad, m.experts.down_proj.grad, m.gate.expert_bias.grad]

    # The float64 per-token reference, differentiable, routed by the module's fp32 logits.
    params = [t.detach().double().requires_grad_() for t in (x, m.gate.weight, m.experts.gate_up_proj,
                                                             m.experts.down_proj, m.gate.expert_bias)]
    xd, R, gu, dn, b = params
    logits = backend_logits(dict(x=x.detach().reshape(-1, 12), router_weight=m.gate.weight.detach(),
                                 expert_bias=m.gate.expert_bias.detach()))
    out, _ = reference_layer(xd.reshape(-1, 12), R, gu, dn, 2, expert_bias=b, route_logits=logits)
    (out.reshape(2, 5, 12) * w.double()).sum().backward()
    for n, g, r in zip(names, got, params):
        assert g is not None and torch.isfinite(g).all(), n
        assert_matches_reference(g, r.grad, F32, f"d{n}")


# ---------------------------------------------------------------------------- masking
def test_global_mask_equals_removal(seed):
    m = make_moe(E=5, K=2, expert_bias=True)
    x = torch.randn(3, 7, 12)
    y = m(x, allowed_experts=["expert_0", 2, "expert_4"])
    small = make_moe(E=5, K=2, expert_bias=True)
    small.load_state_dict(m.state_dict())
    small.remove_expert("expert_3")
    small.remove_expert(1)
    assert small.expert_names == ["expert_0", "expert_2", "expert_4"]
    torch.testing.assert_close(y, small(x), **tol(torch.float32))
    # bool (E,) mask is the same thing
    mask = torch.tensor([True, False, True, False, True])
    torch.testing.assert_close(m(x, allowed_experts=mask), y, atol=0, rtol=0)


def test_integer_like_expert_indices_are_accepted(seed):
    """Issue 12 item 6e: numpy integers and 0-dim integer tensors are expert indices like int
    (same mask); bools of every kind and non-integer numbers are still refused."""
    np = pytest.importorskip("numpy")
    m = make_moe(E=5, K=2)
    x = torch.randn(2, 3, 12)
    y = m(x, allowed_experts=[0, 2, 4])
    for kind in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64, np.intp):
        torch.testing.assert_close(m(x, allowed_experts=[kind(0), kind(2), kind(4)]), y, atol=0, rtol=0)
    torch.testing.assert_close(m(x, allowed_experts=list(np.array([0, 2, 4]))), y, atol=0, rtol=0)
    torch.testing.assert_close(m(x, allowed_experts=np.array([0, 2, 4])), y, atol=0, rtol=0)
    torch.testing.assert_close(m(x, allowed_experts=[torch.tensor(0), torch.tensor(2, dtype=torch.int32), "expert_4"]),
                               y, atol=0, rtol=0)
    with pytest.raises(ValueError, match="index 7 is out of range"):
        m(x, allowed_experts=[np.int64(0), np.int64(7)])
    for bad in (True, np.True_, torch.tensor(True)):
        with pytest.raises(TypeError, match="got a bool"):
            m(x, allowed_experts=[0, 1, bad])
    for bad in (np.float32(1.0), 1.0, torch.tensor(1.0), torch.tensor([1, 2])):
        with pytest.raises(TypeError, match="allowed_experts entries must be"):
            m(x, allowed_experts=[0, bad])


def test_per_token_mask_matches_reference(seed):
    m = make_moe(E=5, K=2)
    T = 23
    x = torch.randn(T, 12)
    allow = make_mask("token", T, 5, 2, device="cpu")
    assert_matches_reference(m(x, allowed_experts=allow), ref_moe(m, x, allow), F32, "out")


def test_per_sequence_mask_equals_running_alone(seed):
    m = make_moe(E=4, K=2)
    B, S = 3, 6
    x = torch.randn(B, S, 12)
    allow_BE = torch.tensor([[True, True, False, False], [False, True, True, True], [True, False, True, True]])
    y = m(x, allowed_experts=allow_BE)
    for b in range(B):
        alone = m(x[b : b + 1], allowed_experts=allow_BE[b])
        torch.testing.assert_close(y[b : b + 1], alone, **tol(torch.float32))
    # (T, E) form of the same mask gives bit-identical results
    y2 = m(x, allowed_experts=fk.expand_sequence_mask(allow_BE, S))
    torch.testing.assert_close(y, y2, atol=0, rtol=0)


def test_nan_poisoned_opted_out_experts(seed):
    m = make_moe(E=4, K=2, expert_bias=True)
    x = torch.randn(11, 12)
    allow = torch.tensor([True, True, False, True])
    clean = m(x, allowed_experts=allow)
    with torch.no_grad():
        m.experts.gate_up_proj[2] = float("nan")
        m.experts.down_proj[2] = float("nan")
        m.gate.weight[2] = float("nan")
        m.gate.expert_bias[2] = float("nan")
    y, logits = m(x, allowed_experts=allow, return_router_logits=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, clean, atol=0, rtol=0)
    assert torch.isneginf(logits[:, 2]).all()
    # ... and every gradient stays finite with the opted-out expert's FFN, router row and bias NaN.
    xg = x.clone().requires_grad_()
    m(xg, allowed_experts=allow).sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert torch.isfinite(m.experts.gate_up_proj.grad[[0, 1, 3]]).all()
    assert torch.isfinite(m.gate.weight.grad).all() and torch.all(m.gate.weight.grad[2] == 0)
    assert torch.isfinite(m.gate.expert_bias.grad).all()
    assert torch.all(m.experts.gate_up_proj.grad[2] == 0) and torch.all(m.experts.down_proj.grad[2] == 0)


def test_zero_token_experts(seed):
    # T=2 tokens, K=1, E=6: at least 4 experts get no token; the result still equals the reference.
    m = make_moe(E=6, K=1)
    x = torch.randn(2, 12)
    assert_matches_reference(m(x), ref_moe(m, x), F32, "out")
    # a mask that routes every token to experts {1, 4} only: the other 4 get zero tokens
    allow = torch.zeros(6, dtype=torch.bool)
    allow[[1, 4]] = True
    m2 = make_moe(E=6, K=2)
    x2 = torch.randn(13, 12)
    assert_matches_reference(m2(x2, allowed_experts=allow), ref_moe(m2, x2, allow.expand(13, 6)), F32, "out")


def test_one_expert_equals_dense_swiglu(seed):
    m = make_moe(E=1, K=1)
    x = torch.randn(2, 5, 12)
    Fw = m.intermediate_size
    gu, dn = m.experts.gate_up_proj[0], m.experts.down_proj[0]
    dense = (torch.nn.functional.silu(x @ gu[:Fw].T) * (x @ gu[Fw:].T)) @ dn.T
    torch.testing.assert_close(m(x), dense, **tol(torch.float32))


# ---------------------------------------------------------------------------- editing experts
def test_add_remove_rename(seed):
    m = make_moe(E=3, K=2, expert_bias=True)
    x = torch.randn(9, 12)
    before = m(x)
    i = m.add_expert("news", copy_from="expert_1", bias=-0.5)
    assert i == 3 and m.num_experts == 3 + 1 and m.expert_names[-1] == "news"
    torch.testing.assert_close(m.experts.gate_up_proj[3], m.experts.gate_up_proj[1], atol=0, rtol=0)
    assert float(m.gate.expert_bias.detach()[3]) == -0.5
    # opting the new expert out reproduces the old layer exactly (same E-1 terms)
    torch.testing.assert_close(m(x, allowed_experts=[0, 1, 2]), before, **tol(torch.float32))
    # explicit weights
    gu = torch.randn(20, 12)
    j = m.add_expert("code", gate_up=gu, down=torch.randn(12, 10), router_embedding=torch.randn(12))
    torch.testing.assert_close(m.experts.gate_up_proj[j], gu, atol=0, rtol=0)
    m.rename_expert("code", "math")
    assert m.expert_names == ["expert_0", "expert_1", "expert_2", "news", "math"]
    m.remove_expert("news")
    m.remove_expert("math")
    assert m.expert_names == ["expert_0", "expert_1", "expert_2"]
    torch.testing.assert_close(m(x), before, **tol(torch.float32))
    assert m.trainable_experts.shape == (3,)


def test_editing_errors():
    m = make_moe(E=3, K=2)
    with pytest.raises(ValueError, match="already exists"):
        m.add_expert("expert_1")
    with pytest.raises(ValueError, match="unknown expert name 'nope'"):
        m.remove_expert("nope")
    with pytest.raises(ValueError, match="out of range"):
        m.remove_expert(7)
    with pytest.raises(ValueError, match="unique"):
        m.rename_expert(0, "expert_2")
    with pytest.raises(ValueError, match="gate_up must have shape"):
        m.add_expert("x", gate_up=torch.randn(3, 3))
    m.remove_expert(0)
    with pytest.raises(ValueError, match="fewer than top_k=2"):
        m.remove_expert(0)


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="top_k=4 is larger than num_experts=3"):
        fk.FlexMoE(8, 8, 3, 4)
    with pytest.raises(ValueError, match="hidden_size"):
        fk.FlexMoE(0, 8, 3, 1)
    with pytest.raises(ValueError, match="expert_names must have 3 entries"):
        fk.FlexMoE(8, 8, 3, 1, expert_names=["a", "b"])
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.FlexMoE(8, 8, 3, 1, backend="nope")
    m = make_moe(D=8, Fw=8, E=3, K=2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\)"):
        m(torch.randn(4, 7))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        m(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        m(torch.ones(4, 8, dtype=torch.int64))
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="allowed_experts must have"):
        m(x, allowed_experts=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="last dimension of E=3"):
        m(x, allowed_experts=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="allowed_experts tensor must be bool"):
        m(x, allowed_experts=torch.ones(3))
    with pytest.raises(ValueError, match="unknown expert name 'law'"):
        m(x, allowed_experts=["law"])
    with pytest.raises(ValueError, match="allows 1 experts, fewer than top_k=2"):
        m(x, allowed_experts=["expert_0"])
    per_seq = torch.tensor([[True, True, False], [True, False, False]])
    with pytest.raises(ValueError, match="allows 1 experts"):
        m(x, allowed_experts=per_seq)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 3, 3)])
@pytest.mark.parametrize("validate", [True, False])
def test_meta_allowed_experts_names_argument_device_and_expectation(shape, validate):
    """A mask without data (device 'meta') is refused with the argument's name, its device and
    what is expected (issue 21 item 13), not torch's 'Cannot copy out of meta tensor'."""
    m = make_moe(D=8, Fw=8, E=3, K=2)
    x = torch.randn(2, 3, 8)
    meta = torch.ones(shape, dtype=torch.bool, device="meta")
    want = r"allowed_experts is on device 'meta' .*expected a bool tensor on the CPU or on x's device \(cpu\)"
    with pytest.raises(ValueError, match=want):
        m(x, allowed_experts=meta, validate=validate)


@pytest.mark.parametrize("name", ["allow_mask", "trainable_experts"])
def test_meta_masks_of_the_functional_layer_are_refused(name):
    """The same rule in :func:`flexmoe_kernels.flexmoe_forward` for ``allow_mask`` and
    ``trainable_experts``."""
    m = make_moe(D=8, Fw=8, E=3, K=2)
    x = torch.randn(4, 8)
    meta = torch.ones(3, dtype=torch.bool, device="meta")
    want = rf"{name} is on device 'meta' .*expected a bool tensor on the CPU or on x's device \(cpu\)"
    with pytest.raises(ValueError, match=want):
        fk.flexmoe_forward(x, m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj, 2, backend="torch",
                           **{name: meta})


# ---------------------------------------------------------------------------- other backends
@pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")
def test_triton_backend_module_matches_torch(seed):
    m = fk.FlexMoE(24, 20, 5, 2, backend="torch", expert_bias=True).to(DEVICE)
    with torch.no_grad():
        m.gate.weight.normal_(std=0.4)
        m.gate.expert_bias.uniform_(-1, 0)
    mt = fk.FlexMoE(24, 20, 5, 2, backend="triton", expert_bias=True).to(DEVICE)
    mt.load_state_dict(m.state_dict())
    m.set_trainable_experts([1, 3, 4])
    mt.set_trainable_experts([1, 3, 4])
    x = torch.randn(2, 7, 24, device=DEVICE)
    allowed = torch.tensor([[True, True, False, True, True], [True, False, True, True, True]], device=DEVICE)
    y_ref = m(x, allowed_experts=allowed)
    y = mt(x, allowed_experts=allowed)
    assert_matches_reference(y, y_ref.double(), F32, "module output")
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (n, a), (_, b) in zip(m.named_parameters(), mt.named_parameters()):
        assert_matches_reference(b.grad, a.grad.double(), F32, f"grad of {n}")


# ---------------------------------------------------------------------------- torch.compile (issue 14 item 4)
# fullgraph=True on the module: each backend on its device (CPU tier: torch; triton under the
# interpreter; cuda over the emulated _C), no / global / per-sequence mask, forward and backward
# equal eager, exactly one graph; the backend resolved once.
COMPILE_MASKS = {
    "none": None,
    "global": [True, False, True, True, True],
    "per_sequence": [[True, True, False, True, True], [False, True, True, True, False]],
}
COMPILE_BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason=f"triton unavailable: {TRITON_WHY}")),
    "cuda",
]


class CountingBackend:
    """A torch.compile backend that records every graph it is given and runs it with
    ``inner`` (aot_eager: the traced ops run as they are; inductor: generated code)."""

    def __init__(self, inner: str = "aot_eager"):
        self.inner, self.graphs = torch._dynamo.lookup_backend(inner), []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)


def compile_problem(backend, request, dtype=F32, device=DEVICE):
    """(module, x, device) for ``backend`` on its device: the cuda backend on the CPU tier runs
    over the emulated _C (fixture ``emulated_cuda``)."""
    if backend == "cuda" and device.type == "cpu":
        request.getfixturevalue("emulated_cuda")
    m = fk.FlexMoE(16, 16, 5, 2, backend=backend, expert_bias=True, init_std=0.3).to(device=device, dtype=dtype)
    with torch.no_grad():
        m.gate.expert_bias.uniform_(-1, 0)
    return m, torch.randn(2, 3, 16, device=device, dtype=dtype)


def run_and_grads(f, m, x, allowed):
    """Forward (output and router logits), a backward through both, and every gradient."""
    x = x.detach().requires_grad_()
    for p in m.parameters():
        p.grad = None
    y, z = f(x, allowed, return_router_logits=True)
    (y.float().square().sum() + z.clamp(min=-1e4).sum()).backward()
    return [y.detach(), z.detach(), x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("mask", list(COMPILE_MASKS))
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_fullgraph_equals_eager_one_graph(seed, request, backend, mask):
    m, x = compile_problem(backend, request)
    allowed = None if COMPILE_MASKS[mask] is None else torch.tensor(COMPILE_MASKS[mask], device=DEVICE)
    eager = run_and_grads(m, m, x, allowed)
    counting = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=counting, fullgraph=True)
    for _ in range(2):  # the second call reuses the graph
        got = run_and_grads(compiled, m, x, allowed)
        for i, (a, b) in enumerate(zip(got, eager)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda s, i=i: f"output/grad #{i}: {s}")
    assert len(counting.graphs) == 1, f"{len(counting.graphs)} graphs (graph breaks or recompiles)"


def test_compile_fullgraph_names_per_token_and_frozen(seed):
    """Expert names (constant-folded), a per-token mask and frozen experts compile too."""
    m, x = compile_problem("torch", None)
    m.set_trainable_experts([0, 2, 4])
    per_token = torch.rand(2, 3, 5, device=DEVICE) < 0.6
    per_token[..., 1:3] = True
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for allowed in (["expert_0", 2, "expert_3"], per_token):
        eager = run_and_grads(m, m, x, allowed)
        got = run_and_grads(compiled, m, x, allowed)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for p in (m.experts.gate_up_proj, m.experts.down_proj):
            assert not p.grad[[1, 3]].any(), "frozen experts got a weight gradient"


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_checks_mask_rows_when_the_graph_runs(seed, request, backend):
    """The mask-row check (a host read) is deferred to the compiled graph's run time."""
    m, x = compile_problem(backend, request)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    compiled(x, torch.tensor(COMPILE_MASKS["per_sequence"], device=DEVICE))
    bad = torch.tensor([[True, True, False, True, True], [False, True, False, False, False]], device=DEVICE)
    with pytest.raises(ValueError, match="allow_mask row 3 allows 1 experts, fewer than top_k=2"):
        compiled(x, bad)
    with pytest.raises(ValueError, match="allow_mask allows 1 experts, fewer than top_k=2"):
        compiled(x, torch.tensor([False, False, True, False, False], device=DEVICE))


def test_backend_resolved_once_and_backend_change_takes_effect(seed, monkeypatch):
    from flexmoe_kernels.modules import flex_moe

    calls = []

    def counting_resolve(name, device, problem=None):
        calls.append(name)
        return fk.resolve_backend(name, device, problem)

    monkeypatch.setattr(flex_moe, "resolve_backend", counting_resolve)
    m, x = compile_problem("auto", None)
    for _ in range(3):
        m(x)
    assert calls == ["auto"], "an eager module resolved its backend more than once"
    assert m.resolved_backend(x.reshape(-1, 16)) in fk.available_backends(DEVICE)
    if DEVICE.type == "cpu":
        assert m.resolved_backend(x.reshape(-1, 16)) == "torch"  # "auto" picks per device
    counting = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=counting, fullgraph=True)
    for _ in range(3):
        compiled(x)
    assert calls == ["auto"], "the compiled module resolved the backend again although it was cached"
    fresh, _ = compile_problem("torch", None)
    compiled_fresh = torch.compile(fresh, backend=counting, fullgraph=True)
    for _ in range(3):
        compiled_fresh(x)
    assert calls == ["auto", "torch"], "not resolved exactly once (at trace time) by a fresh compiled module"
    if TRITON_OK:  # setting .backend takes effect at the next call: a recompile, resolved once
        fresh.backend = "triton"
        got = [compiled_fresh(x) for _ in range(2)]
        assert calls == ["auto", "torch", "triton"]
        graph = counting.graphs[-1].print_readable(print_output=False)
        assert "flexmoe_triton" in graph, "the recompiled graph does not run triton"
        torch.testing.assert_close(got[1], fresh(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", list(COMPILE_MASKS))
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_compile_inductor_fullgraph(seed, request, backend, mask):
    """The gpu tier: inductor (generated code around the backends' ops), one graph, forward
    and backward equal eager up to fp32 rounding."""
    device = torch.device("cuda")
    m, x = compile_problem(backend, request, device=device)
    allowed = None if COMPILE_MASKS[mask] is None else torch.tensor(COMPILE_MASKS[mask], device=device)
    eager = run_and_grads(m, m, x, allowed)
    counting = CountingBackend("inductor")
    torch._dynamo.reset()
    got = run_and_grads(torch.compile(m, backend=counting, fullgraph=True), m, x, allowed)
    for i, (a, b) in enumerate(zip(got, eager)):
        torch.testing.assert_close(a, b, msg=lambda s, i=i: f"output/grad #{i}: {s}")
    assert len(counting.graphs) == 1


def test_reference_custom_ops_opcheck(seed):
    """The torch backend's ops for torch.compile (flexmoe_reference::experts / experts_bwd, the
    deferred mask check flexmoe::checked_allow_mask): schemas, fake kernels, autograd; the
    experts op equals the eager loop exactly (frozen experts too)."""
    from flexmoe_kernels.ops.args import _checked_allow_mask
    from flexmoe_kernels.ops.reference.experts import _experts_bwd_op, _experts_op, experts_per_expert

    T, D, F, E, K = 6, 8, 6, 4, 2
    p = make_problem(T, D, F, E, K, F32, mask="token", opted_out=(2,))
    plan = fk.route_hidden(p["x"], p["router_weight"], K, allow_mask=p["allow_mask"])
    x_PD = p["x"].index_select(0, plan.sorted_token_ids_P.long())
    gu, dn = p["gate_up"].clone().requires_grad_(), p["down"].clone().requires_grad_()
    for trainable in (None, torch.tensor([True, False, True, True], device=DEVICE)):
        args = (x_PD.clone().requires_grad_(), gu, dn, plan.counts_E, trainable)
        torch.library.opcheck(_experts_op, args)
        torch.testing.assert_close(_experts_op(*args), experts_per_expert(*args), rtol=0, atol=0)
        bargs = (torch.randn_like(x_PD), x_PD, p["gate_up"], p["down"], plan.counts_E, trainable, True)
        torch.library.opcheck(_experts_bwd_op, bargs, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(_checked_allow_mask, (p["allow_mask"], K))


# ---------------------------------------------------------------------------- issue 13 item 5
def test_module_checks_the_mask_once_and_validate_false_skips_it(seed, monkeypatch):
    """``FlexMoE.forward`` checks the rows once, itself (a tensor: one call of the host read
    ``_check_rows``; a name list: none, checked from its entries); ``validate=False``
    (keyword-only) checks nothing and computes the same output."""
    from flexmoe_kernels.ops import args

    seen = []
    check_rows = args._check_rows
    monkeypatch.setattr(args, "_check_rows", lambda mask, k: seen.append(tuple(mask.shape)) or check_rows(mask, k))
    m, x = make_moe(E=5, K=2), torch.randn(2, 3, 12)
    per_seq = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    checked = m(x, per_seq)
    assert seen == [(6, 5)], "the per-sequence mask was not checked exactly once (expanded to (T, E))"
    torch.testing.assert_close(m(x, per_seq, validate=False), checked, rtol=0, atol=0)
    named = m(x, ["expert_0", 1, "expert_3"])
    assert seen == [(6, 5)], "validate=False or a name list read the mask back"
    torch.testing.assert_close(named, m(x, torch.tensor([True, True, False, True, False])), rtol=0, atol=0)
    with pytest.raises(ValueError, match="allowed_experts allows 1 experts, fewer than top_k=2"):
        m(x, [3, "expert_3"])
    with pytest.raises(TypeError, match="positional argument"):
        m(x, per_seq, False, False)


def test_compile_validate_false_has_no_mask_check_op(seed):
    """Under torch.compile (fullgraph, one graph) the deferred check op
    ``flexmoe::checked_allow_mask`` is in the graph with validate=True and absent with
    validate=False."""
    m, x = compile_problem("torch", None)
    allowed = torch.tensor(COMPILE_MASKS["per_sequence"], device=DEVICE)
    for validate in (True, False):
        counting = CountingBackend()
        torch._dynamo.reset()
        compiled = torch.compile(m, backend=counting, fullgraph=True)
        torch.testing.assert_close(compiled(x, allowed, validate=validate), m(x, allowed), rtol=0, atol=0)
        assert len(counting.graphs) == 1
        graph = counting.graphs[0].print_readable(print_output=False)
        assert ("checked_allow_mask" in graph) == validate, graph
