"""The prepared GPU session (issue 13 item 10), checked without a GPU: the dry run's plan and
budget, the driver's schedule (budgets roll over, a late step is stopped, results are packed
after every step), the finalisation (merged results, summary, best-measured table in the
format the Triton backend loads), the variant list and the prerequisite checks."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_session as gs
from benchmarks import gpu_sweep as sw
from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _bash(*args, **kw):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, **kw)


@pytest.fixture(scope="module")
def inventory():
    """The sweep's inventory as the dry run records it (no GPU; a fresh process)."""
    inv = gs.load_inventory()
    assert inv.get("kernels"), inv
    return inv


def test_dry_run_lists_every_step_and_fits_nine_minutes(inventory):
    """Issue 22 item 6: the dry run prints each step's estimate (from the kernel count and the
    measured compile time), the kernel count, the duplicates cut, the self-check of every
    variant and a total <= 540 s."""
    r = _bash("--dry-run")
    assert r.returncode == 0, r.stderr
    steps = gs.plan_steps(inv=inventory, peers=gs.carried_peers())
    for i, s in enumerate(steps, 1):
        assert re.search(rf"^\s*{i} {re.escape(s.name)}(\s|\s\(bg\)\s)+{s.budget_s}\s", r.stdout, re.M), s.name
    assert len(re.findall(r"^\s+estimate: ", r.stdout, re.M)) == len(steps)
    total = int(re.search(r"total estimate: (\d+) s wall", r.stdout).group(1))
    assert total == gs.wall_budget(steps) == sum(s.budget_s for s in steps if not s.background)
    assert total <= 540
    n = int(re.search(r"kernels to compile: (\d+) distinct Triton kernels \(recorded", r.stdout).group(1))
    assert n == inventory["kernels"] >= 60
    assert f"ceil({n} kernels / {gs.AOT_JOBS} jobs) x {gs.COMPILE_S_PER_KERNEL:g} s" in r.stdout
    assert "cfg:stages4 (= default)" in r.stdout  # 4 stages is the H100 table's default: not swept twice
    for pn, names in inventory["variants"].items():
        for name in names:
            assert re.search(rf"^  check {re.escape(name)}\s+{pn}\s", r.stdout, re.M), (name, pn)
    assert "prerequisites" in r.stdout and "to run it: bash benchmarks/gpu_session.sh OUT_DIR" in r.stdout
    assert f"(allow {gs.DEVICE_TIMEOUT_S} s)" in r.stdout and gs.DEVICE_TIMEOUT_S == 560


