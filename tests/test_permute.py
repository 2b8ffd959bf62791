"""The permutation op: token rows in expert-grouped pair order (``ops/reference/permute.py``,
the grouping ``group_pairs`` of ``ops/reference/routing.py``).

The Triton backend fuses the permutation into the up-projection GEMM (it gathers x rows
through ``plan.schedule.padded_pairs_Q``); its grouping is checked here against the
reference's, and its gathers through the layer tests.

Legend: T tokens, D hidden, E experts, K top-k, P = T*K pairs (pair id ``p = t*K + k``).
"""
import pytest
import torch
from helpers import DEVICE, check_plan_invariants, make_mask

import flexmoe_kernels as fk
from flexmoe_kernels.ops.reference.permute import permute_rows
from flexmoe_kernels.ops.reference.routing import group_pairs
from flexmoe_kernels.ops.triton import launch
from flexmoe_kernels.ops.triton import routing as tr

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

TRITON_OK, TRITON_WHY = launch.is_available(DEVICE)


def _plan(T, E, K, mask=None):
    allow = make_mask(mask, T, E, K, device="cpu")
    return fk.route(torch.randn(T, E), K, allow_mask=allow), allow


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,mask", [(1, 4, 2, None), (37, 7, 3, "token"), (20, 6, 2, "global"),
                                        (29, 5, 5, None), (23, 8, 1, "sequence")])
def test_permute_rows_gathers_the_token_of_each_sorted_pair(seed, T, E, K, mask, dtype):
    D = 13
    x = torch.randn(T, D).to(dtype)
    plan, allow = _plan(T, E, K, mask)
    check_plan_invariants(plan, T, K, E, allow)
    x_PD = permute_rows(x, plan)
    assert x_PD.shape == (T * K, D) and x_PD.dtype == dtype
    sorted_p = plan.sorted_pairs_P.long()
    assert torch.equal(x_PD, x[sorted_p // K])  # an exact copy, row i = token of pair sorted_p[i]
    assert torch.equal(plan.sorted_token_ids_P.long(), sorted_p // K)
    ids = plan.topk_ids_TK.long()
    for e in range(E):  # expert e's rows are offsets[e]:offsets[e+1], the tokens that chose e
        s, t = int(plan.offsets_E1[e]), int(plan.offsets_E1[e + 1])
        tokens = [tok for tok in range(T) if e in ids[tok].tolist()]
        assert sorted((sorted_p[s:t] // K).tolist()) == tokens
        assert torch.equal(x_PD[s:t], x[tokens]) if tokens else s == t


def test_inverse_permutation_reads_back_in_pair_order(seed):
    T, E, K, D = 31, 6, 3, 9
    x = torch.randn(T, D)
    plan, _ = _plan(T, E, K, "token")
    x_PD = permute_rows(x, plan)
    inv = plan.inv_sorted_pairs_P.long()
    # pair p = t*K + k sits at sorted position inv[p]
    assert torch.equal(x_PD[inv], x.repeat_interleave(K, 0))
    assert torch.equal(plan.sorted_pairs_P.long()[inv], torch.arange(T * K))
    assert torch.equal(inv[plan.sorted_pairs_P.long()], torch.arange(T * K))


def test_permute_rows_backward_sums_the_K_copies(seed):
    T, E, K, D = 17, 5, 3, 7
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    plan, _ = _plan(T, E, K, "token")
    g = torch.randn(T * K, D, dtype=torch.float64)
    (gx,) = torch.autograd.grad(permute_rows(x, plan), x, g)
    inv = plan.inv_sorted_pairs_P.long()
    ref = torch.stack([sum(g[inv[t * K + k]] for k in range(K)) for t in range(T)])
    torch.testing.assert_close(gx, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("T,E,K", [(0, 4, 2), (1, 1, 1), (9, 12, 2), (40, 7, 4)])
def test_group_pairs_is_a_stable_sort_by_expert(seed, T, E, K):
    """counts / offsets / sorted pairs / inverse against a readable Python sort; experts that
    no pair chose (E > T*K possible) get count 0 and an empty range."""
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    counts, offsets, sorted_p, inv = group_pairs(ids.to(torch.int32), E)
    for v in (counts, offsets, sorted_p, inv):
        assert v.dtype == torch.int32
    flat = ids.flatten().tolist()
    P = T * K
    want = sorted(range(P), key=lambda p: (flat[p], p))
    assert sorted_p.tolist() == want
    assert counts.tolist() == [flat.count(e) for e in range(E)]
    assert offsets.tolist() == [sum(flat.count(j) for j in range(e)) for e in range(E + 1)]
    assert [want.index(p) for p in range(P)] == inv.tolist()


@pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")
@pytest.mark.parametrize("mask", [None, "token"])
def test_triton_plan_permutes_like_the_reference(seed, mask):
    T, E, K, D = 27, 6, 2, 11
    logits = torch.randn(T, E, device=DEVICE)
    allow = make_mask(mask, T, E, K)
    ref = fk.route(logits, K, allow_mask=allow)
    plan = tr.triton_route(logits, K, allow_mask=allow, block_m=4)
    x = torch.randn(T, D, device=DEVICE)
    assert torch.equal(permute_rows(x, plan), permute_rows(x, ref))
    # the schedule's padded slots hold the same pairs, expert by expert, padded with P
    s, P = plan.schedule, T * K
    padded = s.padded_pairs_Q.cpu()
    assert torch.equal(padded[padded != P], plan.sorted_pairs_P.cpu())
