"""The Liger-Kernel peer provider of the benchmarks (issue 22 item 7): our routing in front of
``liger_kernel``'s fused MoE (``LigerFusedMoEFunction``) computes the layer, checked like our
backends against the float64 reference (the tests' pass rule) before the GPU sweep times it.

Interpreter tier: on the CPU Liger's Triton kernels run under ``TRITON_INTERPRET=1`` (conftest
sets it; the provider pins one config per kernel, ``LIGER_FUSED_MOE_AUTOTUNE=0``, since the
autotuner cannot benchmark without a GPU), fp32 and fp16, small shapes. Skipped, with the
reason, where ``liger_kernel`` is not importable (``pip install --no-deps liger-kernel==0.8.5``).

Legend: T tokens, D hidden, F expert width, E experts, K top-k.
"""
from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_matches_reference, loss_grads, make_problem, run_layer, run_reference64

from benchmarks import providers

OK, WHY = providers.PROVIDERS["liger_fused_moe"].available(DEVICE)
pytestmark = [pytest.mark.skipif(not OK, reason=f"Liger provider unavailable: {WHY}"),
              pytest.mark.usefixtures("one_thread")]


def liger_forward(x, r, gu, dn, k, *, allow_mask=None, expert_bias=None, norm_topk_prob=False, **_):
    """``flexmoe_forward``'s signature (what helpers.run_layer calls) over the provider's layer."""
    assert expert_bias is None and not norm_topk_prob
    return providers.liger_layer(k)(x, r, gu, dn, k, allow_mask)


@pytest.mark.parametrize("T,D,F,E,K,mask,dtype", [
    (37, 32, 48, 7, 2, None, torch.float32),  # prime E, T not a multiple of any tile
    (37, 32, 48, 7, 2, "token", torch.float16),  # per-token opt-out (masked logits before the softmax)
    (5, 16, 32, 4, 4, None, torch.float16),  # K = E, T smaller than a tile
    (1, 32, 48, 7, 1, "global", torch.float32),  # T = 1, K = 1, experts opted out for everyone
])
def test_liger_layer_matches_reference(seed, dtype, T, D, F, E, K, mask):
    p = make_problem(T, D, F, E, K, dtype, mask=mask)
    dout, dz = loss_grads(T, D, E, p["x"].device)
    ref = run_reference64(p, dout, dz)
    low = run_layer(p, "torch", dout, dz) if dtype == torch.float16 else None
    got = run_layer(p, None, dout, dz, forward=liger_forward)
    assert got[0].dtype == dtype
    assert_matches_reference(got[0], ref[0], dtype, "liger: out", low and low[0])
    assert_matches_reference(got[1], ref[1], torch.float32, "liger: logits")
    for n, g in got[2].items():
        assert bool(torch.isfinite(g).all()), f"liger: d{n} not finite"
        assert_matches_reference(g, ref[2][n], dtype, f"liger: d{n}", low and low[2][n])


def test_liger_provider_passes_the_sweeps_self_check(tmp_path):
    """The check the GPU sweep runs before timing it (benchmarks/check.py), here in fp32."""
    from benchmarks import check

    ref = check.prepare_reference("smoke", 9, torch.device("cpu"), tmp_path)
    res = check.check_provider("smoke", 9, torch.device("cpu"), ref,
                               fwd=providers.PROVIDERS["liger_fused_moe"].check_fwd(torch.device("cpu")))
    assert res["status"] == "PASS", res


def test_liger_provider_row_in_the_layer_bench(tmp_path):
    """A layer-benchmark row of the provider (CPU numbers mean nothing; the row must exist)."""
    from benchmarks import harness
    from benchmarks.bench_layer import LayerJob, run_layer as bench_run_layer

    meta = harness.run_metadata(torch.device("cpu"), ["test"])
    rec = harness.Recorder(meta, tmp_path)
    bench_run_layer([LayerJob("smoke", 5, "liger_fused_moe", "none", "fwd_bwd")], torch.device("cpu"), torch.float32,
                    rec, harness.TimingConfig(cpu_reps=1), show_progress=False)
    rec.close()
    (row,) = rec.rows
    assert row["status"] == "ok", row.get("note")
    assert row["flops"] == row["flops_executed"] > 0  # Liger keeps the pre-activation: no recompute
