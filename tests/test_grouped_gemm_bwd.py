"""The Triton SwiGLU backward paths (issue 13 items 3-4), interpreter tier.

* the dh GEMM with the SwiGLU backward epilogue alone
  (``ops/triton/grouped_gemm_bwd_kernels.py::_dh_swiglu_bwd_kernel``) against a float64
  formula: several F-blocks and k-steps with partial last ones, NaN in every pre-activation
  row it must not read (padding slots, unused tiles), poisoned outputs;
* the up kernel's pre-activation store (``STORE_PRE``) and the interleaved gate/up kernel
  (``_up_interleaved_kernel``) against float64 ``x @ W.T``;
* the whole layer, every variant (recomputed / kept pre-activation, plain / interleaved gate/up)
  in fp32 and fp16 at small odd shapes with a per-token mask, an opted-out expert with NaN
  weights, a zero-token expert and a frozen expert: output and the gradients of x, the router
  weight, the bias, gate_up and down against the float64 reference (16-bit: against torch's
  own error); for float32 inputs the kept and recomputed paths give bitwise the same result
  (a recomputed pre-activation is float32, a kept one is in x's dtype);
* what the layer saves for the backward (the pre-activation only when kept) and the config
  fields (``up.keep_preact``, ``*.interleave``, the ``bwd_dh`` kind).
"""
import pytest
import torch
from helpers import (DEVICE, assert_matches_reference, backend_logits, loss_grads, make_problem, run_layer,
                     record_launches, run_reference64)

import flexmoe_kernels as fk
from flexmoe_kernels.ops.triton import configs as tc
from flexmoe_kernels.ops.triton import grouped_gemm as gg
from flexmoe_kernels.ops.triton import launch
from flexmoe_kernels.ops.triton import routing as tr

pytestmark = [pytest.mark.usefixtures("poisoned_outputs"),
              pytest.mark.skipif(not launch.is_available(DEVICE)[0], reason="triton backend unavailable")]

# Tiny tiles so the tiny shapes still take several F-blocks and k-steps (partial last ones).
SMALL = "BLOCK_N=16,BLOCK_K=16"
VARIANTS = {
    "recompute": "",
    "keep": "up.keep_preact=1",
    "interleave": "up.interleave=1,bwd_up.interleave=1",
    "keep-interleave": "up.keep_preact=1,up.interleave=1",
    "dh-tma-persistent": "bwd_dh.BLOCK_N=32,bwd_dh.tma=1,bwd_dh.persistent=1",
}


def _cfgs(variant: str = "recompute", bm: int = 16, extra: str = "") -> tc.MoEConfigs:
    pins = ",".join(s for s in (SMALL, VARIANTS[variant], extra) if s)
    base = tc.heuristic_configs(1, 1, 1, 1, 1, torch.float32, "cpu")
    return tc._apply_overrides(base, tc.parse_config_string(pins + f",BLOCK_M={bm}"))


def _plan(p, K, **kw):
    return tr.triton_route(fk.router_logits(p["x"], p["router_weight"]), K, block_m=16, **kw)


def _real_slots(plan):
    """(slots, tokens, experts) of the real (non-padding) slots of the used tiles."""
    pairs = plan.schedule.padded_pairs_Q.long().cpu()
    slots = (pairs < plan.num_pairs).nonzero().flatten()
    tok = pairs[slots] // plan.top_k
    exp = plan.topk_ids_TK.long().cpu().flatten()[pairs[slots]]
    return slots, tok, exp, pairs


