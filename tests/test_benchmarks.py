"""The benchmark harness: the CPU smoke run end to end (subprocess) and its building blocks.

The smoke run's numbers mean nothing; these tests check that every bench produces sane,
self-describing rows (metadata, medians, FLOP accounting), the files and plots, and that the
targets report computes PASS / FAIL / NOT MEASURED correctly.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import harness, report  # noqa: E402
from benchmarks.bench_layer import LayerJob, make_mask, plan_jobs, run_layer  # noqa: E402
from benchmarks.bench_routing import routing_bytes  # noqa: E402
from benchmarks.presets import LAYER_PRESETS  # noqa: E402
from benchmarks.providers import PROVIDERS, Built, Provider  # noqa: E402


def _models_available() -> bool:
    try:
        import flexmoe_kernels.models  # noqa: F401
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_smoke")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"smoke run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(out / "results.json", encoding="utf-8") as f:
        data = json.load(f)
    return out, data, proc.stdout


def _finite_pos(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_smoke_files_and_metadata(smoke_run):
    out, data, stdout = smoke_run
    for name in ("results.json", "results.csv", "summary.md", "log.txt", "layer_smoke.png", "masks.png", "routing.png"):
        assert (out / name).is_file(), f"missing {name}"
    for png in out.glob("*.png"):
        head = png.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
    meta = data["meta"]
    for key in ("device", "torch", "triton", "deepspeed", "transformers", "cuda", "git_commit", "command",
                "timestamp", "seed", "flexmoe_backends"):
        assert key in meta, key
    assert meta["meaningless_cpu_numbers"] is True
    assert "--smoke" in meta["command"]
    assert meta["torch"] == torch.__version__
    assert meta["flexmoe_backends"]["torch"] == "available"
    # Every row carries the metadata (CSV rows are self-describing).
    rows = data["rows"]
    assert rows and all(r["device"] == meta["device"] and r["timestamp"] == meta["timestamp"] for r in rows)
    with open(out / "results.csv", encoding="utf-8", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"bench", "provider", "mode", "ms", "tflops", "git_commit", "device", "command"} <= set(csv_rows[0])
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "mean NOTHING" in summary and "## Layer benchmark" in summary and "## Routing benchmark" in summary
    assert "## Performance targets" in summary
    assert "WARNING" in stdout and "NOT MEASURED" in stdout
    assert not [r for r in rows if r["status"] == "error"], [r["note"] for r in rows if r["status"] == "error"]


def test_smoke_layer_rows(smoke_run):
    _, data, _ = smoke_run
    rows = [r for r in data["rows"] if r["bench"] == "layer"]
    p = LAYER_PRESETS["smoke"]
    ok = [r for r in rows if r["status"] == "ok"]
    got = {(r["provider"], r["mode"], r["mask"], r["T"]) for r in ok}
    for prov in ("torch", "dense_swiglu", "cublas_gemm", "hf_eager"):
        for mode in ("fwd", "bwd", "fwd_bwd"):
            for T in (1, 37):
                assert (prov, mode, "none", T) in got, (prov, mode, T)
    for mask in ("token_all", "token_mixed", "global:0.25"):
        assert ("torch", "fwd", mask, 37) in got and ("torch", "fwd_bwd", mask, 37) in got
    for r in ok:
        if r["mode"] == "memory":
            continue
        assert _finite_pos(r["ms"]) and r["ms_p20"] <= r["ms"] <= r["ms_p80"], r
        factor = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}[r["mode"]]
        expert = 6 * r["T"] * p.K * p.D * p.F
        router = 2 * r["T"] * p.D * p.E if r["provider"] not in ("dense_swiglu", "cublas_gemm") else 0
        assert r["flops"] == factor * (expert + router), r
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12, rel=1e-9)
        # executed FLOPs: autograd providers (these) re-run nothing; CSV and JSON carry both
        assert r["flops_executed"] == r["flops"], r
        assert r["tflops_executed"] == pytest.approx(r["flops_executed"] / (r["ms"] * 1e-3) / 1e12, rel=1e-9)
        assert r["mfu"] is None  # no peak on CPU
        if r["mode"] == "fwd":
            assert _finite_pos(r["gbps"]) and _finite_pos(r["bytes"])
            if r["provider"] == "torch":
                assert 1 <= r["experts_hit"] <= p.E
    # Memory is CUDA-only: on CPU those rows say so instead of inventing a number.
    mem = [r for r in rows if r["mode"] == "memory" and r["provider"] == "torch"]
    assert mem and all(r["status"] == "skipped" and "CUDA" in r["note"] for r in mem)
    # Unavailable providers are listed with their reason, never silently dropped.
    mb = [r for r in rows if r["provider"] == "megablocks_dmoe"]
    assert mb and all(r["status"] in ("ok", "skipped") and (r["status"] == "ok" or r["note"]) for r in mb)


def test_smoke_routing_rows(smoke_run):
    _, data, _ = smoke_run
    rows = [r for r in data["rows"] if r["bench"] == "routing"]
    copy = [r for r in rows if r["provider"] == "device_copy"]
    assert len(copy) == 1 and copy[0]["status"] == "ok" and _finite_pos(copy[0]["gbps"])
    tr = [r for r in rows if r["provider"] == "torch_route" and r["status"] == "ok"]
    assert {(r["T"], r["mask"]) for r in tr} == {(1, "none"), (37, "none"), (1, "token_mixed"), (37, "token_mixed")}
    for r in tr:
        assert _finite_pos(r["gbps"]) and r["pct_of_copy"] == pytest.approx(r["gbps"] / copy[0]["gbps"])


def test_smoke_e2e_rows(smoke_run):
    _, data, _ = smoke_run
    rows = {r["provider"]: r for r in data["rows"] if r["bench"] == "e2e"}
    assert set(rows) == {"dense", "moe", "moe2_full", "flexolmo_coupled"}
    if not _models_available():
        assert all(r["status"] == "skipped" and r["note"] for r in rows.values())
        pytest.skip("flexmoe_kernels.models or deepspeed missing: e2e rows are 'skipped' with the reason")
    for r in rows.values():
        assert r["status"] == "ok", r.get("note")
        assert _finite_pos(r["tokens_per_s"]) and math.isfinite(r["loss_last"])
        assert r["tokens_per_s"] == pytest.approx(r["T"] / (r["ms"] * 1e-3))
        assert r["mfu"] is None  # no MFU on CPU
        assert _finite_pos(r["flops_executed"]) and _finite_pos(r["tflops_executed"])
        assert r["moe_backend_resolved"] == "torch"  # "auto" on CPU: no recompute
    assert rows["moe"]["flops_executed"] == rows["moe"]["flops"]
    # coupled training skips the frozen weights' dW GEMMs: it executes less than its model count
    assert rows["flexolmo_coupled"]["flops_executed"] < rows["flexolmo_coupled"]["flops"]
    assert (rows["dense"]["E"], rows["dense"]["K"]) == (1, 1)
    assert (rows["moe2_full"]["E"], rows["flexolmo_coupled"]["E"]) == (2, 2)
    # Coupled training trains strictly fewer parameters than the same model fully trainable.
    c, f = rows["flexolmo_coupled"], rows["moe2_full"]
    assert c["params_total"] >= f["params_total"] and c["params_trainable"] < f["params_trainable"] / 2


def test_targets_mode_on_smoke_results(smoke_run):
    out, _, _ = smoke_run
    # Script form (python benchmarks/run.py) from another directory: must find the repo itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--targets", str(out)],
                          cwd=out, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "CPU RUN" in text
    for t in report.TARGETS:
        assert t.text in text
    assert text.count("NOT MEASURED") >= 4  # no triton/cuda kernels on CPU


# ----------------------------------------------------------------------------- building blocks
def _lrow(provider, mode, ms, tflops=None, mask="none", T=8192, preset="flexolmo-7x7b"):
    return dict(bench="layer", preset=preset, provider=provider, mode=mode, mask=mask, T=T, ms=ms,
                tflops=tflops, status="ok")


def test_targets_pass_fail_logic():
    rows = [
        _lrow("triton", "fwd", 1.0, 720.0), _lrow("cublas_gemm", "fwd", 0.9, 800.0),  # 0.90 -> PASS
        _lrow("torch", "fwd", 5.0, 100.0),  # slower reference must not be picked
        _lrow("triton", "fwd_bwd", 3.0, 600.0), _lrow("cublas_gemm", "fwd_bwd", 2.4, 750.0),  # 0.80 -> FAIL
        _lrow("triton", "fwd", 1.03, mask="token_all"),  # 3% overhead -> FAIL
        _lrow("triton", "fwd", 2.0, 560.0, preset="fine-grained"),
        _lrow("torch_grouped_mm", "fwd", 2.7, preset="fine-grained"),  # 1.35x -> PASS
        dict(bench="e2e", preset="x", provider="moe2_full", ms=13.0, status="ok"),
        dict(bench="e2e", preset="x", provider="flexolmo_coupled", ms=10.0, status="ok"),  # 1.3x PASS
        dict(bench="e2e", preset="x", provider="dense", ms=10.0, status="error"),  # errors are ignored
        dict(bench="e2e", preset="x", provider="moe", ms=12.0, status="ok"),
    ]
    res = {t["key"]: t for t in report.evaluate_targets(rows)}
    assert res["7x7b-fwd"]["status"] == "PASS" and res["7x7b-fwd"]["measured"] == pytest.approx(0.9)
    assert "triton" in res["7x7b-fwd"]["detail"]
    assert res["7x7b-fwd-bwd"]["status"] == "FAIL" and res["7x7b-fwd-bwd"]["measured"] == pytest.approx(0.8)
    assert res["mask-overhead"]["status"] == "FAIL" and res["mask-overhead"]["measured"] == pytest.approx(1.03)
    assert res["fg-fwd"]["status"] == "PASS" and res["fg-fwd"]["measured"] == 560.0
    assert res["fg-fwd-bwd"]["status"] == "NOT MEASURED"
    assert res["fg-vs-grouped-mm-fwd"]["measured"] == pytest.approx(1.35)
    assert res["coupled-speedup"]["status"] == "PASS" and res["coupled-speedup"]["measured"] == pytest.approx(1.3)
    assert res["moe-vs-dense"]["status"] == "NOT MEASURED"
    assert res["cuda-router-bw"]["status"] == "NOT MEASURED"


def test_masks_are_valid_and_fresh():
    p = LAYER_PRESETS["fine-grained"]
    for variant in ("token_all", "token_mixed", "global:0.5"):
        a = make_mask(variant, 301, p, torch.device("cpu"))
        assert a.dtype == torch.bool and int(a.sum(-1).min()) >= p.K
    mixed = make_mask("token_mixed", 301, p, torch.device("cpu"))
    assert mixed.shape == (301, p.E) and len({tuple(r.tolist()) for r in mixed}) > 1
    assert bool(mixed[:, 0].all())  # the public expert stays allowed
    g1, g2 = make_mask("global:0.5", 1, p, torch.device("cpu")), make_mask("global:0.5", 1, p, torch.device("cpu"))
    assert g1.shape == (p.E,) and int((~g1).sum()) == 64 and bool(g1[0]) and not torch.equal(g1, g2)
    # 7 experts top-5: at most 2 can be opted out globally.
    q = LAYER_PRESETS["flexolmo-7x7b"]
    assert int((~make_mask("global:0.5", 1, q, torch.device("cpu"))).sum()) == 2
    assert make_mask("none", 5, q, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="masks"):
        make_mask("global:1.5", 5, q, torch.device("cpu"))


def test_plan_and_accounting_helpers():
    jobs = plan_jobs(["smoke"], [4], ["torch", "dense_swiglu"], ["none", "token_all"], ["fwd", "bwd", "memory"])
    keys = {(j.provider, j.mask, j.mode) for j in jobs}
    assert ("torch", "token_all", "fwd") in keys and ("torch", "token_all", "bwd") not in keys
    assert not any(j.provider == "dense_swiglu" and j.mask != "none" for j in jobs)
    mask = torch.ones(10, 8, dtype=torch.bool)
    assert routing_bytes(10, 8, 2, 2, None) == 10 * 8 * 2 + 10 * 2 * 12 + 36
    assert routing_bytes(10, 8, 2, 2, mask) == routing_bytes(10, 8, 2, 2, None) + 80
    assert harness.num_buffer_sets(2**20) == 8 and harness.num_buffer_sets(2**30) == 1
    assert harness.num_buffer_sets(30 * 2**20) == 4
    t = harness.bench(lambda: torch.ones(3).sum(), torch.device("cpu"), harness.TimingConfig(cpu_reps=5))
    assert t.n == 5 and 0 < t.ms_p20 <= t.ms <= t.ms_p80
    assert harness.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_flop_accounting_model_and_executed(monkeypatch):
    """Issue 22 item 4: model FLOPs 18*P*D*F per fwd+bwd (+ router 6*T*D*E); our Triton backward
    recomputes the gate/up GEMM (4*P*D*F), so it executes 22*P*D*F unless up.keep_preact is on."""
    from benchmarks import flops

    T, D, F, E, K = 4096, 2048, 768, 128, 8
    P = T * K
    fwd = flops.expert_fwd(T, D, F, K) + flops.router_fwd(T, D, E)
    rec = flops.recompute_bwd(T, D, F, K)
    assert (fwd, rec) == (6 * P * D * F + 2 * T * D * E, 4 * P * D * F)
    fb = flops.layer_flops("fwd_bwd", fwd, rec)
    assert fb.model == 18 * P * D * F + 6 * T * D * E and fb.executed == 22 * P * D * F + 6 * T * D * E
    assert flops.layer_flops("fwd", fwd, rec) == flops.Flops(fwd, fwd)  # the forward re-runs nothing
    assert flops.layer_flops("bwd", fwd, rec) == flops.Flops(2 * fwd, 2 * fwd + rec)
    with pytest.raises(ValueError, match="mode must be one of"):
        flops.layer_flops("train", fwd)
    # The providers count through the same module: ours (triton) recompute by default, not with
    # the pre-activation kept; every other provider executes its model count.
    from benchmarks.providers import LayerWeights

    p = LAYER_PRESETS["smoke"]
    w = LayerWeights.random(p, torch.device("cpu"), torch.float32)
    monkeypatch.delenv("FLEXMOE_TRITON_CONFIG", raising=False)
    tri = PROVIDERS["triton"].build(p, w, torch.device("cpu"), torch.float32)
    assert tri.flops_fwd(37) == p.expert_flops(37) + p.router_flops(37)
    assert tri.recompute_bwd(37) == 4 * 37 * p.K * p.D * p.F
    monkeypatch.setenv("FLEXMOE_TRITON_CONFIG", "up.keep_preact=1")
    assert tri.recompute_bwd(37) == 0
    for name in ("torch", "cuda", "torch_grouped_mm", "dense_swiglu", "cublas_gemm"):
        assert PROVIDERS[name].build(p, w, torch.device("cpu"), torch.float32).recompute_bwd(37) == 0, name


def test_e2e_flop_accounting():
    """End to end: model = the PaLM count; executed adds 4*L*K*D*F per token for recomputing MoE
    layers and drops 2x the frozen active matmul weights (coupled training)."""
    pytest.importorskip("flexmoe_training")
    from flexmoe_training.flops import _matmul_params_active, flops_per_token

    from benchmarks import flops
    from benchmarks.bench_e2e import model_config
    from benchmarks.presets import E2E_PRESETS

    pre = E2E_PRESETS["e2e-small"]
    cfg = model_config(pre, "moe2_full")
    palm = flops_per_token(cfg, pre.seq, convention="palm")
    assert flops.e2e_flops_per_token(cfg, pre.seq) == flops.Flops(palm, palm)
    L, D, F, K = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    got = flops.e2e_flops_per_token(cfg, pre.seq, recompute_experts=True)
    assert got.model == palm and got.executed == pytest.approx(palm + 4 * L * K * D * F)
    trainable = L * (3 * D * F + D)
    got = flops.e2e_flops_per_token(cfg, pre.seq, trainable_active_mm=trainable)
    assert got.executed == pytest.approx(palm - 2 * (_matmul_params_active(cfg) - trainable))


def test_failing_provider_gives_error_row_not_crash(tmp_path, monkeypatch):
    def build(p, w, device, dtype):
        def fwd(x, mask):
            if not torch.is_grad_enabled():
                return x * 1.0
            raise RuntimeError("boom in backward setup")
        return Built(fwd, [], lambda T: 1, lambda hit: 0)

    monkeypatch.setitem(PROVIDERS, "broken", Provider("broken", "broken", "baseline", False,
                                                      lambda d: (True, "test"), build))
    meta = harness.run_metadata(torch.device("cpu"), ["test"])
    rec = harness.Recorder(meta, tmp_path)
    jobs = [LayerJob("smoke", 3, "broken", "none", "fwd_bwd"), LayerJob("smoke", 3, "dense_swiglu", "none", "fwd")]
    run_layer(jobs, torch.device("cpu"), torch.float32, rec, harness.TimingConfig(cpu_reps=1), show_progress=False)
    rec.close()
    assert [r["status"] for r in rec.rows] == ["error", "ok"]
    assert "boom" in rec.rows[0]["note"]
    assert "Traceback" in (tmp_path / "log.txt").read_text()


def test_cli_list_and_bad_flags(capsys):
    from benchmarks.run import main

    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    for name in [*PROVIDERS, "torch_route", "triton_route", "cuda_route", "flexolmo-7x7b", "fine-grained"]:
        assert name in listing

    bad = [(["--presets", "nope"], "--presets"), (["--tokens", "0"], "--tokens"), (["--masks", "half"], "--masks"),
           (["--targets", "/nonexistent.json"], "--targets"), (["--smoke", "--save-results"], "--save-results")]
    if not torch.cuda.is_available():  # the full suite refuses to start on a CPU (with a GPU it would run)
        bad.append(([], "--smoke"))
    for argv, needle in bad:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


# ----------------------------------------------------------------------------- baselines are right
@pytest.mark.parametrize("T", [1, 37])
def test_moe_baselines_match_reference(T, seed):
    """The baselines we time must compute the same layer as ours (else the comparison is void)."""
    from helpers import tol

    from benchmarks.providers import LayerWeights

    p = LAYER_PRESETS["smoke"]
    dev, dt = torch.device("cpu"), torch.float32
    w = LayerWeights.random(p, dev, dt)
    x = torch.randn(T, p.D, dtype=dt)
    ref = PROVIDERS["torch"].build(p, w, dev, dt)
    with torch.no_grad():
        want = ref.fwd(x, None)
        for name in ("torch_grouped_mm", "hf_eager", "hf_grouped_mm"):
            ok, why = PROVIDERS[name].available(dev)
            if not ok:
                continue
            got = PROVIDERS[name].build(p, w, dev, dt).fwd(x, None)
            torch.testing.assert_close(got, want, **tol(dt), msg=lambda m: f"{name}: {m}")
        mixed = make_mask("token_mixed", T, p, dev)
        if PROVIDERS["torch_grouped_mm"].available(dev)[0]:
            got = PROVIDERS["torch_grouped_mm"].build(p, w, dev, dt).fwd(x, mixed)
            torch.testing.assert_close(got, ref.fwd(x, mixed), **tol(dt))
        # Opted-out experts hold NaN weights: a baseline that reads them fails here.
        mask = make_mask("global:0.5", T, p, dev)
        for t in (w.gate_up_E2FD, w.down_EDF):
            t.data[~mask] = float("nan")
        want = ref.fwd(x, mask)
        assert torch.isfinite(want).all()
        if PROVIDERS["torch_grouped_mm"].available(dev)[0]:
            got = PROVIDERS["torch_grouped_mm"].build(p, w, dev, dt).fwd(x, mask)
            torch.testing.assert_close(got, want, **tol(dt))


@pytest.mark.gpu
def test_gpu_quick_suite(tmp_path):
    """On a GPU: a short real run (all benches) has no failures where a backend is available."""
    out = tmp_path / "gpu"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--presets", "fine-grained", "--tokens", "64,4096",
         "--modes", "fwd,fwd_bwd,memory", "--masks", "none,token_all", "--rep-ms", "20", "--warmup-ms", "5",
         "--e2e-presets", "e2e-smoke", "--out", str(out), "--no-progress"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["meaningless_cpu_numbers"] is False
    rows = data["rows"]
    must = {"torch", "dense_swiglu", "cublas_gemm", "torch_route", "device_copy"}
    for r in rows:
        if r["provider"] in must:
            assert r["status"] == "ok", r
    mem = [r for r in rows if r.get("mode") == "memory" and r["status"] == "ok"]
    assert mem and all(r["peak_mem_mb"] > 0 for r in mem)
    copy = [r for r in rows if r["provider"] == "device_copy"][0]
    assert copy["gbps"] > 100
    for r in rows:
        if r["bench"] == "e2e" and r["status"] == "ok" and r["mfu"] is not None:
            assert 0 < r["mfu"] < 1