def test_budgets_follow_the_estimates(inventory):
    """Each budget is its estimate plus the margin; setup's is the sum of its subprocess
    timeouts; the warm-up (AOT compile + self-checks) fits beside the tests."""
    est = gs.estimates(inventory)
    steps = {s.name: s for s in gs.plan_steps(inv=inventory)}
    assert steps["setup"].budget_s == sum(gs.SETUP_TIMEOUTS.values())
    for name, (sec, how) in est.items():
        assert steps[name].budget_s >= sec and how, name
    assert steps["warm"].budget_s <= steps["tests"].budget_s
    n = inventory["kernels"]
    aot = gs.PROCESS_START_S + gs.RECORD_S + -(-n // gs.AOT_JOBS) * gs.COMPILE_S_PER_KERNEL
    assert est["warm"][0] >= aot
    # more kernels or more checks: a longer warm-up (the estimate follows the counts)
    more = dict(inventory, kernels=n * 3)
    assert gs.estimates(more)["warm"][0] > est["warm"][0]
    assert gs.AOT_JOBS + gs.TEST_WORKERS <= gs.GPU_CORES


def test_plan_shape():
    steps = gs.plan_steps()
    names = [s.name for s in steps]
    assert names == ["setup", "warm", "tests", "layer-fine-grained", "layer-flexolmo-7x7b", "routing", "e2e",
                     "finalize"]
    assert all(s.argvs and s.budget_s > 0 for s in steps)
    for i, s in enumerate(steps):  # a background step runs beside the next one and ends with it
        if s.background:
            assert not steps[i + 1].background and s.budget_s <= steps[i + 1].budget_s
    assert gs.wall_budget(steps) + gs.KILL_GRACE_S <= gs.TOTAL_BUDGET_S <= gs.DEVICE_TIMEOUT_S - 15
    tests = next(s for s in steps if s.name == "tests").argvs[0]
    assert "-n" in tests and "--timeout" in tests and any(a.startswith("--junitxml=") for a in tests)


def test_usage_without_out_dir():
    r = _bash()
    assert r.returncode == 2 and "usage" in r.stderr


def test_test_subset_exists():
    assert gs.missing_tests() == []
    assert "tests/test_cuda_build.py" in gs.TEST_SUBSET


# ----------------------------------------------------------------------------- the driver
def _sleep(seconds: float, name: str) -> list:
    code = f"import time; print('{name} start', flush=True); time.sleep({seconds}); print('{name} end', flush=True)"
    return [sys.executable, "-c", code]


def test_driver_rolls_budgets_over_and_stops_a_late_step(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "KILL_GRACE_S", 2)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (work / "part").mkdir(parents=True)
    (work / "part" / "x.txt").write_text("kept")
    steps = [
        gs.Step("quick", 3, "ends early", [_sleep(0.1, "quick")]),
        gs.Step("bg", 2, "beside slow", [_sleep(0.3, "bg")], background=True),
        gs.Step("slow", 2, "too long", [_sleep(30, "slow")]),
        gs.Step("finalize", 1, "last", [_sleep(0.1, "fin")]),
    ]
    records = gs.run_session(out, work, steps, total=8)
    by = {r["step"]: r for r in records}
    assert not by["quick"]["timed_out"] and by["quick"]["exit_codes"] == [0]
    assert not by["bg"]["timed_out"]
    # slow may use what quick left: it is stopped at start + 3 + 2 s, not 2 s after it began
    assert by["slow"]["timed_out"] and by["slow"]["exit_codes"] != [0]
    assert 3.5 < by["slow"]["started_s"] + by["slow"]["elapsed_s"] < 5 + gs.KILL_GRACE_S + 1
    assert by["finalize"]["exit_codes"] == [0]
    saved = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in saved["steps"]] == ["quick", "slow", "bg", "finalize"]
    with tarfile.open(out / "session.tar.gz") as tar:
        assert "session/part/x.txt" in tar.getnames()


# ----------------------------------------------------------------------------- finalisation
def _cfg(bm: int) -> dict:
    from flexmoe_kernels.ops.triton.configs import TILE_KINDS, heuristic_configs

    d = heuristic_configs(32768, 2048, 768, 128, 8, torch.bfloat16, "cuda").to_dict()
    for k in TILE_KINDS:
        d[k]["BLOCK_M"] = bm
    return d


def _layer_rows() -> list:
    base = dict(bench="layer", preset="fine-grained", D=2048, F=768, E=128, K=8, T=32768, dtype="bfloat16",
                status="ok", mask="none")
    rows = []
    for prov, variant, bm, ms in (("triton", "default", 128, 10.0), ("triton:cfg:bm64", "cfg:bm64", 64, 8.0),
                                  ("triton:atomic", "atomic", 128, 5.0)):
        for mode, f in (("fwd", 1), ("fwd_bwd", 3)):
            rows.append(dict(base, provider=prov, variant=variant, mode=mode, ms=ms * f, tflops=100.0 / ms,
                             triton_config=_cfg(bm), triton_config_source="heuristic"))
    rows += [dict(base, provider="cublas_gemm", variant="baseline", mode=m, ms=4.0 * f, tflops=250.0)
             for m, f in (("fwd", 1), ("fwd_bwd", 3))]
    return rows


