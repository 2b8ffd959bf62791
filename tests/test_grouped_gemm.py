"""The experts op: grouped SwiGLU GEMMs, forward and backward.

* reference (``ops/reference/experts.py``): ``grouped_swiglu`` against the readable per-token
  float64 reference (helpers.reference_experts), ``experts_per_expert``, zero-token /
  opted-out / frozen experts, errors;
* Triton (``ops/triton/grouped_gemm.py``): the GEMMs alone on a Triton routing plan against
  the reference, frozen-expert dW, the dW kernel alone (multi-step reductions, empty and
  frozen experts, both gather sides), plan errors;
* Triton launch configs (``ops/triton/configs.py``, tables in ``ops/triton/tables/``);
* the "cuda" backend's expert stage (``ops/cuda/experts.py``): which GEMM path a problem takes
  (torch's ``grouped_mm`` or the per-expert loop) and both paths against a float64 reference.

The sm_90 compile tier of the GEMM kernels is in test_compile_sm90.py; the whole layer
(routing + GEMMs + autograd) in test_layer.py.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_matches_reference, make_problem, record_launches, reference_experts, tol

import flexmoe_kernels as fk
from flexmoe_kernels.ops.cuda import experts as cuda_experts
from flexmoe_kernels.ops.reference.experts import experts_per_expert
from flexmoe_kernels.ops.triton import configs as tc
from flexmoe_kernels.ops.triton import grouped_gemm as gg
from flexmoe_kernels.ops.triton import launch
from flexmoe_kernels.ops.triton import routing as tr

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

TRITON_OK, TRITON_WHY = launch.is_available(DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")


def make(T, D, Fw, E, dtype=torch.float32):
    return (
        torch.randn(T, D, dtype=dtype),
        torch.randn(E, 2 * Fw, D, dtype=dtype) / D**0.5,
        torch.randn(E, D, Fw, dtype=dtype) / Fw**0.5,
    )


# =========================================================================== reference experts
@pytest.mark.parametrize("T,D,Fw,E,K", [(1, 8, 6, 3, 2), (23, 16, 12, 5, 2), (40, 12, 20, 7, 5), (9, 10, 14, 4, 4)])
def test_grouped_swiglu_matches_loop(seed, T, D, Fw, E, K):
    x, gu, dn = make(T, D, Fw, E)
    plan = fk.route(torch.randn(T, E), K)
    out = fk.grouped_swiglu(x, plan, gu, dn)
    ref = reference_experts(x, plan.topk_ids_TK, plan.topk_weights_TK, gu, dn)
    assert_matches_reference(out, ref, torch.float32, "grouped_swiglu")


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


def test_experts_per_expert_rows_by_counts(seed):
    """Each expert's rows (from counts) go through that expert only; zero-count experts are
    skipped (NaN weights never read, dW exactly 0); frozen experts get no dW, dX flows."""
    D, Fw, E = 9, 7, 5
    counts = torch.tensor([3, 0, 4, 1, 0], dtype=torch.int32)
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    _, gu, dn = make(1, D, Fw, E)
    gu[1] = float("nan"); dn[4] = float("nan")
    gu.requires_grad_(); dn.requires_grad_()
    trainable = torch.tensor([True, True, False, True, True])
    y = experts_per_expert(x, gu, dn, counts, trainable)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    start = 0
    for e, n in enumerate(counts.tolist()):
        rows = x.detach()[start:start + n]
        want = F.linear(F.silu(F.linear(rows, gu.detach()[e, :Fw])) * F.linear(rows, gu.detach()[e, Fw:]),
                        dn.detach()[e])
        torch.testing.assert_close(y.detach()[start:start + n], want, **tol(torch.float32))
        start += n
    (y * torch.randn_like(y)).sum().backward()
    for e in (1, 2, 4):  # zero rows (1, 4) or frozen (2)
        assert torch.all(gu.grad[e] == 0) and torch.all(dn.grad[e] == 0), e
    assert gu.grad[0].abs().sum() > 0 and x.grad[3:7].abs().sum() > 0  # expert 2's rows still get dX
    empty = experts_per_expert(x[:0], gu, dn, torch.zeros(E, dtype=torch.int32))
    assert empty.shape == (0, D)


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


# =========================================================================== Triton grouped GEMMs
@needs_triton
def test_triton_frozen_experts_dw_kernel_stores_zeros_without_loads(seed):
    """Kernel level: a frozen expert's dW slice is exact zeros even though its operands are NaN."""
    T, D, F_, E, K = 21, 24, 20, 3, 2
    p = make_problem(T, D, F_, E, K, torch.float32)
    plan = tr.triton_route(fk.router_logits(p["x"], p["router_weight"]), K, block_m=16)
    assert int(plan.counts_E[1]) > 0  # the frozen expert has tokens
    gu, dn = p["gate_up"].clone(), p["down"].clone()
    gu[1] = float("nan")
    dn[1] = float("nan")
    dout = torch.randn(T, D, device=DEVICE)
    trainable = torch.tensor([True, False, True], device=DEVICE)
    _, dgu, ddn, _ = gg.grouped_swiglu_backward(dout, p["x"], plan, gu, dn, trainable_experts=trainable,
                                                need_dx=False, need_dweights=False)
    assert bool((dgu[1] == 0).all()) and bool((ddn[1] == 0).all())
    assert bool(torch.isfinite(dgu).all()) and bool(torch.isfinite(ddn).all())
    assert bool((dgu[0] != 0).any()) and bool((ddn[2] != 0).any())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_grouped_gemms_against_reference_plan(seed, dtype):
    """Forward and dweights of the GEMMs alone, on a plan built by the Triton routing, against
    the float64 reference driven by the same routing (ids / weights from the reference route);
    16-bit: against torch's own error (the reference path run in that dtype)."""
    T, D, F_, E, K = 29, 40, 36, 5, 2
    p = make_problem(T, D, F_, E, K, dtype)
    logits = fk.router_logits(p["x"], p["router_weight"])
    plan = tr.triton_route(logits, K, block_m=16)
    ref_plan = fk.route(logits, K)
    w = ref_plan.topk_weights_TK.detach().requires_grad_()
    ref_plan.topk_weights_TK = w
    ref_low = fk.grouped_swiglu(p["x"], ref_plan, p["gate_up"], p["down"])  # torch in dtype
    w64 = w.detach().double().requires_grad_()
    ref64 = reference_experts(p["x"], ref_plan.topk_ids_TK, w64, p["gate_up"], p["down"])
    for det in (True, False):
        out = gg.grouped_swiglu_forward(p["x"], plan, p["gate_up"], p["down"], deterministic=det)
        assert_matches_reference(out, ref64, dtype, f"out (deterministic={det})", ref_low)
    dout = torch.randn(T, D, device=DEVICE).to(dtype)
    (dw_low,) = torch.autograd.grad(ref_low, w, dout)
    (dw64,) = torch.autograd.grad(ref64, w64, dout.double())
    dx, dgu, ddn, dw = gg.grouped_swiglu_backward(
        dout, p["x"], plan, p["gate_up"], p["down"], need_dx=False, need_dgate_up=False, need_ddown=False
    )
    assert dx is None and dgu is None and ddn is None
    assert dw.dtype == torch.float32 and dw.shape == (T, K)
    # the reference rounds y to dtype before the dot with dOut: the 16-bit rule, not the table
    assert_matches_reference(dw, dw64, dtype, "dweights", dw_low.float())
    assert float(ref64.detach().abs().max()) > 0.1


