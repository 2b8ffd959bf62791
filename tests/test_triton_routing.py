"""Triton routing kernels vs the PyTorch reference (``flexmoe_kernels.route``).

CPU tier: the kernels run under Triton's interpreter on CPU tensors (small shapes). Where CUDA
is present the same tests run compiled on the GPU, plus the ``gpu`` tier (bf16, large shapes,
CUDA-graph capture and replay with a changed mask).
"""
import os

import torch

if not torch.cuda.is_available():  # before any Triton kernel is created
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import flexmoe_kernels as fk  # noqa: E402
from conftest import poison_, tol  # noqa: E402
from flexmoe_kernels.ops import triton_routing as tr  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts NaN / INT_MAX, so unwritten elements fail."""
    allocated = []

    def alloc(shape, dtype, device):
        t = poison_(torch.empty(shape, dtype=dtype, device=device))
        allocated.append(t)
        return t

    monkeypatch.setattr(tr, "_alloc", alloc)
    return allocated


def _randn_distinct(T, E, dtype=torch.float32, scale=1.0):
    """(T, E) random logits in ``dtype`` with no exact ties inside a row (so top-k ids are
    unambiguous for the reference's ``torch.topk``)."""
    x = (torch.randn(T, E) * scale).to(dtype)
    for _ in range(100):
        dup = torch.tensor([len(set(r.tolist())) < E for r in x.float()])
        if not dup.any():
            return x.to(DEVICE)
        x[dup] = (torch.randn(int(dup.sum()), E) * scale).to(dtype)
    raise RuntimeError("could not draw tie-free logits")


def _mask(kind, T, E, K):
    """None, a global (E,) mask with up to 2 experts off (never fewer than K allowed), or a
    per-token (T, E) mask with ~40% off, topped up so each row allows >= K experts."""
    if kind is None:
        return None
    if kind == "global":
        keep = torch.randperm(E)[: max(K, E - 2)]
        m = torch.zeros(E, dtype=torch.bool)
        m[keep] = True
        return m.to(DEVICE)
    m = torch.rand(T, E) < 0.6
    for t in range(T):  # top up rows that allow fewer than K experts
        off = (~m[t]).nonzero().flatten()
        need = K - int(m[t].sum())
        if need > 0:
            m[t, off[torch.randperm(len(off))[:need]]] = True
    return m.to(DEVICE)


def _schedule_invariants(plan, K, E, block_m, allow=None):
    """Invariants of the padded schedule, checked independently of the reference."""
    T = plan.topk_ids_TK.shape[0]
    P = T * K
    q_max, nt_max = tr.schedule_sizes(T, K, E, block_m)
    padded = plan.padded_pairs_Q.cpu().long()
    poff = plan.padded_offsets_E1.cpu().long()
    counts = plan.counts_E.cpu().long()
    tiles = plan.tile_expert_E_tiles.cpu().long()
    ids = plan.topk_ids_TK.cpu().long().flatten()
    n_tiles = int(plan.num_tiles.cpu())
    assert padded.shape == (q_max,) and tiles.shape == (nt_max,) and plan.num_tiles.shape == (1,)
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
    assert plan.topk_ids_TK.dtype == i32 and plan.topk_weights_TK.dtype == torch.float32
    assert plan.block_m == block_m
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
    for name in tr.TileSchedule._fields:
        torch.testing.assert_close(getattr(plan, name), getattr(sched, name), atol=0, rtol=0, msg=name)
    _schedule_invariants(plan, K, E, block_m, allow)
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


@pytest.mark.parametrize("T,E,K,block_m,mask,bias,norm", CASES)
def test_route_matches_reference(seed, config, T, E, K, block_m, mask, bias, norm):
    logits = _randn_distinct(T, E, scale=2.0)
    allow = _mask(mask, T, E, K)
    b = torch.randn(E, device=DEVICE) if bias else None
    plan = tr.triton_route(logits, K, allow_mask=allow, expert_bias=b, norm_topk_prob=norm, block_m=block_m)
    _check_plan(plan, logits, K, allow=allow, bias=b, norm=norm, block_m=block_m)


def test_fp16_logits_and_strided_input(seed):
    T, E, K = 41, 7, 3
    logits16 = _randn_distinct(E, T, torch.float16).t()  # (T, E) view, non-contiguous
    assert not logits16.is_contiguous()
    allow = _mask("token", T, E, K)
    plan = tr.triton_route(logits16, K, allow_mask=allow, block_m=8)
    _check_plan(plan, logits16, K, allow=allow, block_m=8)


def test_zero_token_experts_and_all_to_one_expert(seed):
    # Expert 2 dominates every token with K=1: all pairs go to one expert, the others own no tiles.
    T, E, K, bm = 29, 5, 1, 8
    logits = _randn_distinct(T, E)
    logits[:, 2] += 50.0
    plan = tr.triton_route(logits, K, block_m=bm)
    _check_plan(plan, logits, K, block_m=bm)
    assert plan.counts_E.tolist() == [0, 0, T, 0, 0]
    assert int(plan.num_tiles) == -(-T // bm)
    assert set(plan.tile_expert_E_tiles.tolist()) == {2, -1}


def test_opted_out_experts_get_nothing_even_when_dominant(seed):
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
    for name in ("topk_ids_TK", "topk_weights_TK", "probs_TE", "logits_TE", "padded_pairs_Q"):
        torch.testing.assert_close(getattr(again, name), getattr(plan, name), atol=0, rtol=0, msg=name)
    dz = tr.triton_route_backward(torch.randn(T, K, device=DEVICE), again)
    assert bool(dz.isfinite().all()) and bool((dz[:, ~allow] == 0).all())


def test_underflowed_allowed_probability_never_picks_masked_expert():
    logits = torch.tensor([[0.0, -200.0, 50.0, -300.0], [1.0, 2.0, 3.0, -150.0]], device=DEVICE)
    allow = torch.tensor([True, True, False, True], device=DEVICE)
    plan = tr.triton_route(logits, 3, allow_mask=allow)
    assert plan.topk_ids_TK.tolist() == [[0, 1, 3], [1, 0, 3]]  # by logit; probs underflow to 0
    assert plan.probs_TE[:, 2].tolist() == [0.0, 0.0]


def test_exact_ties_break_to_lower_expert_id(seed, config):
    # Integer logits: many exact ties. Documented order: decreasing logit, then increasing id,
    # i.e. a stable descending sort.
    T, E, K = 47, 8, 4
    logits = torch.randint(-2, 3, (T, E)).float().to(DEVICE)
    allow = _mask("token", T, E, K)
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
    torch.testing.assert_close(plan.padded_pairs_Q, sched.padded_pairs_Q, atol=0, rtol=0)
    _schedule_invariants(plan, K, E, 4)


def test_routing_is_deterministic(seed):
    T, E, K = 67, 9, 4
    logits = _randn_distinct(T, E)
    allow = _mask("token", T, E, K)
    a = tr.triton_route(logits, K, allow_mask=allow, block_m=8)
    b = tr.triton_route(logits, K, allow_mask=allow, block_m=8)
    for name in ("topk_ids_TK", "sorted_pairs_P", "inv_sorted_pairs_P", "padded_pairs_Q", "tile_expert_E_tiles"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_every_output_is_kernel_written(poisoned_outputs):
    """The poisoning fixture really covers every tensor of the plan (so unwritten elements
    would show up as NaN / INT_MAX in the comparisons above)."""
    logits = _randn_distinct(9, 5)
    plan = tr.triton_route(logits, 2, block_m=4)
    ptrs = {t.data_ptr() for t in poisoned_outputs}
    for name in tr.TritonRoutingPlan.__dataclass_fields__:
        v = getattr(plan, name)
        if isinstance(v, torch.Tensor):
            assert v.data_ptr() in ptrs, f"{name} was not allocated through the poisoned hook"
            if v.is_floating_point():
                assert not bool(v.isnan().any()), name
            else:
                assert not bool((v == torch.iinfo(v.dtype).max).any()), name
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
]


@pytest.mark.parametrize("T,E,K,mask,bias,norm,dtype", BWD_CASES)
def test_backward_matches_autograd(seed, T, E, K, mask, bias, norm, dtype):
    logits = _randn_distinct(T, E, dtype, scale=1.5)
    allow = _mask(mask, T, E, K)
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


def test_backward_strided_fp16_dweights(seed, monkeypatch):
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


def test_tile_schedule_reference_by_hand():
    # T=3, K=2, E=3, block_m=2: ids [[2,0],[2,1],[0,2]] -> pairs per expert 0:{1,4} 1:{3} 2:{0,2,5}
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    s = tr.tile_schedule_reference(ids, 3, 2)
    S = 6  # sentinel P
    assert s.padded_pairs_Q.tolist() == [1, 4, 3, S, 0, 2, 5, S, S, S]  # Q_max = roundup(6 + 3, 2)
    assert s.padded_offsets_E1.tolist() == [0, 2, 4, 8]
    assert s.tile_expert_E_tiles.tolist() == [0, 1, 2, 2, -1]
    assert s.num_tiles.tolist() == [4]
    assert tr.schedule_sizes(3, 2, 3, 2) == (10, 5)


def test_routing_config_env(monkeypatch):
    cfg = tr.routing_config(32768, 128, 8, 64)
    assert cfg.block_t * 128 <= 2048
    monkeypatch.setenv("FLEXMOE_TRITON_ROUTING_CONFIG", "block_t=16, num_warps=8")
    cfg = tr.routing_config(100, 8, 2, 64)
    assert (cfg.block_t, cfg.num_warps) == (16, 8)
    for bad, msg in [("block_q=4", "unknown field"), ("block_t=x", "must be an int"), ("block_t=3", "power of two")]:
        monkeypatch.setenv("FLEXMOE_TRITON_ROUTING_CONFIG", bad)
        with pytest.raises(ValueError, match=msg):
            tr.routing_config(100, 8, 2, 64)


def test_is_available():
    ok, why = tr.is_available(DEVICE)
    assert ok, why
    ok, why = tr.is_available("meta")
    assert not ok and "meta" in why


def test_bad_inputs_raise_clear_errors():
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
    with pytest.raises(TypeError, match="plan must be a TritonRoutingPlan"):
        tr.triton_route_backward(torch.randn(4, 2, device=DEVICE), fk.route(logits, 2))


# --------------------------------------------------------------------------- gpu tier


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
    for name in tr.TileSchedule._fields:
        torch.testing.assert_close(getattr(plan, name), getattr(sched, name), atol=0, rtol=0, msg=name)
    _schedule_invariants(plan, K, E, block_m, allow)
    dz = tr.triton_route_backward(g_TK, plan)
    (gx,) = torch.autograd.grad((w * g_TK.float()).sum(), x)
    torch.testing.assert_close(dz, gx, **tol(torch.float32))


def test_bf16_logits_with_ties(seed):
    # bf16 logits tie often; the interpreter only loads and upcasts them (no bf16 arithmetic).
    T, E, K = 45, 9, 3
    logits = (torch.randn(T, E) * 0.5).bfloat16().to(DEVICE)
    allow = _mask("token", T, E, K)
    b = torch.randn(E, device=DEVICE)
    plan = tr.triton_route(logits, K, allow_mask=allow, expert_bias=b, block_m=8)
    _check_against_own_ids(plan, logits, K, allow, b, 8, torch.randn(T, K, device=DEVICE))


def test_zero_tokens():
    logits = torch.randn(0, 5, device=DEVICE)
    plan = tr.triton_route(logits, 2, block_m=4)
    assert plan.topk_ids_TK.shape == (0, 2) and plan.sorted_pairs_P.shape == (0,)
    assert plan.counts_E.tolist() == [0] * 5 and plan.offsets_E1.tolist() == [0] * 6
    assert plan.num_tiles.tolist() == [0] and set(plan.tile_expert_E_tiles.tolist()) == {-1}
    assert set(plan.padded_pairs_Q.tolist()) == {0}  # sentinel P = 0
    assert tr.triton_route_backward(torch.randn(0, 2, device=DEVICE), plan).shape == (0, 5)


def test_index_overflow_is_refused():
    huge = torch.empty(1, 8, device=DEVICE).expand(2**28, 8)  # a view: no memory
    with pytest.raises(ValueError, match="does not fit int32"):
        tr.triton_route(huge, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K,block_m", [(4099, 128, 8, 64), (16384, 7, 5, 128), (33, 7, 5, 16), (5, 128, 8, 16)])
def test_gpu_bf16_large(seed, T, E, K, block_m):
    logits = (torch.randn(T, E, device=DEVICE) * 3).bfloat16()
    allow = _mask("token", T, E, K)
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
    allow = _mask("token", T, E, K)
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
        allow.copy_(_mask("token", T, E, K))
        g.copy_(torch.randn(T, K, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        _check_plan(plan, logits, K, allow=allow, block_m=bm)
        x = logits.clone().requires_grad_(True)
        ref = fk.route(x, K, allow_mask=allow)
        (gx,) = torch.autograd.grad((ref.topk_weights_TK * g).sum(), x)
        torch.testing.assert_close(dz, gx, **tol(torch.float32))


# --------------------------------------------------------------------------- compile tier

# Runs in a fresh interpreter without TRITON_INTERPRET (the interpreter patches triton.language
# in-process): record the launches the launchers make, then compile each kernel for sm_90.
_COMPILE_SCRIPT = r"""
import sys, torch
from triton import compiler
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
from flexmoe_kernels.ops import triton_routing as tr

SIG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
       torch.uint8: "u8"}
kern, calls = tr._kernels(), []

class Rec:
    def __init__(self, fn): self.fn = fn
    def __getitem__(self, grid): return lambda *a, **kw: calls.append((self.fn, a, kw))

class Mod:
    def __getattr__(self, name): return Rec(getattr(kern, name))

tr._kernels = lambda: Mod()
tr._check_device = lambda device: None
n = 0
for T, E, K, dtype, bm in [(32768, 128, 8, torch.bfloat16, 64), (16384, 7, 5, torch.bfloat16, 128),
                           (5, 3, 2, torch.float16, 16), (9, 4, 4, torch.float32, 1),
                           (8, 128, 8, torch.bfloat16, 64)]:
    calls.clear()
    plan = tr.triton_route(torch.empty(T, E, dtype=dtype), K, allow_mask=torch.ones(T, E, dtype=torch.bool),
                           expert_bias=torch.empty(E), norm_topk_prob=True, block_m=bm, validate=False)
    tr.triton_route_backward(torch.empty(T, K, dtype=dtype), plan, norm_topk_prob=True)
    fused = T <= tr.routing_config(T, E, K, bm).block_t
    assert len(calls) == (2 if fused else 4), calls
    for fn, args, kw in calls:
        assert isinstance(fn, JITFunction), type(fn)
        sig = {n: ("*" + SIG[a.dtype]) if isinstance(a, torch.Tensor) else "i32" for n, a in zip(fn.arg_names, args)}
        consts = {k: v for k, v in kw.items() if k != "num_warps"}
        sig.update({k: "constexpr" for k in consts})
        assert set(sig) == set(fn.arg_names), (fn.arg_names, sorted(sig))
        src = compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
        out = compiler.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": kw["num_warps"]})
        assert out.asm.get("cubin"), fn.__name__
        print("compiled", fn.__name__, T, E, K, bm, flush=True)
        n += 1
print("total", n)
"""


def test_kernels_compile_for_sm90():
    """Compile (not run) every kernel exactly as the launchers launch it, for sm_90, with the
    real Triton compiler: catches code the interpreter accepts but the compiler rejects."""
    import subprocess
    import sys

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton without the NVIDIA backend
        pytest.skip(f"triton NVIDIA backend unavailable: {exc}")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLEXMOE_TRITON_ROUTING_CONFIG")}
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=repo, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "total 14" in r.stdout, r.stdout
