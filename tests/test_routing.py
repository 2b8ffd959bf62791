"""Routing reference: semantics and invariants."""
import pytest
import torch

import flexmoe_kernels as fk
from flexmoe_kernels.ops.routing import check_allow_mask_rows


def _check_plan_invariants(plan, T, K, E, allow=None):
    assert plan.topk_ids_TK.shape == (T, K)
    assert int(plan.counts_E.sum()) == T * K
    assert torch.equal(plan.counts_E, torch.bincount(plan.topk_ids_TK.flatten(), minlength=E))
    assert plan.offsets_E1[0] == 0 and torch.equal(plan.offsets_E1[1:], plan.counts_E.cumsum(0))
    P = T * K
    assert torch.equal(plan.sorted_pairs_P[plan.inv_sorted_pairs_P], torch.arange(P))
    assert torch.equal(torch.sort(plan.sorted_pairs_P).values, torch.arange(P))
    ids_sorted = plan.topk_ids_TK.flatten()[plan.sorted_pairs_P]
    assert torch.all(ids_sorted[1:] >= ids_sorted[:-1])
    for e in range(E):
        s, t = plan.offsets_E1[e], plan.offsets_E1[e + 1]
        assert torch.all(ids_sorted[s:t] == e)
    # distinct experts per token
    assert all(len(set(r.tolist())) == K for r in plan.topk_ids_TK)
    if allow is not None:
        a = allow.expand(T, E) if allow.ndim == 1 else allow
        assert torch.all(a.gather(1, plan.topk_ids_TK))
        if allow.ndim == 1:
            assert torch.all(plan.counts_E[~allow] == 0)


@pytest.mark.parametrize("T,E,K", [(1, 4, 2), (37, 7, 5), (64, 8, 8), (5, 3, 1)])
def test_route_matches_softmax_then_topk(seed, T, E, K):
    logits = torch.randn(T, E)
    plan = fk.route(logits, K)
    probs = torch.softmax(logits, -1)
    ref_w, ref_ids = torch.topk(probs, K, -1)
    assert torch.equal(plan.topk_ids_TK, ref_ids)
    torch.testing.assert_close(plan.topk_weights_TK, ref_w)
    _check_plan_invariants(plan, T, K, E)


def test_norm_topk_prob(seed):
    logits = torch.randn(9, 6)
    plan = fk.route(logits, 3, norm_topk_prob=True)
    torch.testing.assert_close(plan.topk_weights_TK.sum(-1), torch.ones(9))


def test_mask_equals_physical_removal(seed):
    T, E, K = 50, 7, 3
    logits = torch.randn(T, E)
    allow = torch.tensor([True, False, True, True, False, True, True])
    plan = fk.route(logits, K, allow_mask=allow)
    kept = allow.nonzero().flatten()
    ref = fk.route(logits[:, kept], K)
    assert torch.equal(kept[ref.topk_ids_TK], plan.topk_ids_TK)
    torch.testing.assert_close(plan.topk_weights_TK, ref.topk_weights_TK, rtol=1e-6, atol=1e-7)
    _check_plan_invariants(plan, T, K, E, allow)


def test_mask_before_softmax_not_after(seed):
    # Weights must renormalise over allowed experts (softmax over allowed only).
    logits = torch.randn(20, 4)
    allow = torch.tensor([True, True, False, True])
    plan = fk.route(logits, 3, allow_mask=allow)
    torch.testing.assert_close(plan.topk_weights_TK.sum(-1), torch.ones(20))


def test_per_token_mask_and_sequence_expansion(seed):
    B, S, E, K = 3, 4, 5, 2
    seq_mask = torch.rand(B, E) > 0.3
    seq_mask[:, :2] = True
    tok_mask = fk.expand_sequence_mask(seq_mask, S)
    assert tok_mask.shape == (B * S, E)
    logits = torch.randn(B * S, E)
    plan = fk.route(logits, K, allow_mask=tok_mask)
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        alone = fk.route(logits[rows], K, allow_mask=seq_mask[b])
        assert torch.equal(plan.topk_ids_TK[rows], alone.topk_ids_TK)
        torch.testing.assert_close(plan.topk_weights_TK[rows], alone.topk_weights_TK)
    _check_plan_invariants(plan, B * S, K, E, tok_mask)


def test_expert_bias_is_clamped_nonpositive(seed):
    logits = torch.randn(10, 4)
    bias = torch.tensor([0.0, -1.5, 2.0, -0.3])
    plan = fk.route(logits, 2, expert_bias=bias)
    ref = fk.route(logits + bias.clamp(max=0), 2)
    assert torch.equal(plan.topk_ids_TK, ref.topk_ids_TK)
    torch.testing.assert_close(plan.topk_weights_TK, ref.topk_weights_TK)


def test_gradients_flow_to_logits_and_bias(seed):
    logits = torch.randn(6, 5, requires_grad=True)
    bias = torch.full((5,), -0.5, requires_grad=True)
    plan = fk.route(logits, 2, expert_bias=bias, allow_mask=torch.tensor([True, True, False, True, True]))
    (plan.topk_weights_TK * torch.randn(6, 2)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.all(logits.grad[:, 2] == 0)
    assert torch.isfinite(bias.grad).all()


def test_underflowed_allowed_probability_never_picks_masked_expert():
    logits = torch.tensor([[0.0, -200.0, 50.0, -300.0]])
    allow = torch.tensor([True, True, False, True])
    plan = fk.route(logits, 3, allow_mask=allow)
    assert set(plan.topk_ids_TK[0].tolist()) == {0, 1, 3}


def test_route_hidden(seed):
    h, R = torch.randn(7, 12), torch.randn(4, 12)
    a, b = fk.route_hidden(h, R, 2), fk.route(h @ R.T, 2)
    assert torch.equal(a.topk_ids_TK, b.topk_ids_TK)


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(4, 3)
    with pytest.raises(ValueError, match="top_k=4 is larger"):
        fk.route(logits, 4)
    with pytest.raises(ValueError, match="top_k"):
        fk.route(logits, 0)
    with pytest.raises(ValueError, match="allows 1 experts, fewer than top_k=2"):
        fk.route(logits, 2, allow_mask=torch.tensor([True, False, False]))
    m = torch.ones(4, 3, dtype=torch.bool)
    m[2, 1:] = False
    with pytest.raises(ValueError, match="row 2 allows 1 experts"):
        fk.route(logits, 2, allow_mask=m)
    with pytest.raises(ValueError, match="allow_mask must have shape"):
        fk.route(logits, 2, allow_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="allow_mask must have dtype"):
        fk.route(logits, 2, allow_mask=torch.ones(3))
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        fk.route(torch.randn(4), 1)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        fk.route(torch.ones(4, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="expert_bias must have shape"):
        fk.route(logits, 1, expert_bias=torch.zeros(4))
    check_allow_mask_rows(None, 2, 3)


def test_z_loss(seed):
    z = torch.randn(5, 4)
    torch.testing.assert_close(fk.router_z_loss(z), (torch.logsumexp(z, -1) ** 2).mean())


def test_exact_ties_go_to_lower_expert_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.bfloat16)
    plan = fk.route(logits, 3)
    assert plan.topk_ids_TK.tolist() == [[1, 2, 3], [0, 1, 2]]
