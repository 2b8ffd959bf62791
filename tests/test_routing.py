"""The routing op: masked softmax-top-k -> RoutingPlan (+ tile schedule), forward and backward.

* reference (``flexmoe_kernels.route``, ``ops/reference/routing.py``): semantics and invariants;
* Triton (``ops/triton/routing.py``): every plan field against the reference, the padded tile
  schedule (``plan.schedule``) against ``tile_schedule_reference`` and its invariants, the
  routing backward against autograd through the reference, launch configs, errors;
* CUDA (``ops/cuda/routing.py``): wrapper validation (CPU tier, before any CUDA call), the
  custom ops' fake implementations and ``CudaRouteFunction``'s backward over the emulated
  ``_C`` (cuda_emulation.py); ``gpu`` tier: the kernel's every output on poisoned buffers
  against the reference, determinism, the backward against autograd.

CPU tier: the Triton kernels run under the interpreter (switched on by conftest). Where CUDA
is present the same tests run compiled, plus the ``gpu`` tier (bf16, large shapes, CUDA-graph
capture and replay with a changed mask). The sm_90 compile tier is in test_compile_sm90.py.
"""
import pytest
import torch
from helpers import DEVICE, SCHEDULE_FIELDS, check_plan_invariants, make_mask, poison_, tol

import flexmoe_kernels as fk
from flexmoe_kernels.ops.args import check_allow_mask_rows
from flexmoe_kernels.ops.cuda import _ext as cuda_ext
from flexmoe_kernels.ops.cuda import routing as cuda_routing
from flexmoe_kernels.ops.plan import RoutingPlan, TileSchedule, schedule_sizes
from flexmoe_kernels.ops.triton import launch
from flexmoe_kernels.ops.triton import routing as tr

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