# =========================================================================== kernels alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("store_hw,pin", [
    (True, ""),  # BLOCK_N 16: 3 F-blocks (last partial), epilogue in one chunk
    (False, ""),
    (True, "bwd_dh.BLOCK_N=128"),  # one F-block, epilogue in 4 chunks of 32 (2 of them past F)
    (True, "bwd_dh.BLOCK_N=64,bwd_dh.tma=1,bwd_dh.persistent=1"),  # host-descriptor B loads, tile loop
    (True, "bwd_dh.BLOCK_N=64,bwd_dh.tma=1,bwd_dh.host_desc=0"),  # device-side descriptor per live tile
])
def test_dh_kernel_against_float64(seed, dtype, store_hw, pin):
    T, D, F_, E, K = 23, 40, 36, 4, 2  # 3 k-steps of 16 (last partial)
    p = make_problem(T, D, F_, E, K, dtype)
    plan = _plan(p, K)
    slots, tok, exp, pairs = _real_slots(plan)
    pre = torch.full((pairs.numel(), 2 * F_), float("nan"), dtype=dtype)  # padding / unused rows: NaN
    pre[slots] = torch.randn(len(slots), 2 * F_).to(dtype)
    dout = torch.randn(T, D).to(dtype)
    cfg = _cfgs(extra=pin).bwd_dh
    dgu, hw, dwp = gg.swiglu_dh_backward(dout.to(DEVICE), plan, p["down"], pre.to(DEVICE), cfg, store_hw=store_hw)
    nfb = -(-F_ // cfg.BLOCK_N)
    assert (hw is not None) == store_hw and dwp.shape == (T * K, nfb) and dwp.dtype == torch.float32
    # float64 reference of the epilogue
    g, u = pre[slots].double().split(F_, dim=1)
    w = plan.topk_weights_TK.double().cpu().flatten()[pairs[slots]][:, None]
    dh = torch.einsum("sd,sdf->sf", dout.double()[tok], p["down"].double().cpu()[exp])
    sig = torch.sigmoid(g)
    h = g * sig * u
    dw_ref = (dh * h).sum(1)
    dg_ref = w * dh * u * sig * (1 + g * (1 - sig))
    du_ref = w * dh * g * sig
    rtol = 1e-5 if dtype == torch.float32 else 2e-3
    got = dgu.cpu()
    torch.testing.assert_close(got[slots].double(), torch.cat([dg_ref, du_ref], 1).to(dtype).double(),
                               rtol=rtol, atol=rtol)
    torch.testing.assert_close(dwp.cpu().sum(1)[pairs[slots]].double(), dw_ref, rtol=rtol, atol=rtol * 10)
    used = plan.schedule.tile_expert_E_tiles.cpu().repeat_interleave(16) >= 0  # slots of used tiles
    pad = used & (pairs >= plan.num_pairs)
    assert bool((got[pad] == 0).all()), "padding slots of used tiles must get exact zeros"
    if store_hw:
        torch.testing.assert_close(hw.cpu()[slots].double(), (w * h).to(dtype).double(), rtol=rtol, atol=rtol)
        assert bool((hw.cpu()[pad] == 0).all())


@pytest.mark.parametrize("variant", ["recompute", "interleave"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_up_kernel_stores_preact(seed, variant, dtype):
    """``keep_preact``: the up kernel (plain or interleaved) also writes [x@Wg.T | x@Wu.T] per
    slot in float32 whatever x's dtype (padding rows 0); the output is bitwise the one without it."""
    T, D, F_, E, K = 21, 24, 20, 5, 2
    p = make_problem(T, D, F_, E, K, dtype, mask="token", opted_out=(3,))
    p["gate_up"][3] = float("nan")  # opted out: never read
    p["down"][3] = float("nan")
    plan = _plan(p, K, allow_mask=p["allow_mask"])
    cfgs = _cfgs(variant)
    out, pre = gg.grouped_swiglu_forward(p["x"], plan, p["gate_up"], p["down"], configs=cfgs, keep_preact=True)
    assert torch.equal(out, gg.grouped_swiglu_forward(p["x"], plan, p["gate_up"], p["down"], configs=cfgs))
    slots, tok, exp, pairs = _real_slots(plan)
    ref = torch.einsum("sd,sjd->sj", p["x"].double().cpu()[tok], p["gate_up"].double().cpu()[exp])
    assert pre.dtype == torch.float32  # not rounded to x's dtype (issue 22 item 3)
    torch.testing.assert_close(pre.cpu()[slots].double(), ref, rtol=1e-5, atol=1e-5)
    used = plan.schedule.tile_expert_E_tiles.cpu().repeat_interleave(16) >= 0
    assert bool((pre.cpu()[used & (pairs >= plan.num_pairs)] == 0).all())
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kept_and_recomputed_preact_give_bitwise_equal_gradients(seed, dtype):
    """Kept (the forward's, float32) and recomputed (the backward's up launch, float32) pre-
    activations are the same kernel's output with ``bwd_up == up``, so every gradient is
    bitwise equal (with a 16-bit kept one they differed: issue 22 item 3)."""
    T, D, F_, E, K = 19, 40, 36, 4, 2
    p = make_problem(T, D, F_, E, K, dtype)
    plan = _plan(p, K)
    cfgs = _cfgs()
    assert cfgs.bwd_up == cfgs.up
    _, pre = gg.grouped_swiglu_forward(p["x"], plan, p["gate_up"], p["down"], configs=cfgs, keep_preact=True)
    dout = torch.randn(T, D).to(dtype).to(DEVICE)
    kept = gg.grouped_swiglu_backward(dout, p["x"], plan, p["gate_up"], p["down"], configs=cfgs, preact_Q2F=pre)
    again = gg.grouped_swiglu_backward(dout, p["x"], plan, p["gate_up"], p["down"], configs=cfgs)
    for a, b in zip(kept, again):
        assert torch.equal(a, b)


def test_preact_argument_is_checked(seed):
    p = make_problem(7, 24, 20, 3, 2, torch.float32)
    plan = _plan(p, 2)
    dout = torch.randn(7, 24, device=DEVICE)
    with pytest.raises(ValueError, match="preact must have shape"):
        gg.grouped_swiglu_backward(dout, p["x"], plan, p["gate_up"], p["down"],
                                   preact_Q2F=torch.zeros(3, 40, device=DEVICE))
    q = plan.schedule.padded_pairs_Q.shape[0]
    with pytest.raises(TypeError, match="preact must have dtype"):
        gg.grouped_swiglu_backward(dout, p["x"], plan, p["gate_up"], p["down"],
                                   preact_Q2F=torch.zeros(q, 40, dtype=torch.float64, device=DEVICE))


# =========================================================================== the whole layer
# T, D, F, E, K, dtype, mask: odd sizes; expert 5 opted out (NaN weights), 6 never routed, 3 frozen
LAYER_CASES = [
    pytest.param(23, 40, 36, 7, 2, torch.float32, "token", id="token-fp32"),
    pytest.param(19, 24, 20, 7, 3, torch.float16, "sequence", id="sequence-fp16"),
    # gpu tier: bf16, D and F multiples of 8 (16-byte rows: the TMA paths resolve on)
    pytest.param(37, 48, 40, 7, 2, torch.bfloat16, "token", id="token-bf16-gpu", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("T,D,F,E,K,dtype,mask", LAYER_CASES)
def test_layer_variants_match_reference(seed, monkeypatch, T, D, F, E, K, dtype, mask):
    p = make_problem(T, D, F, E, K, dtype, mask=mask, bias=True, opted_out=(5,))
    p["expert_bias"][6] = -200.0  # allowed, never in anyone's top-K:
    p["allow_mask"][:, :K] = True  # every row allows K experts besides 6 (so none is forced to take it)
    p["allow_mask"][:, 3] = True  # the frozen expert 3 is in every row's top-K: it must see tokens
    p["expert_bias"][3] = 50.0
    for n in ("gate_up", "down", "router_weight"):
        p[n][5] = float("nan")
    p["expert_bias"][5] = float("nan")
    trainable = torch.ones(E, dtype=torch.bool, device=DEVICE)
    trainable[3] = False
    dout, dz = loss_grads(T, D, E)
    ref = run_reference64(p, dout, dz, trainable=trainable)
    low = run_layer(p, "torch", dout, dz, trainable=trainable) if dtype != torch.float32 else None
    counts = fk.route(backend_logits(p), K, allow_mask=p["allow_mask"]).counts_E.cpu()
    assert int(counts[5]) == 0 and int(counts[6]) == 0 and int(counts[3]) > 0
    results = {}
    runs = [(v, pins, True) for v, pins in VARIANTS.items()] + [("keep-atomic", VARIANTS["keep"], False)]
    for variant, pins, det in runs:  # det=False: fp32 atomics in the dX combine
        monkeypatch.setenv(tc.ENV_VAR, ",".join(s for s in (SMALL, pins) if s))
        got = run_layer(p, "triton", dout, dz, trainable=trainable, deterministic=det)
        results[variant] = got
        assert_matches_reference(got[0], ref[0], dtype, f"{variant}: out", low and low[0])
        for n, g in got[2].items():
            assert bool(torch.isfinite(g).all()), f"{variant}: d{n} not finite"
            assert_matches_reference(g, ref[2][n], dtype, f"{variant}: d{n}", low and low[2][n])
        for e in (3, 5, 6):  # frozen, opted out, zero tokens: no weight gradient at all
            assert bool((got[2]["gate_up"][e] == 0).all()) and bool((got[2]["down"][e] == 0).all()), (variant, e)
        assert bool((got[2]["router_weight"][5] == 0).all())
    if dtype != torch.float32:  # a kept pre-activation is rounded to x's dtype, a recomputed one is fp32
        return
    for a, b in (("recompute", "keep"), ("interleave", "keep-interleave")):  # same kernel, same config
        assert torch.equal(results[a][0], results[b][0]), (a, b)
        for n in results[a][2]:
            assert torch.equal(results[a][2][n], results[b][2][n]), (a, b, n)


def _saved_and_launched(p, K, monkeypatch):
    """(shapes of the activations the layer saves for the backward, names of the kernels one
    forward + backward launches)."""
    real = launch.kernels
    launches = record_launches(monkeypatch)
    x = p["x"].clone().requires_grad_()
    gu, dn = p["gate_up"].clone().requires_grad_(), p["down"].clone().requires_grad_()
    params = {t.data_ptr() for t in (gu, dn, p["router_weight"])}
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        out, _ = fk.flexmoe_forward(x, p["router_weight"], gu, dn, K, backend="triton")
    out.square().sum().backward()
    monkeypatch.setattr(launch, "kernels", real)
    return [tuple(t.shape) for t in seen if t.data_ptr() not in params and t.numel()], [n for n, _, _ in launches]


def test_layer_saves_preact_only_when_kept(seed, monkeypatch):
    """Default: nothing of width F is saved and the backward recomputes the pre-activation (a
    second up launch); ``up.keep_preact=1``: exactly one (Q_max, 2F) tensor more (2*F*K*bytes
    per token + padding rows) and no recompute launch."""
    T, D, F_, E, K = 13, 24, 20, 3, 2
    p = make_problem(T, D, F_, E, K, torch.float32)
    monkeypatch.setenv(tc.ENV_VAR, "up.keep_preact=0")
    off, off_launched = _saved_and_launched(p, K, monkeypatch)
    monkeypatch.setenv(tc.ENV_VAR, "up.keep_preact=1")
    on, on_launched = _saved_and_launched(p, K, monkeypatch)
    q_max = fk.ops.plan.schedule_sizes(T, K, E, tc.get_configs(T, D, F_, E, K, torch.float32, "cpu").block_m)[0]
    assert sorted(on) == sorted(off + [(q_max, 2 * F_)])
    assert all(2 * F_ not in s for s in off)
    assert off_launched.count("_up_swiglu_kernel") == 2 and on_launched.count("_up_swiglu_kernel") == 1
    assert off_launched.count("_dh_swiglu_bwd_kernel") == on_launched.count("_dh_swiglu_bwd_kernel") == 1


def test_custom_ops_opcheck_with_kept_preact(seed, monkeypatch):
    """The custom ops' schemas and fake kernels with the pre-activation kept (its (Q_max, 2F)
    output of moe_fwd, its input of moe_bwd)."""
    monkeypatch.setenv(tc.ENV_VAR, "up.keep_preact=1")
    T, D, F_, E, K = 5, 24, 20, 3, 2
    p = make_problem(T, D, F_, E, K, torch.float32, mask="token", bias=True)
    logits = fk.router_logits(p["x"], p["router_weight"])
    args = (p["x"], logits, p["gate_up"], p["down"], p["expert_bias"], p["allow_mask"], K, False, True, 1)
    torch.library.opcheck(torch.ops.flexmoe_triton.moe_fwd.default, args, test_utils=("test_schema", "test_faketensor"))
    res = torch.ops.flexmoe_triton.moe_fwd(*args)
    assert res[2].shape == (res[3 + 7].shape[0], 2 * F_)  # (Q_max, 2F): Q_max = len(padded_pairs_Q)
    bargs = (torch.randn(T, D, device=DEVICE), torch.randn(T, E, device=DEVICE), p["x"], p["gate_up"], p["down"],
             p["expert_bias"], p["allow_mask"], None, res[2], list(res[3:]), torch.float32, False, 1, [True] * 5)
    torch.library.opcheck(torch.ops.flexmoe_triton.moe_bwd.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


# =========================================================================== config fields
def test_config_variant_fields(monkeypatch):
    got = tc.parse_config_string("up.keep_preact=1,interleave=1")
    assert got == {"up": {"keep_preact": 1}, "*": {"interleave": 1}}
    monkeypatch.setenv(tc.ENV_VAR, "up.keep_preact=1,bwd_up.interleave=1")
    c = tc.get_configs(100, 64, 64, 4, 2, torch.bfloat16, "cpu")
    assert c.up.keep_preact is True and c.bwd_up.interleave is True and c.up.interleave is False
    monkeypatch.setenv(tc.ENV_VAR, "up.keep_preact=2")
    with pytest.raises(ValueError, match="keep_preact must be a bool or 0/1"):
        tc.get_configs(100, 64, 64, 4, 2, torch.bfloat16, "cpu")
    monkeypatch.setenv(tc.ENV_VAR, "bwd_dh.BLOCK_N=256")
    assert tc.get_configs(100, 64, 64, 4, 2, torch.bfloat16, "cpu").bwd_dh.BLOCK_N == 256


def test_bwd_dh_kind_defaults_and_tables():
    """Training sizes: the dh GEMM runs a wide N tile (>= 128), the recompute is the up GEMM's
    config, both variants are off; a table entry without ``bwd_dh`` derives it from ``bwd_dx``."""
    c = tc.heuristic_configs(32768, 2048, 768, 128, 8, torch.bfloat16)
    assert c.bwd_dh.BLOCK_N >= 128 and c.bwd_up == c.up
    assert not any(getattr(c, k).keep_preact or getattr(c, k).interleave for k in tc.KINDS)
    entry = {k: dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
             for k in tc.KINDS if k != "bwd_dh"}
    got = tc._from_entry(entry, "test")
    assert got.bwd_dh == tc.default_bwd_dh(got.bwd_dx) and got.bwd_dh.BLOCK_N == 128 and got.bwd_dh.BLOCK_M == 64
    assert "bwd_dh" in got.to_dict()
    with pytest.raises(ValueError, match="share BLOCK_M"):
        tc.MoEConfigs(*(tc.GemmConfig(32, 64, 64),) * 5, bwd_dh=tc.GemmConfig(64, 64, 64))
