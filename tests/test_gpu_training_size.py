"""GPU tier: the Triton layer at training-size launch configs against the float64 reference
(issue 22 item 6). The CPU tier runs 16-row tiles through the interpreter; the timed configs
are 128-row tiles with BLOCK_N 256, dW through TMA, the persistent schedule, the kept
pre-activation and the interleaved gate/up kernel. Each runs here in bf16 on a problem with
at least 512 rows per expert (several 128-row tiles per expert and several F / D blocks), and
the recorded launches prove the configs were the ones that ran.

Legend: T tokens, D hidden, F expert width, E experts, K top-k.
"""
from __future__ import annotations

import pytest
import torch
from helpers import (DEVICE, assert_matches_reference, loss_grads, make_problem, record_launches, run_layer,
                     run_reference64)

import flexmoe_kernels as fk
from flexmoe_kernels.ops.triton import configs as tc

T, D, F, E, K = 2048, 512, 512, 4, 2  # 1024 rows per expert on average; F / 128 = 4 blocks
BASE = ("BLOCK_M=128,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=8,num_stages=3,"
        "down.BLOCK_N=256,bwd_dx.BLOCK_N=256,tma=1")
# name -> (pin added to BASE, {kernel: {constexpr: value}} the launches must show)
TRAINING_CONFIGS = {
    "tiles128-bn256-tma": ("", {"_up_swiglu_kernel": {"BLOCK_M": 128, "TMA": True},
                                "_tile_gemm_scatter_kernel": {"BLOCK_M": 128, "BLOCK_N": 256, "TMA": True},
                                "_grouped_dw_kernel": {"A_TMA": True}}),
    "persistent": ("persistent=1", {"_up_swiglu_kernel": {"PERSISTENT": True},
                                    "_tile_gemm_scatter_kernel": {"PERSISTENT": True}}),
    "keep_preact": ("up.keep_preact=1", {"_up_swiglu_kernel": {"STORE_PRE": 1}}),
    "interleave": ("up.interleave=1,bwd_up.interleave=1", {"_up_interleaved_kernel": {"BLOCK_M": 128}}),
    "tma0-persistent": ("tma=0,persistent=1", {"_tile_gemm_scatter_kernel": {"TMA": False, "PERSISTENT": True}}),
}


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(1234)
    p = make_problem(T, D, F, E, K, torch.bfloat16)
    dout, dz = loss_grads(T, D, E, p["x"].device)
    ref = run_reference64(p, dout, dz)
    low = run_layer(p, "torch", dout, dz)
    counts = fk.route(fk.router_logits(p["x"], p["router_weight"]).float(), K).counts_E
    return p, dout, dz, ref, low, counts


def _matches(kwargs: dict, want: dict) -> bool:
    return all(k in kwargs and (kwargs[k] == v or int(kwargs[k]) == int(v)) for k, v in want.items())


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(TRAINING_CONFIGS))
def test_gpu_training_size_config_matches_reference(problem, name, monkeypatch):
    if not fk.backend_status("triton", DEVICE)[0]:
        pytest.skip(fk.backend_status("triton", DEVICE)[1])
    p, dout, dz, ref, low, counts = problem
    assert int(counts.min()) >= 512, counts  # >= 4 full 128-row tiles per expert
    extra, want = TRAINING_CONFIGS[name]
    monkeypatch.setenv(tc.ENV_VAR, BASE + ("," + extra if extra else ""))
    monkeypatch.delenv("FLEXMOE_TRITON_DETERMINISTIC", raising=False)
    launches = record_launches(monkeypatch)
    got = run_layer(p, "triton", dout, dz)
    torch.cuda.synchronize()
    for kernel, fields in want.items():
        seen = [kw for n, _, kw in launches if n == kernel]
        assert any(_matches(kw, fields) for kw in seen), (name, kernel, fields, [sorted(kw.items()) for kw in seen][:2])
    what = f"triton {name}"
    assert_matches_reference(got[0], ref[0], torch.bfloat16, f"{what}: out", low[0])
    assert_matches_reference(got[1], ref[1], torch.float32, f"{what}: logits")
    for n, g in got[2].items():
        assert bool(torch.isfinite(g).all()), f"{what}: d{n} not finite"
        assert_matches_reference(g, ref[2][n], torch.bfloat16, f"{what}: d{n}", low[2][n])


def test_training_configs_are_valid_pins():
    """Runs everywhere (no GPU): every pin parses, passes the H100 bounds (issue 21 item 13) and
    resolves to what the GPU test claims to run."""
    for extra, _ in TRAINING_CONFIGS.values():
        over = tc.parse_config_string(BASE + ("," + extra if extra else ""))
        assert over["*"]["BLOCK_M"] == 128 and over["down"]["BLOCK_N"] == 256
        cfgs = tc._apply_overrides(tc.heuristic_configs(T, D, F, E, K, torch.bfloat16, "cuda"), over)
        tc.check_pinned_configs(cfgs, over, torch.bfloat16, "cuda", "NVIDIA H100 80GB HBM3")
        assert cfgs.block_m == 128 and cfgs.down.BLOCK_N == cfgs.bwd_dx.BLOCK_N == 256
        assert cfgs.dw.tma == ("tma=0" not in extra)  # dW through TMA unless the variant turns TMA off

