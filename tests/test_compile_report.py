"""CI compile tier (issue 13 item 8): the compile report of the two target shapes on sm_90a,
no GPU needed.

``python -m benchmarks.compile_report --arch sm_90a --preset P --tokens T --json FILE`` runs
once per preset in a subprocess (module-scoped fixture; the subprocess has no
``TRITON_INTERPRET``, which conftest sets for this process) and the tests read its JSON:

* met today: every GEMM kernel uses wgmma, no GEMM kernel spills, every kernel fits the
  H100's 227 KB of shared memory per block, every GEMM has >= 3 pipeline buffers (the dW
  kernel since it prefetches its pair ids a k-step ahead: issue 13 item 3), the forward GEMMs
  (and dX) read their weights through TMA descriptors with a 4-deep ring (issue 13 item 1),
  no kernel spills (routing and combine included).
* issue 22 (kernels v3): no GEMM's wgmma is serialised (``wgmma_serialized``: ptxas C7515 or a
  full wait after every HGMMA; both dW kernels were, while their TMA-loaded operand was masked
  in registers), and no GEMM makes a TMA descriptor on the device (``dev_desc_launch`` = 0:
  the weights' and dW's descriptors come from the host, ``host_desc`` >= 1 per TMA GEMM).

Skips with the reason when Triton's NVIDIA backend or a ptxas is missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.kernel_compile import compile_env  # noqa: E402

SMEM_LIMIT_SM90 = 232448  # 227 KB per block
TARGETS = {"fine-grained": 32768, "flexolmo-7x7b": 16384}
FIELDS = {"kernel": str, "phase": str, "gemm": bool, "mma": str, "tma": bool, "buffers": int,
          "registers": int, "spill_bytes": int, "smem_bytes": int, "wgmma_serialized": bool,
          "device_descriptors": int, "dev_desc_launch": int, "host_desc": int}


def _toolchain_or_skip() -> None:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - no Triton / other Triton versions
        pytest.skip(f"Triton's NVIDIA backend is unavailable: {exc}")
    from benchmarks.kernel_compile import find_ptxas

    path, why = find_ptxas(90)
    if path is None:
        pytest.skip(f"no ptxas: {why}")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.compile_report", *args], env=compile_env(REPO),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def report(request, tmp_path_factory):
    """``(preset, stdout, rows)`` of one compile report per preset (shared by the tests)."""
    _toolchain_or_skip()
    preset = request.param
    out = tmp_path_factory.mktemp("compile_report") / f"{preset}.json"
    r = _cli("--arch", "sm_90a", "--preset", preset, "--tokens", str(TARGETS[preset]), "--json", str(out))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    return preset, r.stdout, json.loads(out.read_text())


def _gemms(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["gemm"]]


def test_json_schema_and_launches(report):
    """Every row has the issue's fields with their types; one forward + backward launches the
    routing (3), up, down, combine, the backward's gate/up recompute (bwd_up), the dh GEMM
    (bwd_dh), dX, dX combine, two dW and the routing backward."""
    preset, stdout, rows = report
    for row in rows:
        for name, typ in FIELDS.items():
            assert isinstance(row[name], typ), (name, row)
        assert row["phase"] in ("fwd", "bwd") and row["mma"] in ("wgmma", "mma.sync", "none"), row
        assert row["mma_n"] is None or isinstance(row["mma_n"], int), row
        assert (row["mma_n"] is not None) == (row["mma"] == "wgmma"), row
    roles = [(r["phase"], r["role"]) for r in rows]
    assert roles == [("fwd", "route_topk"), ("fwd", "route_prefix"), ("fwd", "route_scatter"), ("fwd", "up"),
                     ("fwd", "down"), ("fwd", "combine"), ("bwd", "bwd_up"), ("bwd", "bwd_dh"), ("bwd", "bwd_dx"),
                     ("bwd", "dx_combine"), ("bwd", "dw_gate_up"), ("bwd", "dw_down"), ("bwd", "route_bwd")]
    assert {r["kernel"] for r in _gemms(rows)} == {"_up_swiglu_kernel", "_dh_swiglu_bwd_kernel",
                                                   "_tile_gemm_scatter_kernel", "_grouped_dw_kernel"}
    assert "triton_moe_NVIDIA_H100.json" in stdout and "ptxas release" in stdout, stdout[:1000]


def test_every_gemm_uses_wgmma(report):
    _, _, rows = report
    assert all(r["mma"] == "wgmma" and r["mma_n"] >= 64 for r in _gemms(rows)), _gemms(rows)
    assert all(r["mma"] == "none" for r in rows if not r["gemm"]), rows


def test_no_gemm_spills(report):
    _, _, rows = report
    assert all(r["spill_bytes"] == 0 and r["registers"] <= 255 for r in _gemms(rows)), _gemms(rows)


def test_shared_memory_fits_h100(report):
    _, _, rows = report
    assert all(0 <= r["smem_bytes"] <= SMEM_LIMIT_SM90 and r["fits"] for r in rows), rows


def test_gemms_are_pipelined(report):
    """What holds today: every GEMM stages its operands through a >= 2-deep ring."""
    _, _, rows = report
    assert all(r["buffers"] >= 2 for r in _gemms(rows)), _gemms(rows)


def test_forward_gemms_read_weights_through_tma(report):
    """Issue 13 items 1 and 8: the forward up / down GEMMs (and the backward's recompute and dX,
    which share their kernels) load the expert weights through TMA descriptors with 4 stages
    (about 196 KB of shared memory: it fits); kernels without a tl.dot do not use TMA."""
    _, _, rows = report
    fwd = [r for r in _gemms(rows) if r["phase"] == "fwd"]
    assert fwd and all(r["tma"] for r in fwd), fwd
    four = [r for r in rows if r["role"] in ("up", "down", "bwd_up", "bwd_dx")]
    assert len(four) == 4 and all(r["tma"] and r["buffers"] >= 4 for r in four), four
    assert not any(r["tma"] for r in rows if not r["gemm"]), rows


def test_every_gemm_has_three_buffers(report):
    """Issue 13 items 3 and 8: every GEMM's operand ring is >= 3 deep (dW included)."""
    _, _, rows = report
    assert all(r["buffers"] >= 3 for r in _gemms(rows)), [(r["role"], r["buffers"]) for r in _gemms(rows)]