def _dw_reference64(a, a_gather, b, b_gather, plan, trainable):
    """float64 ``dW[e] = sum over e's real slots of A[row_a]^T B[row_b]`` (zeros if frozen)."""
    pairs = plan.schedule.padded_pairs_Q.long().cpu()
    poff = plan.schedule.padded_offsets_E1.long().cpu().tolist()
    out = torch.zeros(plan.num_experts, a.shape[1], b.shape[1], dtype=torch.float64)
    for e in range(plan.num_experts):
        slots = torch.arange(poff[e], poff[e + 1])
        slots = slots[pairs[slots] < plan.num_pairs]
        if not bool(trainable[e]) or len(slots) == 0:
            continue
        tok = pairs[slots] // plan.top_k
        ra, rb = (tok if a_gather else slots), (tok if b_gather else slots)
        out[e] = a.double().cpu()[ra].T @ b.double().cpu()[rb]
    return out


@needs_triton
@pytest.mark.parametrize("a_gather", [False, True])
@pytest.mark.parametrize("block_k,tma,host", [(16, False, False), (32, False, False), (16, True, True),
                                              (16, True, False), (32, True, True)])
def test_triton_grouped_dw_multi_step_frozen_and_empty_experts(seed, monkeypatch, a_gather, block_k, tma, host):
    """The dW kernel alone (its pair ids are prefetched one k-step ahead): experts whose slot
    range takes several k-steps (and, at BLOCK_K 32, a partial last one), an expert with no
    pairs (exact zeros), a frozen expert whose slot-ordered rows are NaN (exact zeros, nothing
    loaded), NaN in every unused slot row of the slot-ordered operand (never used) and, with
    pointer loads, in its padding rows too (masked at the load).
    ``tma``: the slot-ordered operand through a TMA descriptor (as A, or as B by computing
    dW^T), not masked in registers (that serialised the wgmma): its padding rows are read and
    must be finite (0, as the dh kernel writes them; the other operand is masked there);
    ``host`` (``host_desc``): a host-side descriptor over all rows, used only where BLOCK_K
    divides the schedule's block_m (16), so no k-step reaches past an expert's end; at BLOCK_K
    32 the device-side one, whose row extent is the expert's end, so the k-step that covers
    the next (frozen, NaN) expert's rows reads zeros."""
    T, E, K, R, C = 45, 5, 2, 24, 20
    logits = torch.randn(T, E, device=DEVICE)
    logits[:, 0] += 4.0  # expert 0 gets (nearly) every token: 3 tiles of 16 slots
    logits[:, 3] = -1e4  # expert 3 gets no pairs
    plan = tr.triton_route(logits, K, block_m=16)
    counts = plan.counts_E.cpu()
    assert int(counts[3]) == 0 and int(counts.max()) > 32  # empty expert; >= 3 k-steps of 16
    trainable = torch.tensor([True, False, True, True, True])
    assert int(counts[1]) > 0  # the frozen expert has pairs
    pairs = plan.schedule.padded_pairs_Q.long().cpu()
    real = pairs < plan.num_pairs
    poff = plan.schedule.padded_offsets_E1.long().cpu()
    gathered = torch.randn(T, R if a_gather else C, device=DEVICE)
    slotted = torch.full((pairs.numel(), C if a_gather else R), float("nan"))
    slotted[real] = torch.randn(int(real.sum()), slotted.shape[1])
    if tma:  # padding rows inside the experts' ranges: finite (0), as the dh kernel writes them
        slotted[:int(poff[-1])][~real[:int(poff[-1])]] = 0.0
    slotted[poff[1]:poff[2]] = float("nan")  # the frozen expert's rows
    slotted = slotted.to(DEVICE)
    a, b = (gathered, slotted) if a_gather else (slotted, gathered)
    cfg = tc.GemmConfig(16, 16, block_k, 4, 4, 1, tma=tma, host_desc=host)
    launches = record_launches(monkeypatch, ["_grouped_dw_kernel"])
    got = gg.grouped_dw(a, a_gather, b, not a_gather, plan, torch.float32, cfg, trainable.to(DEVICE))
    assert [(kw["A_TMA"], kw["HOST_DESC"]) for _, _, kw in launches] == [(tma, tma and host and block_k == 16)]
    ref = _dw_reference64(a, a_gather, b, not a_gather, plan, trainable)
    assert bool((got[1] == 0).all()) and bool((got[3] == 0).all())
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_gemm_plan_errors(seed):
    p = make_problem(5, 24, 20, 3, 2, torch.float32)
    plan = tr.triton_route(fk.router_logits(p["x"], p["router_weight"]), 2, block_m=16)
    with pytest.raises(TypeError, match="plan must be a RoutingPlan with a tile schedule"):
        gg.grouped_swiglu_forward(p["x"], fk.route(p["x"] @ p["router_weight"].T, 2), p["gate_up"], p["down"])
    with pytest.raises(ValueError, match="x has 4 rows"):
        gg.grouped_swiglu_forward(p["x"][:4], plan, p["gate_up"], p["down"])
    small = tr.triton_route(fk.router_logits(p["x"], p["router_weight"]), 2, block_m=8)
    with pytest.raises(ValueError, match="block_m must be >= 16"):
        gg.grouped_swiglu_forward(p["x"], small, p["gate_up"], p["down"])
    with pytest.raises(ValueError, match="routing plan has 3"):
        gg.grouped_swiglu_forward(p["x"], plan, p["gate_up"][:2], p["down"][:2])
    with pytest.raises(ValueError, match="dout must have shape"):
        gg.grouped_swiglu_backward(p["x"][:, :5], p["x"], plan, p["gate_up"], p["down"])