def test_finalize_merges_parts_and_writes_the_best_measured_table(tmp_path):
    from flexmoe_kernels.ops.triton import configs

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    meta = harness.run_metadata(torch.device("cpu"), ["-m", "x"])
    meta.update(device="NVIDIA H200", git_commit=None)
    for part in ("layer-fine-grained", "routing"):
        (work / part).mkdir(parents=True)
    harness.write_results(work / "layer-fine-grained", meta, _layer_rows())
    routing = [dict(bench="routing", provider="device_copy", mode="copy", mask="none", status="ok", ms=1.0, gbps=3000.0)]
    harness.write_results(work / "routing", meta, routing)
    (work / "routing" / "log.txt").write_text("a harness log line\n")
    assert gs.main(["finalize", str(out), str(work)]) == 0
    m, rows = harness.load_results(out / "results.json")
    assert len(rows) == 9 and m["command"] == "bash benchmarks/gpu_session.sh OUT_DIR" and "git_commit_source" in m
    assert (out / "results.csv").is_file() and "benchmark summary" in (out / "summary.md").read_text()
    table_path = out / "triton_moe_NVIDIA_H200.json"
    table = json.loads(table_path.read_text())
    assert table["status"].startswith("measured on NVIDIA H200")
    loaded = configs.load_table("NVIDIA H200", out)
    cfgs = configs.lookup_table(loaded, 32768, 2048, 768, 128, 8, torch.bfloat16)
    assert cfgs.block_m == 64  # the fastest non-atomic variant, not the faster atomic one
    assert set(table["measured_ms"]["D=2048,F=768,E=128,K=8,dtype=bfloat16"]) == {"default", "cfg:bm64", "atomic"}
    assert len([p for p in out.iterdir()]) <= 8


def test_best_table_without_measurements():
    table, notes = sw.best_table([dict(bench="layer", preset="smoke", status="error", provider="triton")], "X")
    assert table is None and notes


# ----------------------------------------------------------------------------- variants
def test_variants_are_what_exists():
    dups: list = []
    names = [v.name for v in sw.variants(torch.device("cpu"), duplicates=dups)]
    assert names[:2] == ["default", "atomic"]
    # every candidate is swept unless it resolves to an earlier variant's configs
    assert {f"cfg:{n}" for n in sw.CONFIG_CANDIDATES} <= set(names) | {d for d, _ in dups}
    assert sw.Variant("default", ()).provider == "triton" and sw.Variant("atomic", ()).provider == "triton:atomic"


def test_duplicate_variants_are_cut_under_the_h100_table():
    """cfg:stages4 pins 4 stages, which the H100 table already has: it would measure the default
    again (issue 22 item 6); the heuristic (3 stages) stays."""
    dups: list = []
    names = [v.name for v in sw.variants(torch.device("cuda"), {"fine-grained": 32768}, sw.ASSUMED_DEVICE, dups)]
    assert "cfg:stages4" not in names and ("cfg:stages4", "default") in dups
    assert "heuristic" in names and "cfg:tma0" in names and "cfg:persistent" in names
    sigs = set()
    for name in names:
        v = next(x for x in sw._candidates(sw._configs_module(), sw.ASSUMED_DEVICE, "cuda", {"fine-grained": 32768})
                 if x.name == name)
        sig = (dict(v.env).get(sw.DET_ENV), json.dumps(sw.resolve_variant(v, "fine-grained", 32768)[0], sort_keys=True))
        assert sig not in sigs, name
        sigs.add(sig)


@pytest.mark.parametrize("preset", sorted(sw.TARGET_SHAPES))
def test_config_pins_apply_to_the_gpu_heuristic(preset, monkeypatch):
    from flexmoe_kernels.ops.triton import configs

    p = sw.LAYER_PRESETS[preset]
    heur = configs.heuristic_configs(sw.TARGET_SHAPES[preset], p.D, p.F, p.E, p.K, torch.bfloat16, "cuda")
    for pin in list(sw.CONFIG_CANDIDATES.values()) + [sw._pin_string(heur)]:
        pinned = configs._apply_overrides(heur, configs.parse_config_string(pin))
        assert pinned.block_m in (64, 128)
    assert configs._apply_overrides(heur, configs.parse_config_string(sw._pin_string(heur))).to_dict() == heur.to_dict()


def test_extra_fields_become_variants():
    import dataclasses
    import types

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        BLOCK_M: int
        tma: int = 0
        persistent: bool = True
        name: str = "x"

    fake = types.SimpleNamespace(GemmConfig=Cfg, _FIELDS=("BLOCK_M", "tma", "persistent", "name"))
    got = {v.name: dict(v.env) for v in sw._extra_field_variants(fake)}
    assert got == {"field:tma=1": {sw.CONFIG_ENV: "tma=1"}, "field:persistent=0": {sw.CONFIG_ENV: "persistent=0"}}


def test_variant_env_restores(monkeypatch):
    monkeypatch.setenv(sw.CONFIG_ENV, "BLOCK_M=32")
    monkeypatch.delenv(sw.DET_ENV, raising=False)
    with sw.variant_env(sw.Variant("atomic", ((sw.DET_ENV, "0"),))):
        assert os.environ[sw.DET_ENV] == "0" and sw.CONFIG_ENV not in os.environ
    assert os.environ[sw.CONFIG_ENV] == "BLOCK_M=32" and sw.DET_ENV not in os.environ