def test_no_gemm_serialises_its_wgmma(report):
    """Issue 22 item 1: every GEMM's wgmma are pipelined (no ptxas C7515, no full
    ``WARPGROUP.DEPBAR`` after each HGMMA); the dW kernels read their TMA operand straight
    from shared memory into the wgmma (4 buffers at 4 stages)."""
    _, _, rows = report
    bad = [(r["role"], r.get("wgmma_serialized_by")) for r in _gemms(rows) if r["wgmma_serialized"]]
    assert not bad, bad
    assert not any(r["wgmma_serialized"] for r in rows), rows
    dw = [r for r in rows if r["role"] in ("dw_gate_up", "dw_down")]
    assert len(dw) == 2 and all(r["tma"] and r["buffers"] >= 4 for r in dw), dw


def test_no_device_side_descriptors(report):
    """Issue 22 item 2: the default configuration makes no TMA descriptor on the device (each
    was ~15 tensormap.replace + a global copy + a fence per program: 43,500 per fine-grained
    forward layer); the TMA GEMMs get theirs from the host (up: gate and up views; down, dh,
    dX: the weight; dW: its slot-ordered operand)."""
    _, _, rows = report
    assert all(r["device_descriptors"] == 0 and r["dev_desc_launch"] == 0 for r in rows), \
        [(r["role"], r["device_descriptors"], r["dev_desc_launch"]) for r in rows]
    want = {"up": 2, "bwd_up": 2, "down": 1, "bwd_dh": 1, "bwd_dx": 1, "dw_gate_up": 1, "dw_down": 1}
    assert {r["role"]: r["host_desc"] for r in _gemms(rows)} == want, rows
    assert all(r["host_desc"] == 0 for r in rows if not r["gemm"]), rows


def test_no_kernel_spills(report):
    """Routing and combine kernels too (the prefix scan spilled 24 B at E = 7 until it computed
    its exclusive prefix from a reverse scan)."""
    _, _, rows = report
    assert all(r["spill_bytes"] == 0 for r in rows), [(r["role"], r["spill_bytes"]) for r in rows]


@pytest.mark.parametrize("args,named", [
    (("--arch", "sm_99"), "sm_99"),
    (("--preset", "no-such-preset"), "no-such-preset"),
])
def test_cli_errors_name_the_bad_value(args, named):
    r = _cli(*args, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert named in r.stderr and "known:" in r.stderr, r.stderr


def test_sass_serialisation_reader():
    """``wgmma_serialized`` from the SASS (no toolchain needed): every HGMMA followed by a full
    wait (the dW kernels before issue 22) vs HGMMAs grouped under one wait that leaves one group
    in flight (a pipelined loop); no HGMMA: not serialised."""
    from benchmarks.kernel_compile import sass_wgmma_serialized

    serial = """
        /*30c0*/   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR8].tnspB, R24, gsb0 ;
        /*30f0*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*3150*/   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR8].tnspB, R24, gsb0 ;
        /*3190*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
    """
    pipelined = """
        /*2b40*/   WARPGROUP.ARRIVE ;
        /*2b50*/   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12].tnspA.tnspB, R24 ;
        /*2ba0*/   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12].tnspA.tnspB, R24, gsb0 ;
        /*2c90*/   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*33c0*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
    """
    assert sass_wgmma_serialized(serial) is True
    assert sass_wgmma_serialized(pipelined) is False
    assert sass_wgmma_serialized("        /*0010*/   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;") is False
