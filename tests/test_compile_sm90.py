"""Compile tier of the Triton ops: every kernel compiled (not run) for sm_90 with the real
Triton compiler, no GPU needed.

Each test runs a script in a fresh interpreter without ``TRITON_INTERPRET`` (the interpreter
patches ``triton.language`` in-process). The script records the launches the op's launchers
make on CPU tensors and compiles each for sm_90 with the machinery of
``benchmarks/kernel_compile.py`` (:class:`LaunchRecorder`, :func:`compile_launch`,
:func:`read_kernel`; the per-layer report built on it is ``tests/test_compile_report.py``).

* routing (``ops/triton/routing.py``): every routing kernel, as launched, compiles;
* grouped GEMMs (``ops/triton/grouped_gemm.py``): every kernel variant with the configs the
  shipped H100 table / heuristics choose compiles, its GEMM loops are software-pipelined
  (async copies) and use wgmma for 64+-row tiles, the shared memory fits the H100 (227 KiB
  per block), and (where a ptxas runs) no register spills.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.kernel_compile import compile_env  # noqa: E402

_ROUTING_SCRIPT = r"""
import torch
from benchmarks.kernel_compile import LaunchRecorder, compile_launch
from flexmoe_kernels.ops.triton import routing as tr

n = 0
for T, E, K, dtype, bm in [(32768, 128, 8, torch.bfloat16, 64), (16384, 7, 5, torch.bfloat16, 128),
                           (5, 3, 2, torch.float16, 16), (9, 4, 4, torch.float32, 1),
                           (8, 128, 8, torch.bfloat16, 64)]:
    with LaunchRecorder() as rec:
        plan = tr.triton_route(torch.empty(T, E, dtype=dtype), K, allow_mask=torch.ones(T, E, dtype=torch.bool),
                               expert_bias=torch.empty(E), norm_topk_prob=True, block_m=bm, validate=False)
        tr.triton_route_backward(torch.empty(T, K, dtype=dtype), plan, norm_topk_prob=True)
    fused = T <= tr.routing_config(T, E, K, bm).block_t
    assert len(rec.launches) == (2 if fused else 4), [l.name for l in rec.launches]
    for launch in rec.launches:
        out, _ = compile_launch(launch, 90)
        assert out.asm.get("cubin"), launch.name
        print("compiled", launch.name, T, E, K, bm, flush=True)
        n += 1
print("total", n)
"""

_GEMM_SCRIPT = r"""
import os
import torch
from benchmarks.kernel_compile import (GEMM_KERNELS, compile_launch, find_ptxas, host_descriptors, library_configs,
                                       read_kernel, record_layer)

ptxas, _ = find_ptxas(90)
done = set()
for (T, D, F, E, K, dtype, dets, pin) in [(16384, 4096, 11008, 7, 5, torch.bfloat16, (True, False), ""),
                                          (32768, 2048, 768, 128, 8, torch.bfloat16, (True,), ""),
                                          (16384, 4096, 11008, 7, 5, torch.bfloat16, (True,), "host_desc=0"),
                                          (32768, 2048, 768, 128, 8, torch.bfloat16, (True,), "host_desc=0"),
                                          (8, 4096, 11008, 7, 5, torch.bfloat16, (True,), ""),
                                          (256, 4096, 11008, 7, 5, torch.float16, (True,), ""),
                                          (4096, 512, 1024, 8, 2, torch.float32, (True,), "")]:
    os.environ["FLEXMOE_TRITON_CONFIG"] = pin
    cfgs = library_configs(T, D, F, E, K, dtype, "NVIDIA H100 80GB HBM3")
    for det in dets:
        launches = record_layer(T, D, F, E, K, dtype, cfgs, deterministic=det,
                                trainable_experts=torch.ones(E, dtype=torch.bool))
        launches = [l for l in launches if l.name in GEMM_KERNELS + ("_combine_kernel",)]
        assert launches, "no launch was recorded"
        for launch in launches:
            kw = launch.kwargs
            assert kw.get("INTERPRET", False) is False
            out, key = compile_launch(launch, 90)
            if key in done:
                continue
            done.add(key)
            assert out.asm.get("cubin"), launch.name
            what = (launch.name, T, D, F, E, K, str(dtype), kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw.get("BLOCK_K"),
                    pin)
            assert out.metadata.shared <= 232448, (what, out.metadata.shared)
            ttgir = out.asm["ttgir"]
            if launch.name in ("_up_swiglu_kernel", "_tile_gemm_scatter_kernel", "_dh_swiglu_bwd_kernel") \
                    and not kw.get("PERSISTENT"):  # issue 22: a dead tile returns before descriptor / barrier work
                first_return = ttgir.find("tt.return")
                for op in ("ttng.init_barrier", "ttng.tensormap_create"):
                    assert ttgir.find(op) == -1 or ttgir.find(op) > first_return, ("work before the dead-tile exit",
                                                                                   op, what)
            if launch.name != "_combine_kernel":
                assert "async_copy_global_to_local" in ttgir, ("GEMM loop not pipelined", what)
                if kw["BLOCK_M"] >= 64 and dtype != torch.float32:
                    assert "warp_group_dot" in ttgir, ("no wgmma", what)
            if dtype != torch.float32:
                usage = read_kernel(out, ptxas)
                if ptxas:  # the tensor-core path must not touch local memory
                    assert usage["spill_bytes"] == 0 and usage["stack_bytes"] == 0, ("register spills", what, usage)
                # issue 22: wgmma pipelined (no ptxas C7515 / full wait after each HGMMA), and the
                # TMA descriptors from the host (none made on the device) unless host_desc=0
                assert not usage["wgmma_serialized"], ("serialised wgmma", what, usage["wgmma_serialized_by"])
                tma = kw.get("TMA", kw.get("A_TMA", False))
                if tma and not pin:
                    assert usage["device_descriptors"] == 0 and host_descriptors(launch) >= 1, (what, usage)
                elif tma:  # host_desc=0: made on the device, one per weight view / dW operand
                    want = 2 if launch.name == "_up_swiglu_kernel" else 1
                    assert usage["device_descriptors"] == want and host_descriptors(launch) == 0, (what, usage)
            print("compiled", *what, "shared", out.metadata.shared, flush=True)
"""


def _run_script(script: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], env=compile_env(REPO), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _need_nvidia_backend():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except Exception as exc:  # pragma: no cover - other Triton versions / no NVIDIA backend
        pytest.skip(f"triton NVIDIA backend or launch binder unavailable: {exc}")


def test_routing_kernels_compile_for_sm90():
    """Compile (not run) every routing kernel exactly as the launchers launch it, for sm_90,
    with the real Triton compiler: catches code the interpreter accepts but the compiler rejects."""
    _need_nvidia_backend()
    r = _run_script(_ROUTING_SCRIPT, 600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "total 14" in r.stdout, r.stdout


@pytest.mark.slow
def test_grouped_gemm_kernels_compile_for_sm90():
    """Compile (not run) every grouped-GEMM kernel variant the launchers launch for sm_90, with
    the configs the H100 table / heuristics choose: pipelined, wgmma, fits shared memory, no spills."""
    _need_nvidia_backend()
    r = _run_script(_GEMM_SCRIPT, 900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert r.stdout.count("compiled") >= 15, r.stdout