@pytest.mark.slow
def test_sweep_and_warm_up_run_on_cpu(tmp_path, capsys):
    """The sweep's commands at the tiny smoke shape on the CPU (Triton's interpreter): rows
    per variant beside a baseline, tagged; the compile warm-up; the table command."""
    sw.compile_variant("atomic", {"smoke": 5}, torch.device("cpu"))
    assert "[warm] atomic smoke T=5" in capsys.readouterr().out
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "benchmarks.gpu_sweep", "layer", "--preset", "smoke", "--tokens", "5", "--device",
           "cpu", "--variants", "default,atomic", "--baselines", "cublas_gemm", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _, rows = harness.load_results(out)
    got = {(x["provider"], x["mode"], x["mask"], x["variant"]) for x in rows if x["status"] == "ok"}
    assert ("triton", "fwd_bwd", "token_all", "default") in got
    assert ("triton:atomic", "fwd", "none", "atomic") in got
    assert ("cublas_gemm", "fwd", "none", "baseline") in got
    assert all(x["triton_config"]["up"]["BLOCK_M"] for x in rows if x["provider"].startswith("triton"))
    # each variant was checked (in its own process) before it was timed
    assert all(x["check"] == "PASS" for x in rows if x["provider"].startswith("triton"))
    assert {p.name for p in (out / "checks").glob("check-*.json")} == {"check-default-smoke-T5.json",
                                                                       "check-atomic-smoke-T5.json"}
    assert sw.main(["table", str(out), "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("triton_moe_CPU*.json"))


# ----------------------------------------------------------------------------- prerequisites
def _wheel(d: Path, name: str, requires=()) -> None:
    with zipfile.ZipFile(d / f"{name}-1.0-py3-none-any.whl", "w") as z:
        meta = "Name: x\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(f"{name}-1.0.dist-info/METADATA", meta + "Requires-Dist: pytest ; extra == 'test'\n")


def test_wheel_checks(tmp_path):
    (tmp_path / gs.WHEEL_DIR).mkdir()
    res = gs._check_wheels(tmp_path)
    assert not res[0][0] and "missing" in res[0][1]
    for n in gs.REQUIRED_WHEELS:
        _wheel(tmp_path / gs.WHEEL_DIR, n, ["torch>=2.0", "hjson", "typing-extensions>=4.16.0"])
    assert all(ok for ok, _ in gs._check_wheels(tmp_path))
    _wheel(tmp_path / gs.WHEEL_DIR, "deepspeed_extra_dep", ["not-in-the-image (>=1)"])
    res = gs._check_wheels(tmp_path)
    assert not res[1][0] and "not-in-the-image" in res[1][1]


# ----------------------------------------------------------------------------- self-checks (issue 22 item 6)
def test_check_rule_is_the_tests_bf16_rule():
    """benchmarks.check.within_rule gives the verdicts of tests/helpers.assert_matches_reference."""
    from helpers import assert_matches_reference

    from benchmarks import check

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 32, generator=g, dtype=torch.float64)
    torch_low = (ref + 1e-3 * torch.randn(64, 32, generator=g, dtype=torch.float64)).bfloat16()
    err_torch = (torch_low.double() - ref).abs().max().item()
    for scale in (0.5, 1.9, 2.2, 10.0):
        got = (ref + scale * err_torch * torch.sign(torch.randn(64, 32, generator=g, dtype=torch.float64))).bfloat16()
        err = (got.double() - ref).abs().max().item()
        ok, _ = check.within_rule(err, err_torch, ref.abs().max().item(), torch.bfloat16)
        try:
            assert_matches_reference(got, ref, torch.bfloat16, "t", torch_low)
            want = True
        except AssertionError:
            want = False
        assert ok == want, scale


@pytest.fixture(scope="module")
def smoke_reference(tmp_path_factory):
    from benchmarks import check

    return check.prepare_reference("smoke", 5, torch.device("cpu"), tmp_path_factory.mktemp("ref"))


def test_check_passes_the_reference_backend_and_fails_a_wrong_one(smoke_reference):
    from benchmarks import check

    dev = torch.device("cpu")
    ok = check.check_provider("smoke", 5, dev, smoke_reference, fwd=check.flexmoe_fwd("torch"))
    assert ok["status"] == "PASS" and not ok["error"], ok
    assert set(ok["tensors"]) == set(check.TENSORS) | {"out_no_grad"}

    def scaled(x, r, gu, dn, k):
        out, z = check.flexmoe_fwd("torch")(x, r, gu, dn, k)
        return out * 1.01, z

    bad = check.check_provider("smoke", 5, dev, smoke_reference, fwd=scaled)
    assert bad["status"] == "FAIL" and "out: max err" in bad["error"] and "gate_up" in bad["error"]

    def boom(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    crashed = check.check_provider("smoke", 5, dev, smoke_reference, fwd=boom)
    assert crashed["status"] == "FAIL" and "illegal memory access" in crashed["error"]


def test_a_check_process_that_hangs_is_a_fail(tmp_path):
    res = sw.check_in_subprocess("default", "smoke", 5, tmp_path / "checks", tmp_path / "ref", "cpu", timeout=0.5)
    assert res["status"] == "FAIL" and "timed out" in res["error"]
    assert json.loads(sw.check_file(tmp_path / "checks", "default", "smoke", 5).read_text())["status"] == "FAIL"


def test_a_failed_variant_gets_fail_rows_and_never_enters_the_table(tmp_path, monkeypatch):
    """The sweep reads each variant's check: a FAIL is recorded with its error and not timed;
    the best-measured table is made of checked variants only."""
    from benchmarks import check

    checks = tmp_path / "checks"
    for name, status, err in (("default", "PASS", ""), ("cfg:bm64", "FAIL", "out: max err 3 > bound 0.01")):
        check.write_result(sw.check_file(checks, name, "smoke", 5),
                           dict(status=status, error=err, T=5, tensors={"out": dict(err=1e-6, bound=1e-5, passed=True)}))
    meta = harness.run_metadata(torch.device("cpu"), ["test"])
    rec = sw.TaggedRecorder(meta, tmp_path / "out")
    timing = harness.TimingConfig(cpu_reps=1)
    done = sw.run_sweep("smoke", 5, torch.device("cpu"), torch.float32, rec, timing, ["default", "cfg:bm64"], [],
                        checks=checks)
    rec.close()
    assert done == ["default", "cfg:bm64"]
    fail = [r for r in rec.rows if r.get("variant") == "cfg:bm64"]
    assert fail and all(r["status"] == "fail" and "out: max err 3" in r["note"] and not r.get("ms") for r in fail)
    assert all(r["check"] == "FAIL" for r in fail)
    ok = [r for r in rec.rows if r.get("variant") == "default" and r["status"] == "ok"]
    assert ok and all(r["check"] == "PASS" for r in ok)
    # a FAIL variant never enters the table, even with a (stale) timed row of it beside
    stale = dict(ok[0], variant="cfg:bm64", provider="triton:cfg:bm64", ms=ok[0]["ms"] / 100, check="PASS")
    table, notes = sw.best_table(rec.rows + [stale], "CPU")
    assert table is not None and "best default" in " ".join(notes)
    assert "cfg:bm64" not in next(iter(table["measured_ms"].values()))


# ----------------------------------------------------------------------------- the GPU image's Triton
def test_interpreter_tier_skips_on_triton_36_with_numpy_25():
    """Issue 22 item 6 (4): the GPU image's Triton 3.6 + NumPy 2.5 cannot interpret the GEMM
    kernels; the interpreter tier reports those tests as skipped with the reason."""
    from helpers import interpreter_unsupported, is_interpreter_failure

    why = interpreter_unsupported("3.6.0", "2.5.0")
    assert why and "Triton 3.6.0" in why and "3.7" in why
    assert interpreter_unsupported("3.7.0", "2.5.0") is None and interpreter_unsupported("3.6.0", "2.3.1") is None
    ns: dict = {}
    exec(compile("def kernel():\n    raise TypeError('only integer scalar arrays')\n",
                 "/x/flexmoe_kernels/ops/triton/grouped_gemm_kernels.py", "exec"), ns)
    try:
        try:
            ns["kernel"]()
        except TypeError as exc:
            raise RuntimeError("launch failed") from exc
    except RuntimeError as exc:
        assert is_interpreter_failure(exc)
    assert not is_interpreter_failure(ValueError("an ordinary bug"))


def test_liger_peer_travels_and_is_checked_and_timed(tmp_path, inventory):
    """Issue 22 item 7: with Liger's wheel in .whl/ the session checks and times it beside the
    variants (its check in the warm-up, --peers in both layer steps), within the 540 s."""
    (tmp_path / gs.WHEEL_DIR).mkdir()
    assert gs.carried_peers(tmp_path) == []
    _wheel(tmp_path / gs.WHEEL_DIR, "liger_kernel", ["torch>=2.1.2", "triton>=2.3.1"])
    assert gs.carried_peers(tmp_path) == ["liger_fused_moe"]
    inv = dict(inventory, peers=["liger_fused_moe"],
               checks=inventory["checks"] + [dict(name="liger_fused_moe", preset=pn, T=T, check_tokens=0, env={},
                                                  pinned=None) for pn, T in sw.TARGET_SHAPES.items()])
    steps = {s.name: s for s in gs.plan_steps(inv=inv, peers=["liger_fused_moe"])}
    assert "--providers liger_fused_moe" in steps["warm"].argvs[0][-1]
    for pn in sw.TARGET_SHAPES:
        argv = steps[f"layer-{pn}"].argvs[0]
        assert argv[argv.index("--peers") + 1] == "liger_fused_moe"
    assert gs.wall_budget(list(steps.values())) + gs.KILL_GRACE_S <= gs.TOTAL_BUDGET_S
    assert gs.estimates(inv, 1)["warm"][0] > gs.estimates(inventory)["warm"][0]
    assert "LIGER_FUSED_MOE_AUTOTUNE" in gs.child_env()


@pytest.mark.slow
def test_sweep_restarts_after_a_sticky_cuda_error(tmp_path):
    """A CUDA error that leaves the timing process unusable (simulated after ``default``) ends
    that process; the parent starts a new one for the variants left, and merges both parts."""
    from benchmarks import check

    checks, out = tmp_path / "checks", tmp_path / "sweep"
    for name in ("default", "atomic"):
        check.write_result(sw.check_file(checks, name, "smoke", 5), dict(status="PASS", error="", T=5, tensors={}))
    env = {**os.environ, "TRITON_INTERPRET": "1", sw._TEST_STICKY_ENV: "default"}
    cmd = [sys.executable, "-m", "benchmarks.gpu_sweep", "layer", "--preset", "smoke", "--tokens", "5", "--device",
           "cpu", "--variants", "default,atomic", "--baselines", "", "--checks", str(checks), "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restarting after a CUDA error" in r.stdout
    assert (out / "part1").is_dir() and (out / "part2").is_dir() and not (out / "part3").exists()
    _, rows = harness.load_results(out)
    got = {(x["variant"], x["mode"]) for x in rows if x["status"] == "ok" and x["mask"] == "none"}
    assert got == {("default", "fwd"), ("default", "fwd_bwd"), ("atomic", "fwd"), ("atomic", "fwd_bwd")}


_KEYS_MATCH = r'''
import os, sys, tempfile
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
from benchmarks import gpu_sweep as sw
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

launches = [l for l, _ in sw.kernel_launches({"smoke": 64}).values()][:4]
sw._AOT_LAUNCHES[:] = launches
done, failed = sw._aot_worker((list(range(len(launches))), 90))
assert done == len(launches) and not failed, failed
cache = os.environ["TRITON_CACHE_DIR"]
before = set(os.listdir(cache))

class FakeDriver:  # what JITFunction.run asks the driver for before it compiles
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0

driver.set_active(FakeDriver())
for l in launches:
    l.fn.warmup(*l.args, grid=l.grid, **l.kwargs)  # the JIT's own path, without the launch
print("NEW", len(set(os.listdir(cache)) - before), "OF", len(launches))
'''


def test_aot_warm_up_fills_the_cache_the_jit_reads():
    """The warm-up's ahead-of-time compile (triton.compile through the launch binder) writes the
    cache entries Triton's JIT looks up for the same launches: JIT warm-up (its launch path up to
    the launch itself, with a stand-in sm_90 driver) compiles nothing new."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", _KEYS_MATCH], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NEW 0 OF 4" in r.stdout, r.stdout