# =========================================================================== Triton configs
def test_config_env_string_parsing():
    got = tc.parse_config_string("BLOCK_M=64, BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=8,num_stages=4,dw.BLOCK_N=32")
    assert got == {"*": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
                   "dw": {"BLOCK_N": 32}}
    for bad, msg in [("BLOCK_X=3", "unknown field"), ("foo.BLOCK_M=16", "unknown kind"), ("BLOCK_M", "cannot parse")]:
        with pytest.raises(ValueError, match=msg):
            tc.parse_config_string(bad)


def test_config_env_pins_every_kind(monkeypatch):
    monkeypatch.setenv(tc.ENV_VAR, "BLOCK_M=64,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=8,num_stages=4,dw.BLOCK_N=32")
    c = tc.get_configs(100, 64, 64, 4, 2, torch.bfloat16, "cpu")
    assert c.block_m == 64 and c.source.endswith(tc.ENV_VAR)
    for kind in tc.KINDS:
        g = getattr(c, kind)
        assert (g.BLOCK_M, g.BLOCK_K, g.GROUP_M, g.num_warps, g.num_stages) == (64, 64, 8, 8, 4)
        assert g.BLOCK_N == (32 if kind == "dw" else 128)
    monkeypatch.setenv(tc.ENV_VAR, "BLOCK_N=24")
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        tc.get_configs(100, 64, 64, 4, 2, torch.bfloat16, "cpu")
    monkeypatch.setenv(tc.ENV_VAR, "up.BLOCK_M=32,down.BLOCK_M=64")
    with pytest.raises(ValueError, match="share BLOCK_M"):
        tc.get_configs(100, 64, 64, 4, 2, torch.bfloat16, "cpu")
    monkeypatch.setenv(tc.ENV_VAR, "up.BLOCK_M=32")
    assert tc.get_configs(100, 64, 64, 4, 2, torch.bfloat16, "cpu").down.BLOCK_M == 32


