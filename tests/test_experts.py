"""Grouped SwiGLU experts (PyTorch path) against a readable per-token loop."""
import pytest
import torch
import torch.nn.functional as F

import flexmoe_kernels as fk
from conftest import tol


def per_token_reference(x, ids, w, gate_up, down):
    """Loop over tokens and slots in float64: the most readable definition of the layer."""
    T, K = ids.shape
    out = torch.zeros(x.shape, dtype=torch.float64)
    Fw = down.shape[2]
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            g = gate_up[e, :Fw].double() @ x[t].double()
            u = gate_up[e, Fw:].double() @ x[t].double()
            out[t] += float(w[t, k]) * (down[e].double() @ (F.silu(g) * u))
    return out


def make(T, D, Fw, E, dtype=torch.float32):
    return (
        torch.randn(T, D, dtype=dtype),
        torch.randn(E, 2 * Fw, D, dtype=dtype) / D**0.5,
        torch.randn(E, D, Fw, dtype=dtype) / Fw**0.5,
    )


@pytest.mark.parametrize("T,D,Fw,E,K", [(1, 8, 6, 3, 2), (23, 16, 12, 5, 2), (40, 12, 20, 7, 5), (9, 10, 14, 4, 4)])
def test_grouped_swiglu_matches_loop(seed, T, D, Fw, E, K):
    x, gu, dn = make(T, D, Fw, E)
    plan = fk.route(torch.randn(T, E), K)
    out = fk.grouped_swiglu(x, plan, gu, dn)
    ref = per_token_reference(x, plan.topk_ids_TK, plan.topk_weights_TK, gu, dn)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))


def test_zero_token_experts_and_nan_opted_out(seed):
    T, D, Fw, E, K = 17, 8, 10, 6, 2
    x, gu, dn = make(T, D, Fw, E)
    allow = torch.tensor([True, True, False, True, False, False])
    gu[2] = float("nan"); dn[4] = float("nan"); gu[5] = float("nan")
    gu.requires_grad_(); dn.requires_grad_()
    plan = fk.route(torch.randn(T, E), K, allow_mask=allow)
    out = fk.grouped_swiglu(x, plan, gu, dn)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for e in (2, 4, 5):
        assert torch.all(gu.grad[e] == 0) and torch.all(dn.grad[e] == 0)


def test_one_expert_equals_dense_mlp(seed):
    T, D, Fw = 11, 8, 12
    x, gu, dn = make(T, D, Fw, 1)
    plan = fk.route(torch.randn(T, 1), 1)
    out = fk.grouped_swiglu(x, plan, gu, dn)
    dense = F.linear(F.silu(F.linear(x, gu[0, :Fw])) * F.linear(x, gu[0, Fw:]), dn[0])
    torch.testing.assert_close(out, dense, **tol(torch.float32))


def test_frozen_experts_get_no_weight_gradient(seed):
    T, D, Fw, E, K = 12, 8, 6, 3, 2
    x, gu, dn = make(T, D, Fw, E)
    x.requires_grad_(); gu.requires_grad_(); dn.requires_grad_()
    plan = fk.route(torch.randn(T, E), K)
    trainable = torch.tensor([False, True, True])
    out = fk.grouped_swiglu(x, plan, gu, dn, trainable_experts=trainable)
    out.square().sum().backward()
    assert torch.all(gu.grad[0] == 0) and torch.all(dn.grad[0] == 0)
    assert gu.grad[1:].abs().sum() > 0 and x.grad.abs().sum() > 0


def test_shape_and_dtype_errors():
    x, gu, dn = make(4, 8, 6, 3)
    plan = fk.route(torch.randn(4, 3), 2)
    with pytest.raises(ValueError, match="down must have shape"):
        fk.grouped_swiglu(x, plan, gu, dn[:, :, :5])
    with pytest.raises(ValueError, match="gate_up must have shape"):
        fk.grouped_swiglu(x, plan, gu[:, :, :7], dn)
    with pytest.raises(TypeError, match="gate_up has dtype"):
        fk.grouped_swiglu(x, plan, gu.double(), dn)
    with pytest.raises(ValueError, match="x has 5 rows"):
        fk.grouped_swiglu(torch.randn(5, 8), plan, gu, dn)
    with pytest.raises(ValueError, match="routing plan has 4"):
        fk.grouped_swiglu(x, fk.route(torch.randn(4, 4), 2), torch.randn(3, 12, 8), dn)