TRITON_OK, TRITON_WHY = launch.is_available(DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")


# =========================================================================== reference routing
@pytest.mark.parametrize("T,E,K", [(1, 4, 2), (37, 7, 5), (64, 8, 8), (5, 3, 1)])
def test_route_matches_softmax_then_topk(seed, T, E, K):
    logits = torch.randn(T, E)
    plan = fk.route(logits, K)
    probs = torch.softmax(logits, -1)
    ref_w, ref_ids = torch.topk(probs, K, -1)
    assert torch.equal(plan.topk_ids_TK.long(), ref_ids)
    torch.testing.assert_close(plan.topk_weights_TK, ref_w)
    check_plan_invariants(plan, T, K, E)


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
    assert torch.equal(kept[ref.topk_ids_TK.long()], plan.topk_ids_TK.long())
    torch.testing.assert_close(plan.topk_weights_TK, ref.topk_weights_TK, rtol=1e-6, atol=1e-7)
    check_plan_invariants(plan, T, K, E, allow)


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
    check_plan_invariants(plan, B * S, K, E, tok_mask)


@pytest.mark.parametrize("kind", [None, "global", "token", "sequence"])
def test_every_mask_kind_selects_allowed_experts_only(seed, kind):
    T, E, K = 23, 6, 2
    allow = make_mask(kind, T, E, K, device="cpu", opted_out=(4,))
    logits = torch.randn(T, E)
    logits[:, 4] += 30.0  # would win every token if it were allowed
    plan = fk.route(logits, K, allow_mask=allow)
    check_plan_invariants(plan, T, K, E, allow)
    assert int(plan.counts_E[4]) == 0
    assert torch.isneginf(plan.logits_TE[:, 4]).all()


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


# =========================================================================== tile schedule
def test_tile_schedule_reference_by_hand():
    # T=3, K=2, E=3, block_m=2: ids [[2,0],[2,1],[0,2]] -> pairs per expert 0:{1,4} 1:{3} 2:{0,2,5}
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    s = tr.tile_schedule_reference(ids, 3, 2)
    assert isinstance(s, TileSchedule) and s.block_m == 2 and s.num_tiles_max == 5
    S = 6  # sentinel P
    assert s.padded_pairs_Q.tolist() == [1, 4, 3, S, 0, 2, 5, S, S, S]  # Q_max = roundup(6 + 3, 2)
    assert s.padded_offsets_E1.tolist() == [0, 2, 4, 8]
    assert s.tile_expert_E_tiles.tolist() == [0, 1, 2, 2, -1]
    assert s.num_tiles.tolist() == [4]
    assert schedule_sizes(3, 2, 3, 2) == (10, 5)


@pytest.mark.parametrize("T,E,K,block_m", [(1, 1, 1, 1), (7, 3, 2, 4), (50, 9, 3, 16), (33, 5, 5, 64)])
def test_schedule_sizes_fit_every_routing(seed, T, E, K, block_m):
    """Q_max = roundup(T*K + E*(block_m-1), block_m) holds every padded grouping, including
    the worst case where every expert has a partial tile."""
    q_max, nt = schedule_sizes(T, K, E, block_m)
    assert q_max % block_m == 0 and nt == q_max // block_m and q_max >= T * K
    for _ in range(3):
        plan = fk.route(torch.randn(T, E), K)
        s = tr.tile_schedule_reference(plan.topk_ids_TK, E, block_m)
        _schedule_invariants(plan, s, K, E, block_m)


# =========================================================================== Triton routing
def _randn_distinct(T, E, dtype=torch.float32, scale=1.0):
    """(T, E) random logits in ``dtype`` with no exact ties inside a row (so top-k ids are
    unambiguous for the reference's ``torch.topk``)."""
    x = (torch.randn(T, E) * scale).to(dtype)
    for _ in range(100):
        dup = torch.tensor([len(set(r.tolist())) < E for r in x.float()], dtype=torch.bool)
        if not dup.any():
            return x.to(DEVICE)
        x[dup] = (torch.randn(int(dup.sum()), E) * scale).to(dtype)
    raise RuntimeError("could not draw tie-free logits")


def _schedule_invariants(plan, sched, K, E, block_m, allow=None):
    """Invariants of the padded schedule ``sched`` of ``plan``, checked independently of the
    reference."""
    T = plan.topk_ids_TK.shape[0]
    P = T * K
    q_max, nt_max = schedule_sizes(T, K, E, block_m)
    padded = sched.padded_pairs_Q.cpu().long()
    poff = sched.padded_offsets_E1.cpu().long()
    counts = plan.counts_E.cpu().long()
    tiles = sched.tile_expert_E_tiles.cpu().long()
    ids = plan.topk_ids_TK.cpu().long().flatten()
    n_tiles = int(sched.num_tiles.cpu())
    for name in SCHEDULE_FIELDS:
        assert getattr(sched, name).dtype == torch.int32, name
    assert sched.block_m == block_m and sched.num_tiles_max == nt_max
    assert padded.shape == (q_max,) and tiles.shape == (nt_max,) and sched.num_tiles.shape == (1,)
    assert q_max % block_m == 0
    real = padded[padded != P]
    # every real pair appears exactly once; everything else is the sentinel
    assert torch.equal(torch.sort(real).values, torch.arange(P))
    assert bool(((padded >= 0) & (padded <= P)).all())
    assert int(poff[0]) == 0 and bool((poff % block_m == 0).all())
    assert torch.equal(poff[1:] - poff[:-1], (counts + block_m - 1) // block_m * block_m)
    assert n_tiles * block_m == int(poff[-1])
    assert bool((tiles[n_tiles:] == -1).all()) and bool((padded[n_tiles * block_m:] == P).all())
    for e in range(E):
        grp = padded[poff[e]: poff[e + 1]]
        c = int(counts[e])
        # real pairs first (increasing pair id = stable), sentinels only in the padding
        assert bool((grp[:c] != P).all()) and bool((grp[c:] == P).all())
        assert bool((grp[:c][1:] > grp[:c][:-1]).all())
        assert bool((ids[grp[:c]] == e).all())
    for i in range(n_tiles):  # each tile holds one expert and is not empty
        tile = padded[i * block_m: (i + 1) * block_m]
        assert int(tile[0]) != P
        assert bool((ids[tile[tile != P]] == tiles[i]).all())
    if allow is not None and allow.ndim == 1:
        off = (~allow).cpu()
        assert bool((counts[off] == 0).all()) and not bool(torch.isin(tiles, off.nonzero().flatten()).any())


def _check_plan(plan, logits, K, *, allow=None, bias=None, norm=False, block_m=64):
    """Compare every field of ``plan`` with the reference route and schedule."""
    T, E = logits.shape
    ref = fk.route(logits, K, allow_mask=allow, expert_bias=bias, norm_topk_prob=norm)
    i32 = torch.int32
    assert isinstance(plan, RoutingPlan) and isinstance(plan.schedule, TileSchedule)
    assert plan.topk_ids_TK.dtype == i32 and plan.topk_weights_TK.dtype == torch.float32
    assert plan.schedule.block_m == block_m
    torch.testing.assert_close(plan.topk_ids_TK, ref.topk_ids_TK.to(i32), atol=0, rtol=0)
    torch.testing.assert_close(plan.topk_weights_TK, ref.topk_weights_TK, **tol(torch.float32))
    torch.testing.assert_close(plan.logits_TE, ref.logits_TE, atol=0, rtol=0)  # same fp32 add
    probs_ref = torch.softmax(ref.logits_TE, -1)
    torch.testing.assert_close(plan.probs_TE, probs_ref, **tol(torch.float32))
    if allow is not None:
        a = allow.expand(T, E) if allow.ndim == 1 else allow
        assert bool((plan.probs_TE[~a] == 0).all()) and bool((plan.logits_TE[~a] == float("-inf")).all())
        assert bool(a.gather(1, plan.topk_ids_TK.long()).all()), "a disallowed expert was selected"
    for name in ("counts_E", "offsets_E1", "sorted_pairs_P", "inv_sorted_pairs_P"):
        got = getattr(plan, name)
        assert got.dtype == i32, name
        torch.testing.assert_close(got, getattr(ref, name).to(i32), atol=0, rtol=0, msg=name)
    sched = tr.tile_schedule_reference(ref.topk_ids_TK, E, block_m)
    for name in SCHEDULE_FIELDS:
        torch.testing.assert_close(getattr(plan.schedule, name), getattr(sched, name), atol=0, rtol=0, msg=name)
    _schedule_invariants(plan, plan.schedule, K, E, block_m, allow)
    check_plan_invariants(plan, T, K, E, allow)
    return ref


CASES = [
    # T, E, K, block_m, mask, bias, norm
    (1, 4, 2, 64, None, False, False),  # T=1, smaller than every tile
    (37, 7, 5, 16, "global", False, False),  # K == number of allowed experts
    (70, 9, 2, 4, "token", True, False),  # per-token mask + bias
    (64, 8, 8, 16, None, False, True),  # K == E, renormalised (weights sum to 1 each)
    (5, 3, 1, 1, None, True, False),  # K=1, block_m=1 (no padding)
    (53, 9, 3, 8, "token", True, True),  # everything at once
    (13, 1, 1, 4, None, False, False),  # E=1: a dense layer
    (45, 6, 2, 64, "global", True, True),
]


# Small launch blocks so that the multi-block paths run at test sizes: several token blocks,
# several prefix-scan programs and loop steps, several sentinel programs.
TINY_CONFIG = "block_t=8,block_nb=2,block_es=2,tiles_per_prog=4"


@pytest.fixture(params=["default", "tiny"])
def config(request, monkeypatch):
    if request.param == "tiny":
        monkeypatch.setenv("FLEXMOE_TRITON_ROUTING_CONFIG", TINY_CONFIG)
    else:
        monkeypatch.delenv("FLEXMOE_TRITON_ROUTING_CONFIG", raising=False)
    return request.param


@needs_triton
@pytest.mark.parametrize("T,E,K,block_m,mask,bias,norm", CASES)
def test_triton_route_matches_reference(seed, config, T, E, K, block_m, mask, bias, norm):
    logits = _randn_distinct(T, E, scale=2.0)
    allow = make_mask(mask, T, E, K)
    b = torch.randn(E, device=DEVICE) if bias else None
    plan = tr.triton_route(logits, K, allow_mask=allow, expert_bias=b, norm_topk_prob=norm, block_m=block_m)
    _check_plan(plan, logits, K, allow=allow, bias=b, norm=norm, block_m=block_m)


@needs_triton
def test_triton_route_sequence_mask(seed, config):
    T, E, K = 30, 7, 2
    logits = _randn_distinct(T, E)
    allow = make_mask("sequence", T, E, K)
    plan = tr.triton_route(logits, K, allow_mask=allow, block_m=4)
    _check_plan(plan, logits, K, allow=allow, block_m=4)


@needs_triton
def test_triton_fp16_logits_and_strided_input(seed):
    T, E, K = 41, 7, 3
    logits16 = _randn_distinct(E, T, torch.float16).t()  # (T, E) view, non-contiguous
    assert not logits16.is_contiguous()
    allow = make_mask("token", T, E, K)
    plan = tr.triton_route(logits16, K, allow_mask=allow, block_m=8)
    _check_plan(plan, logits16, K, allow=allow, block_m=8)


@needs_triton
def test_triton_zero_token_experts_and_all_to_one_expert(seed):
    # Expert 2 dominates every token with K=1: all pairs go to one expert, the others own no tiles.
    T, E, K, bm = 29, 5, 1, 8
    logits = _randn_distinct(T, E)
    logits[:, 2] += 50.0
    plan = tr.triton_route(logits, K, block_m=bm)
    _check_plan(plan, logits, K, block_m=bm)
    assert plan.counts_E.tolist() == [0, 0, T, 0, 0]
    assert int(plan.schedule.num_tiles) == -(-T // bm)
    assert set(plan.schedule.tile_expert_E_tiles.tolist()) == {2, -1}


@needs_triton
def test_triton_opted_out_experts_get_nothing_even_when_dominant(seed):
    T, E, K = 31, 6, 2
    logits = _randn_distinct(T, E)
    logits[:, 1] += 30.0  # would win every token if it were allowed
    logits[:, 4] += 30.0
    allow = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    plan = tr.triton_route(logits, K, allow_mask=allow, block_m=4)
    _check_plan(plan, logits, K, allow=allow, block_m=4)
    # exact removal: equal to routing a model rebuilt without experts 1 and 4
    kept = allow.nonzero().flatten()
    alone = tr.triton_route(logits[:, kept].contiguous(), K, block_m=4)
    torch.testing.assert_close(kept[alone.topk_ids_TK.long()].int(), plan.topk_ids_TK, atol=0, rtol=0)
    torch.testing.assert_close(alone.topk_weights_TK, plan.topk_weights_TK, rtol=1e-6, atol=1e-7)
    # NaN logits of opted-out experts never reach anything (they are replaced by -inf first)
    nan_logits = logits.clone()
    nan_logits[:, ~allow] = float("nan")
    again = tr.triton_route(nan_logits, K, allow_mask=allow, block_m=4)
    for name in ("topk_ids_TK", "topk_weights_TK", "probs_TE", "logits_TE"):
        torch.testing.assert_close(getattr(again, name), getattr(plan, name), atol=0, rtol=0, msg=name)
    torch.testing.assert_close(again.schedule.padded_pairs_Q, plan.schedule.padded_pairs_Q, atol=0, rtol=0)
    dz = tr.triton_route_backward(torch.randn(T, K, device=DEVICE), again)
    assert bool(dz.isfinite().all()) and bool((dz[:, ~allow] == 0).all())


@needs_triton
def test_triton_underflowed_allowed_probability_never_picks_masked_expert():
    logits = torch.tensor([[0.0, -200.0, 50.0, -300.0], [1.0, 2.0, 3.0, -150.0]], device=DEVICE)
    allow = torch.tensor([True, True, False, True], device=DEVICE)
    plan = tr.triton_route(logits, 3, allow_mask=allow)
    assert plan.topk_ids_TK.tolist() == [[0, 1, 3], [1, 0, 3]]  # by logit; probs underflow to 0
    assert plan.probs_TE[:, 2].tolist() == [0.0, 0.0]


@needs_triton
def test_triton_exact_ties_break_to_lower_expert_id(seed, config):
    # Integer logits: many exact ties. Documented order: decreasing logit, then increasing id,
    # i.e. a stable descending sort.
    T, E, K = 47, 8, 4
    logits = torch.randint(-2, 3, (T, E)).float().to(DEVICE)
    allow = make_mask("token", T, E, K)
    plan = tr.triton_route(logits, K, allow_mask=allow, block_m=4)
    z = logits.masked_fill(~allow, float("-inf"))
    ids_ref = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :K]
    torch.testing.assert_close(plan.topk_ids_TK, ids_ref.int(), atol=0, rtol=0)
    probs = torch.softmax(z, -1)
    torch.testing.assert_close(plan.topk_weights_TK, probs.gather(1, ids_ref), **tol(torch.float32))
    flat = ids_ref.flatten()
    sorted_ref = torch.sort(flat, stable=True).indices
    torch.testing.assert_close(plan.sorted_pairs_P, sorted_ref.int(), atol=0, rtol=0)
    torch.testing.assert_close(plan.counts_E, torch.bincount(flat, minlength=E).int(), atol=0, rtol=0)
    sched = tr.tile_schedule_reference(ids_ref, E, 4)
    torch.testing.assert_close(plan.schedule.padded_pairs_Q, sched.padded_pairs_Q, atol=0, rtol=0)
    _schedule_invariants(plan, plan.schedule, K, E, 4)


@needs_triton
def test_triton_routing_is_deterministic(seed):
    T, E, K = 67, 9, 4
    logits = _randn_distinct(T, E)
    allow = make_mask("token", T, E, K)
    a = tr.triton_route(logits, K, allow_mask=allow, block_m=8)
    b = tr.triton_route(logits, K, allow_mask=allow, block_m=8)
    for name in ("topk_ids_TK", "sorted_pairs_P", "inv_sorted_pairs_P"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("padded_pairs_Q", "tile_expert_E_tiles"):
        assert torch.equal(getattr(a.schedule, name), getattr(b.schedule, name)), name


@needs_triton
def test_triton_every_output_is_kernel_written(poisoned_outputs):
    """The poisoning fixture really covers every tensor of the plan and its schedule (so
    unwritten elements would show up as NaN / INT_MAX in the comparisons above)."""
    logits = _randn_distinct(9, 5)
    plan = tr.triton_route(logits, 2, block_m=4)
    ptrs = {t.data_ptr() for t in poisoned_outputs}
    tensors = {n: getattr(plan, n) for n in RoutingPlan.__dataclass_fields__}
    tensors.update({f"schedule.{n}": getattr(plan.schedule, n) for n in TileSchedule.__dataclass_fields__})
    checked = 0
    for name, v in tensors.items():
        if isinstance(v, torch.Tensor):
            checked += 1
            assert v.data_ptr() in ptrs, f"{name} was not allocated through the poisoned hook"
            if v.is_floating_point():
                assert not bool(v.isnan().any()), name
            else:
                assert not bool((v == torch.iinfo(v.dtype).max).any()), name
    assert checked == 12  # 8 plan tensors + 4 schedule tensors
    d = tr.triton_route_backward(torch.randn(9, 2, device=DEVICE), plan)
    assert d.data_ptr() in {t.data_ptr() for t in poisoned_outputs}


BWD_CASES = [
    # T, E, K, mask, bias, norm, logits dtype
    (37, 7, 3, None, False, False, torch.float32),
    (37, 7, 3, "token", True, True, torch.float32),
    (1, 5, 5, None, False, True, torch.float32),  # K == E, renormalised: gradient ~ 0
    (23, 9, 1, "global", False, True, torch.float32),  # K=1 renormalised: gradient exactly 0
    (50, 6, 2, "global", True, False, torch.float16),
    (61, 8, 4, "token", False, True, torch.float16),
    (30, 7, 2, "sequence", True, False, torch.float32),
]


@needs_triton
@pytest.mark.parametrize("T,E,K,mask,bias,norm,dtype", BWD_CASES)
def test_triton_backward_matches_autograd(seed, T, E, K, mask, bias, norm, dtype):
    logits = _randn_distinct(T, E, dtype, scale=1.5)
    allow = make_mask(mask, T, E, K)
    b = (torch.randn(E, device=DEVICE) - 0.3) if bias else None
    plan = tr.triton_route(logits, K, allow_mask=allow, expert_bias=b, norm_topk_prob=norm)
    g_TK = torch.randn(T, K, device=DEVICE)
    dz = tr.triton_route_backward(g_TK, plan, norm_topk_prob=norm)

    # reference: autograd through the PyTorch route (on the same fp32-upcast logits)
    x = logits.float().requires_grad_(True)
    bb = b.clone().requires_grad_(True) if bias else None
    ref = fk.route(x, K, allow_mask=allow, expert_bias=bb, norm_topk_prob=norm)
    assert torch.equal(ref.topk_ids_TK.int(), plan.topk_ids_TK)
    inputs = (x, bb) if bias else (x,)
    grads = torch.autograd.grad((ref.topk_weights_TK * g_TK).sum(), inputs)
    assert dz.dtype == torch.float32 and dz.shape == (T, E)
    torch.testing.assert_close(dz, grads[0], **tol(torch.float32))
    if allow is not None:
        a = allow.expand(T, E) if allow.ndim == 1 else allow
        assert bool((dz[~a] == 0).all())
    if bias:  # d bias = sum_t dz where bias < 0 (min(b, 0) passes the gradient only there)
        torch.testing.assert_close((dz.sum(0) * (b < 0)), grads[1], **tol(torch.float32))
    if not norm or 1 < K < E:  # renormalised K=1 or K=E: the exact gradient is 0
        assert dz.abs().max() > 1e-3  # the comparison is not vacuous


@needs_triton
def test_triton_backward_strided_fp16_dweights(seed, monkeypatch):
    monkeypatch.setenv("FLEXMOE_TRITON_ROUTING_CONFIG", "block_t=4")  # several programs
    T, E, K = 19, 6, 3
    logits = _randn_distinct(T, E)
    plan = tr.triton_route(logits, K, norm_topk_prob=True)
    g = torch.randn(K, T, device=DEVICE).half().t()  # non-contiguous fp16 (T, K)
    dz = tr.triton_route_backward(g, plan, norm_topk_prob=True)
    x = logits.clone().requires_grad_(True)
    ref = fk.route(x, K, norm_topk_prob=True)
    (gx,) = torch.autograd.grad((ref.topk_weights_TK * g.float()).sum(), x)
    torch.testing.assert_close(dz, gx, **tol(torch.float32))


def test_triton_routing_config_env(monkeypatch):
    cfg = tr.routing_config(32768, 128, 8, 64)
    assert cfg.block_t * 128 <= 2048
    monkeypatch.setenv("FLEXMOE_TRITON_ROUTING_CONFIG", "block_t=16, num_warps=8")
    cfg = tr.routing_config(100, 8, 2, 64)
    assert (cfg.block_t, cfg.num_warps) == (16, 8)
    for bad, msg in [("block_q=4", "unknown field"), ("block_t=x", "must be an int"), ("block_t=3", "power of two")]:
        monkeypatch.setenv("FLEXMOE_TRITON_ROUTING_CONFIG", bad)
        with pytest.raises(ValueError, match=msg):
            tr.routing_config(100, 8, 2, 64)


@needs_triton
def test_triton_is_available():
    ok, why = launch.is_available(DEVICE)
    assert ok, why
    ok, why = launch.is_available("meta")
    assert not ok and "meta" in why


@needs_triton
def test_triton_bad_inputs_raise_clear_errors():
    logits = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="top_k=4 is larger"):
        tr.triton_route(logits, 4)
    with pytest.raises(ValueError, match="top_k"):
        tr.triton_route(logits, 0)
    for bm in (3, 0, 2048, True):
        with pytest.raises(ValueError, match="block_m"):
            tr.triton_route(logits, 1, block_m=bm)
    with pytest.raises(ValueError, match="allows 1 experts, fewer than top_k=2"):
        tr.triton_route(logits, 2, allow_mask=torch.tensor([True, False, False], device=DEVICE))
    with pytest.raises(ValueError, match="allow_mask must have shape"):
        tr.triton_route(logits, 2, allow_mask=torch.ones(5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="allow_mask must have dtype"):
        tr.triton_route(logits, 2, allow_mask=torch.ones(3, device=DEVICE))
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        tr.triton_route(logits.long(), 1)
    with pytest.raises(ValueError, match="expert_bias must have shape"):
        tr.triton_route(logits, 1, expert_bias=torch.zeros(4, device=DEVICE))
    plan = tr.triton_route(logits, 2)
    with pytest.raises(ValueError, match="dweights must have shape"):
        tr.triton_route_backward(torch.randn(4, 3, device=DEVICE), plan)
    with pytest.raises(TypeError, match="plan must be a RoutingPlan with probs_TE"):
        tr.triton_route_backward(torch.randn(4, 2, device=DEVICE), fk.route(logits, 2))


def _check_against_own_ids(plan, logits, K, allow, bias, block_m, g_TK):
    """Check a plan whose logits may hold exact ties (bf16): ids against the documented rule
    (stable descending sort of the fp32 masked logits), everything else against references
    built from those ids, and the backward against autograd through softmax + gather."""
    T, E = logits.shape
    z = logits.float() + (bias.clamp(max=0) if bias is not None else 0)
    if allow is not None:
        z = z.masked_fill(~allow, float("-inf"))
    torch.testing.assert_close(plan.logits_TE, z, atol=0, rtol=0)
    ids_ref = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :K]
    torch.testing.assert_close(plan.topk_ids_TK, ids_ref.int(), atol=0, rtol=0)
    x = z.clone().requires_grad_(True)
    probs = torch.softmax(x, -1)
    w = probs.gather(1, ids_ref)
    torch.testing.assert_close(plan.probs_TE, probs.detach(), **tol(torch.float32))
    torch.testing.assert_close(plan.topk_weights_TK, w.detach(), **tol(torch.float32))
    flat = ids_ref.flatten()
    sorted_ref = torch.sort(flat, stable=True).indices
    torch.testing.assert_close(plan.sorted_pairs_P, sorted_ref.int(), atol=0, rtol=0)
    inv = torch.empty_like(sorted_ref)
    inv[sorted_ref] = torch.arange(T * K, device=inv.device)
    torch.testing.assert_close(plan.inv_sorted_pairs_P, inv.int(), atol=0, rtol=0)
    counts = torch.bincount(flat, minlength=E)
    torch.testing.assert_close(plan.counts_E, counts.int(), atol=0, rtol=0)
    torch.testing.assert_close(plan.offsets_E1[1:], counts.cumsum(0).int(), atol=0, rtol=0)
    sched = tr.tile_schedule_reference(ids_ref, E, block_m)
    for name in SCHEDULE_FIELDS:
        torch.testing.assert_close(getattr(plan.schedule, name), getattr(sched, name), atol=0, rtol=0, msg=name)
    _schedule_invariants(plan, plan.schedule, K, E, block_m, allow)
    dz = tr.triton_route_backward(g_TK, plan)
    (gx,) = torch.autograd.grad((w * g_TK.float()).sum(), x)
    torch.testing.assert_close(dz, gx, **tol(torch.float32))


@needs_triton
def test_triton_bf16_logits_with_ties(seed):
    # bf16 logits tie often; the interpreter only loads and upcasts them (no bf16 arithmetic).
    T, E, K = 45, 9, 3
    logits = (torch.randn(T, E) * 0.5).bfloat16().to(DEVICE)
    allow = make_mask("token", T, E, K)
    b = torch.randn(E, device=DEVICE)
    plan = tr.triton_route(logits, K, allow_mask=allow, expert_bias=b, block_m=8)
    _check_against_own_ids(plan, logits, K, allow, b, 8, torch.randn(T, K, device=DEVICE))


@needs_triton
def test_triton_zero_tokens():
    logits = torch.randn(0, 5, device=DEVICE)
    plan = tr.triton_route(logits, 2, block_m=4)
    assert plan.topk_ids_TK.shape == (0, 2) and plan.sorted_pairs_P.shape == (0,)
    assert plan.counts_E.tolist() == [0] * 5 and plan.offsets_E1.tolist() == [0] * 6
    s = plan.schedule
    assert s.num_tiles.tolist() == [0] and set(s.tile_expert_E_tiles.tolist()) == {-1}
    assert set(s.padded_pairs_Q.tolist()) == {0}  # sentinel P = 0
    assert tr.triton_route_backward(torch.randn(0, 2, device=DEVICE), plan).shape == (0, 5)


@needs_triton
def test_triton_index_overflow_is_refused():
    huge = torch.empty(1, 8, device=DEVICE).expand(2**28, 8)  # a view: no memory
    with pytest.raises(ValueError, match="does not fit int32"):
        tr.triton_route(huge, 8)


# --------------------------------------------------------------------------- gpu tier
@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K,block_m", [(4099, 128, 8, 64), (16384, 7, 5, 128), (33, 7, 5, 16), (5, 128, 8, 16)])
def test_gpu_bf16_large(seed, T, E, K, block_m):
    logits = (torch.randn(T, E, device=DEVICE) * 3).bfloat16()
    allow = make_mask("token", T, E, K)
    b = torch.randn(E, device=DEVICE)
    plan = tr.triton_route(logits, K, allow_mask=allow, expert_bias=b, block_m=block_m)
    g = torch.randn(T, K, device=DEVICE, dtype=torch.bfloat16)
    _check_against_own_ids(plan, logits, K, allow, b, block_m, g)


@pytest.mark.gpu
@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("T", [300, 7])  # three launches / the single fused launch
def test_gpu_cuda_graph_replay_with_new_mask_and_logits(seed, validate, T):
    E, K, bm = 9, 3, 32
    logits = _randn_distinct(T, E)
    allow = make_mask("token", T, E, K)
    g = torch.randn(T, K, device=DEVICE)
    tr.triton_route(logits, K, allow_mask=allow, block_m=bm)  # compile outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tr.triton_route_backward(g, tr.triton_route(logits, K, allow_mask=allow, block_m=bm))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = tr.triton_route(logits, K, allow_mask=allow, block_m=bm, validate=validate)
        dz = tr.triton_route_backward(g, plan)
    for _ in range(2):
        logits.copy_(_randn_distinct(T, E))
        allow.copy_(make_mask("token", T, E, K))
        g.copy_(torch.randn(T, K, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        _check_plan(plan, logits, K, allow=allow, block_m=bm)
        x = logits.clone().requires_grad_(True)
        ref = fk.route(x, K, allow_mask=allow)
        (gx,) = torch.autograd.grad((ref.topk_weights_TK * g).sum(), x)
        torch.testing.assert_close(dz, gx, **tol(torch.float32))


# =========================================================================== CUDA routing
# ops/cuda/routing.py: the validating wrappers of _C.router_forward / router_backward, the
# custom ops flexmoe_cuda::route / route_bwd and CudaRouteFunction. CPU tier: validation
# (raised before any CUDA call) and, under the emulated _C (cuda_emulation.py), the glue;
# gpu tier: the kernels on poisoned outputs against the reference.
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_cuda_router_rejects_cpu_and_malformed_tensors():
    logits = torch.randn(5, 4)
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        cuda_routing.router_forward(logits, 2)
    with pytest.raises(ValueError, match="probs must be a CUDA tensor"):
        cuda_routing.router_backward(logits, torch.zeros(5, 2, dtype=torch.int32), torch.rand(5, 2), None)
    with pytest.raises(TypeError, match="logits must have dtype"):
        cuda_routing.router_forward(torch.randint(0, 3, (5, 4)), 2)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        cuda_routing.router_forward(torch.randn(2, 5, 4), 2)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        cuda_routing.router_forward([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match="probs must have dtype"):
        cuda_routing.router_backward(torch.randn(5, 4, dtype=torch.float16), None, None, None)


def test_cuda_router_wrapper_validation(cuda_glue_device):
    dev = cuda_glue_device
    logits = torch.randn(6, 5, device=dev)
    with pytest.raises(ValueError, match="allow_mask must have shape"):
        cuda_routing.router_forward(logits, 2, allow_mask=torch.ones(6, 4, dtype=torch.bool, device=dev))
    with pytest.raises(TypeError, match="allow_mask must have dtype"):
        cuda_routing.router_forward(logits, 2, allow_mask=torch.ones(5, device=dev))
    with pytest.raises(ValueError, match="expert_bias must have shape"):
        cuda_routing.router_forward(logits, 2, expert_bias=torch.zeros(4, device=dev))
    with pytest.raises(ValueError, match="logits must be contiguous"):
        cuda_routing.router_forward(torch.randn(5, 6, device=dev).t(), 2)
    with pytest.raises(ValueError, match="top_k=6 is larger"):
        cuda_routing.router_forward(logits, 6)
    with pytest.raises(ValueError, match="logits must have 1 <= E <= 256"):
        cuda_routing.router_forward(torch.randn(2, 300, device=dev), 2)


def test_cuda_route_custom_ops_opcheck(emulated_cuda, seed):
    """torch.library.opcheck: schemas and fake (meta) implementations of flexmoe_cuda::route /
    route_bwd match the real ops (run through the emulated _C)."""
    T, E, K = 9, 6, 2
    logits = torch.randn(T, E)
    mask = make_mask("token", T, E, K, device="cpu")
    ops = torch.ops.flexmoe_cuda
    w, z, ids, counts, offsets, sp, inv, probs = ops.route(logits, torch.randn(E), mask, K, True)
    for op, args in [
        (ops.route, (logits, torch.randn(E), mask, K, True)),
        (ops.route, (logits.bfloat16(), None, None, K, False)),
        (ops.route_bwd, (probs, ids, w, torch.randn(T, K), torch.randn(T, E), mask, True)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _distinct_logits(T: int, E: int, dtype, device="cuda") -> torch.Tensor:
    """(T, E) logits with pairwise-distinct values per row, exactly representable in ``dtype``
    (integers times a power of two), so top-k has no ties in any dtype."""
    perm = torch.argsort(torch.rand(T, E, device=device), dim=1).float()
    scale = 1.0 / 16 if E > 32 else 0.5
    z = (perm - E / 2) * scale
    return z.to(dtype)


def _raw_route(logits, K, mask, bias, renorm):
    """Call _C.router_forward directly on NaN/INT_MAX-poisoned outputs and a garbage workspace."""
    C = cuda_ext.extension()
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


CUDA_ROUTER_SHAPES = [(1, 4, 2), (5, 7, 3), (123, 8, 8), (77, 64, 6), (33, 256, 8), (300, 3, 1), (1000, 7, 2),
                      (129, 40, 5), (2, 128, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("T,E,K", CUDA_ROUTER_SHAPES)
@pytest.mark.parametrize("mask_kind", [None, "global", "token"])
def test_cuda_router_forward_matches_reference(seed, dtype, T, E, K, mask_kind):
    logits = _distinct_logits(T, E, dtype)
    mask = make_mask(mask_kind, T, E, K, device="cuda")
    bias = torch.randn(E, device="cuda") if (T + E) % 2 else None
    renorm = (T + K) % 2 == 0
    got = _raw_route(logits, K, mask, bias, renorm)
    ref = fk.route(logits, K, allow_mask=mask, expert_bias=bias, norm_topk_prob=renorm)
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


@pytest.mark.gpu
def test_cuda_router_random_logits_and_determinism(seed):
    T, E, K = 4099, 16, 4  # several router blocks, an odd last block
    logits = torch.randn(T, E, device="cuda")
    a = _raw_route(logits, K, None, None, False)
    b = _raw_route(logits, K, None, None, False)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref = fk.route(logits, K)
    assert torch.equal(a["sorted"], ref.sorted_pairs_P)
    assert int(a["counts"].sum()) == T * K
    assert torch.equal(a["sorted"][a["inv"].long()], torch.arange(T * K, device="cuda", dtype=torch.int32))


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("T,E,K", [(1, 4, 2), (37, 7, 3), (64, 8, 8), (50, 64, 6)])
@pytest.mark.parametrize("renorm", [False, True])
def test_cuda_router_backward_matches_autograd(seed, cuda_glue_device, dtype, T, E, K, renorm):
    """CudaRouteFunction (route / route_bwd ops) against autograd through the reference route:
    the logits gradient in the logits' dtype, the bias gradient where bias <= 0 (the clamp's
    boundary included), exact zeros where disallowed. CPU tier: the glue over the emulated _C."""
    dev = cuda_glue_device
    mask = make_mask("token", T, E, K, device=dev)
    logits = _distinct_logits(T, E, dtype, device=dev).requires_grad_()
    bias = torch.randn(E, device=dev)
    bias[0] = 0.0  # the clamp's boundary
    bias.requires_grad_()
    g_w = torch.randn(T, K, device=dev)

    def loss_of(w, z):
        return (w * g_w).sum() + 0.1 * fk.router_z_loss(z)

    ref = fk.route(logits, K, allow_mask=mask, expert_bias=bias, norm_topk_prob=renorm)
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


# --------------------------------------------------------------------------- NaN bias (issue 12 item 3)
def _nan_bias_case(T=9, E=6, K=2, device=DEVICE):
    logits = _randn_distinct(T, E).to(device)
    mask = torch.ones(T, E, dtype=torch.bool, device=device)
    mask[::3, 2] = False  # every third token opted out of expert 2
    bias = -torch.rand(E, device=device)
    bias[2] = float("nan")
    return logits, mask, bias


def _check_nan_bias_plan(ids, w, mask, E):
    """Ids always in range and allowed; tokens allowing the NaN-bias expert get NaN weights,
    the others finite ones."""
    ids, w, mask = ids.long().cpu(), w.cpu(), mask.cpu()
    assert bool(((ids >= 0) & (ids < E)).all()), ids
    assert bool(mask.gather(1, ids).all())
    allows = mask[:, 2]
    assert torch.isnan(w[allows]).all() and torch.isfinite(w[~allows]).all()


def test_nan_bias_reference_router():
    logits, mask, bias = _nan_bias_case(device="cpu")
    plan = fk.route(logits, 2, allow_mask=mask, expert_bias=bias)
    _check_nan_bias_plan(plan.topk_ids_TK, plan.topk_weights_TK, mask, 6)


@needs_triton
def test_nan_bias_triton_router_propagates():
    """Before: the kernel's tl.minimum(b, 0) read the NaN as 0 (finite weights)."""
    logits, mask, bias = _nan_bias_case()
    plan = tr.triton_route(logits, 2, allow_mask=mask, expert_bias=bias, block_m=4)
    _check_nan_bias_plan(plan.topk_ids_TK, plan.topk_weights_TK, mask, 6)
    ref = fk.route(logits, 2, allow_mask=mask, expert_bias=bias)
    keep = ~mask[:, 2]
    assert torch.equal(plan.topk_ids_TK[keep], ref.topk_ids_TK[keep])


@pytest.mark.gpu
def test_nan_bias_cuda_router_propagates():
    """csrc/routing.cu: fminf(b, 0) read the NaN as 0, and NaN probabilities could leave no
    candidate (an out-of-range id); now NaN propagates and ids stay allowed and in range."""
    logits, mask, bias = _nan_bias_case(device="cuda")
    got = _raw_route(logits, 2, mask, bias, False)
    _check_nan_bias_plan(got["ids"], got["w"], mask, 6)
    assert int(got["counts"].sum()) == 9 * 2