def test_heuristics_cover_decode_and_training_sizes():
    for T in (1, 7, 64, 512, 4096, 16384, 32768):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            c = tc.heuristic_configs(T, 4096, 11008, 7, 5, dtype)
            assert c.block_m in (16, 32, 64, 128)
    assert tc.heuristic_configs(1, 4096, 11008, 7, 5, torch.bfloat16).block_m == 16
    assert tc.heuristic_configs(16384, 4096, 11008, 7, 5, torch.bfloat16).block_m == 128


def test_shipped_h100_table_is_labelled_and_valid():
    assert tc.config_dir().parts[-3:] == ("ops", "triton", "tables")
    table = tc.load_table("NVIDIA H100 80GB HBM3")
    assert table is not None
    assert table["status"] == "untuned: heuristic defaults, not measured"
    assert tc.load_table("NVIDIA H100 PCIe") is table  # substring match
    assert tc.load_table("Some Other GPU") is None
    small_t = large_t = False
    for key, by_t in table["shapes"].items():
        for t_str, entry in by_t.items():
            c = tc._from_entry(entry, key)  # every entry builds valid configs
            small_t |= int(t_str) <= 64
            large_t |= int(t_str) >= 8192
            assert c.block_m in (16, 32, 64, 128)
    assert small_t and large_t
    with open(table["_path"]) as f:
        assert json.load(f)["status"].startswith("untuned")


def test_table_lookup_nearest_T(tmp_path):
    e16 = {k: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4) for k in tc.KINDS}
    e128 = {k: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3) for k in tc.KINDS}
    key = tc.shape_key(64, 96, 4, 2, torch.bfloat16)
    data = {"status": "test", "devices": ["Fake GPU"], "shapes": {key: {"8": e16, "4096": e128}}}
    (tmp_path / "triton_moe_fake.json").write_text(json.dumps(data))
    t = tc.load_table("Fake GPU", tmp_path)
    assert tc.lookup_table(t, 1, 64, 96, 4, 2, torch.bfloat16).block_m == 16
    assert tc.lookup_table(t, 2000, 64, 96, 4, 2, torch.bfloat16).block_m == 16
    assert tc.lookup_table(t, 2100, 64, 96, 4, 2, torch.bfloat16).block_m == 128
    assert tc.lookup_table(t, 99999, 64, 96, 4, 2, torch.bfloat16).block_m == 128
    assert tc.lookup_table(t, 8, 64, 96, 4, 3, torch.bfloat16) is None  # other shape


def test_config_env_pins_variant_flags(monkeypatch):
    """The variant flags are fields of every kind and take 0/1, true/false or on/off."""
    got = tc.parse_config_string("tma=0,up.persistent=on,down.persistent=TRUE,dw.tma=off,num_stages=4")
    assert got == {"*": {"tma": 0, "num_stages": 4}, "up": {"persistent": 1}, "down": {"persistent": 1},
                   "dw": {"tma": 0}}
    with pytest.raises(ValueError, match="num_warps takes an integer"):
        tc.parse_config_string("num_warps=on")
    with pytest.raises(ValueError, match="tma must be a bool or 0/1"):
        monkeypatch.setenv(tc.ENV_VAR, "tma=2")
        tc.get_configs(100, 64, 64, 4, 2, torch.bfloat16, "cpu")
    monkeypatch.setenv(tc.ENV_VAR, "tma=1,persistent=0,bwd_dx.persistent=1")
    c = tc.get_configs(100, 64, 64, 4, 2, torch.bfloat16, "cpu")
    assert all(getattr(c, k).tma is True for k in tc.KINDS)
    assert [k for k in tc.KINDS if getattr(c, k).persistent] == ["bwd_dx"]


def test_get_configs_for_a_named_device_without_a_gpu(monkeypatch):
    """``device_name=`` chooses as on that CUDA device (no GPU queried): the H100 table for the
    two target shapes, with TMA weights and 4 stages for the 128-row forward / dX GEMMs (and
    TMA for dW); the heuristic (tma on, persistent off) for an unknown device."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("a GPU was queried"))
    for T, shape in ((32768, (2048, 768, 128, 8)), (16384, (4096, 11008, 7, 5))):
        c = tc.get_configs(T, *shape, torch.bfloat16, "cuda", device_name="NVIDIA H100 80GB HBM3")
        assert "triton_moe_NVIDIA_H100.json" in c.source and "[m=" in c.source, c.source
        for kind in ("up", "down", "bwd_dx", "dw"):
            g = getattr(c, kind)
            assert (g.BLOCK_M, g.tma, g.num_stages, g.persistent) == (128, True, 4, False), (kind, g)
    h = tc.get_configs(4096, 64, 96, 4, 2, torch.bfloat16, "cuda", device_name="Some Other GPU")
    assert h.source == "heuristic" and h.up.tma and h.dw.tma and not h.up.persistent


def test_table_lookup_tokens_per_expert_bucket(tmp_path):
    """Tables with ``"key": "tokens_per_expert"`` are keyed by ceil(T*K/E) rounded up to a power
    of two; the nearest bucket in log2 wins (ties: the smaller); old T-keyed tables still load
    (test_table_lookup_nearest_T)."""
    assert [tc.tokens_per_expert_bucket(T, 2, 4) for T in (1, 2, 3, 8, 9, 4096)] == [1, 1, 2, 4, 8, 2048]
    entry = lambda bm, **kw: {k: dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, **kw) for k in tc.KINDS}  # noqa: E731
    key = tc.shape_key(64, 96, 4, 2, torch.bfloat16)
    data = {"status": "test", "devices": ["Fake GPU"], "key": "tokens_per_expert",
            "shapes": {key: {"16": entry(16), "64": entry(32, tma=1), "1024": entry(128, persistent=1)}}}
    (tmp_path / "triton_moe_fake.json").write_text(json.dumps(data))
    t = tc.load_table("Fake GPU", tmp_path)
    look = lambda T: tc.lookup_table(t, T, 64, 96, 4, 2, torch.bfloat16)  # noqa: E731 - m = ceil(T/2)
    assert look(1).block_m == 16 and look(32).block_m == 16  # m 1, 16
    assert look(33).block_m == 16  # m 17 -> bucket 32: between 16 and 64 in log2, the smaller
    got = look(100)  # m 50 -> 64
    assert got.block_m == 32 and got.up.tma and not got.up.persistent and got.source.endswith("[m=64]")
    assert look(1000).block_m == 128 and look(10**6).dw.persistent  # m 512 -> 1024 (nearest); beyond


# =========================================================================== CUDA expert stage
# ops/cuda/experts.py: no GEMM kernel of ours: torch's grouped_mm when usable (bf16, D and F
# multiples of 8, a probe passed once per device; compute capability >= 9.0 on CUDA; not
# FLEXMOE_CUDA_GROUPED_MM=0), else the reference's per-expert loop. No _C involved, so the
# stage runs on CPU tensors as it is.
@pytest.mark.parametrize("dtype,D,Fw,env,path", [
    (torch.bfloat16, 16, 8, None, "grouped_mm"),
    (torch.bfloat16, 24, 20, None, "per_expert"),  # F not a multiple of 8
    (torch.bfloat16, 20, 16, None, "per_expert"),  # D not a multiple of 8
    (torch.bfloat16, 16, 8, "0", "per_expert"),  # disabled by FLEXMOE_CUDA_GROUPED_MM=0
    (torch.float32, 16, 8, None, "per_expert"),
    (torch.float16, 16, 8, None, "per_expert"),
])
def test_cuda_expert_path_choice_on_cpu(monkeypatch, dtype, D, Fw, env, path):
    monkeypatch.setattr(cuda_experts, "_grouped_mm_ok", {})  # probe afresh
    if env is None:
        monkeypatch.delenv("FLEXMOE_CUDA_GROUPED_MM", raising=False)
    else:
        monkeypatch.setenv("FLEXMOE_CUDA_GROUPED_MM", env)
    assert cuda_experts.grouped_gemm_path("cpu", dtype, D, Fw) == path


def _rows_reference64(x_PD, gu, dn, counts, trainable):
    """Float64 ``down_e @ (silu(gate_e @ x_i) * (up_e @ x_i))`` row by row (differentiable;
    frozen experts detached; experts without rows never read)."""
    Fw = dn.shape[2]
    x64, gu64, dn64 = x_PD.double(), gu.double(), dn.double()
    rows, e_of_row = [], [e for e, n in enumerate(counts.tolist()) for _ in range(n)]
    for i, e in enumerate(e_of_row):
        W1, W2 = gu64[e], dn64[e]
        if not bool(trainable[e]):
            W1, W2 = W1.detach(), W2.detach()
        rows.append(W2 @ (F.silu(W1[:Fw] @ x64[i]) * (W1[Fw:] @ x64[i])))
    return torch.stack(rows)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("Fw", [16, 20])  # bf16: the grouped_mm path / the per-expert fallback
def test_cuda_experts_forward_matches_reference(seed, monkeypatch, device, Fw):
    """experts_forward on expert-grouped rows in bf16 against a float64 row-by-row reference
    (the one pass rule, torch's own bf16 error = the per-expert loop in bf16), output and
    every gradient; experts without rows hold NaN weights (never read, dW exactly 0), a frozen
    expert with rows gets dW exactly 0."""
    monkeypatch.setattr(cuda_experts, "_grouped_mm_ok", {})
    monkeypatch.delenv("FLEXMOE_CUDA_GROUPED_MM", raising=False)
    T, D, E, K, dtype = 29, 24, 6, 2, torch.bfloat16
    p = make_problem(T, D, Fw, E, K, dtype, mask="global", opted_out=(2,), device=device)
    plan = fk.route(fk.router_logits(p["x"], p["router_weight"]).float(), K, allow_mask=p["allow_mask"])
    counts = plan.counts_E
    empty = (counts == 0).nonzero().flatten().tolist()
    assert 2 in empty
    frozen = int(counts.argmax())
    trainable = torch.ones(E, dtype=torch.bool, device=device)
    trainable[frozen] = False
    gu, dn = p["gate_up"].clone(), p["down"].clone()
    gu[empty] = float("nan")
    dn[empty] = float("nan")
    x_PD = p["x"][plan.sorted_pairs_P.long() // K]
    capable = device == "cpu" or torch.cuda.get_device_capability() >= (9, 0)
    path = "grouped_mm" if Fw % 8 == 0 and capable else "per_expert"
    assert cuda_experts.grouped_gemm_path(device, dtype, D, Fw) == path

    def run(fn, *args):
        leaves = [t.detach().clone().requires_grad_() for t in (x_PD, gu, dn)]
        y = fn(*leaves, *args)
        y.backward(dy.to(y.dtype))
        return y.detach(), [t.grad for t in leaves]

    dy = torch.randn(T * K, D, device=device)
    got = run(cuda_experts.experts_forward, counts, plan.offsets_E1, trainable)
    low = run(experts_per_expert, counts, trainable)  # torch's own bf16 result
    ref = run(_rows_reference64, counts, trainable)
    assert got[0].dtype == dtype
    assert_matches_reference(got[0], ref[0], dtype, f"{path}: y", low[0])
    for name, g, r, lo in zip(("dx", "dgate_up", "ddown"), got[1], ref[1], low[1]):
        assert bool(torch.isfinite(g).all()), f"{path}: {name} not finite"
        keep = [e for e in range(E) if e not in empty and e != frozen] if name != "dx" else slice(None)
        assert_matches_reference(g[keep], r[keep].nan_to_num(), dtype, f"{path}: {name}", lo[keep])
        if name != "dx":
            for e in empty + [frozen]:
                assert bool((g[e] == 0).all()), f"{path}: {name} of expert {e} must be exactly 0"
