"""The budgets of the prepared GPU session (:mod:`benchmarks.gpu_session`), from measurements:
the measured constants, each step's estimate from the sweep's inventory, and the budget (the
estimate + 15 %) the plan gives it. Standard library only (the dry run runs anywhere).
"""
from __future__ import annotations

# Every budget is estimated from the kernel count and measured times.
COMPILE_S_PER_KERNEL = 2.0  # one kernel, one core: measured here (Triton 3.9, sm_90a, cold cache, a shared
#   2-core CPU): FlexOlmo-7x7B's 12 distinct kernels 18.5 s (1.54 s mean, 2.87 s max); fine-grained up 4.5 s,
#   dW 2.4 s, scatter 2.0 s; KERNEL_NOTES: 0.8-1.9 s, Triton 3.6 about half of 3.9's time
FALLBACK_KERNELS = 116  # the count recorded at 5c0f3e0-era code (used when it cannot be recorded)
PROCESS_START_S = 8.0  # a fresh Python process: torch + flexmoe_kernels imports, CUDA context (assumed)
GPU_CORES = 16  # the GPU machine's CPU cores
TEST_WORKERS = 4  # pytest -n
AOT_JOBS = GPU_CORES - TEST_WORKERS - 2  # ahead-of-time compile processes beside the tests (2 cores spare)
CHECK_JOBS = 8  # self-check processes at once (GPU memory: ~7 GB each at FlexOlmo-7x7B's slice: bf16 weights,
#   their gradients and one float32 tensor at a time; 8 x 7 GB beside the tests fits 80 GB)
REFERENCE_S = 12.0  # one shape's float64 reference + torch bf16 run at the check slice (assumed)
CHECK_S = 6.0  # one self-check at its slice with the kernels cached (inputs, two fwd+bwd, compare)
RECORD_S = 6.0  # recording every variant's launches (measured here: 2.9-5.1 s)
ROW_S = {"fine-grained": 0.6, "flexolmo-7x7b": 1.6}  # one do_bench row (25 ms warm-up, --rep-ms, L2 clears)
CASE_S = {"fine-grained": 1.0, "flexolmo-7x7b": 2.5}  # a variant's weights, inputs and probe call
BASELINE_ROWS = 8  # cuda, cuBLAS, grouped_mm x fwd / fwd_bwd, cuda with token_all
TEST_KERNELS = 140  # the gpu subset's distinct kernels (assumed: ~60 counted before the v3 kernels + 6 training configs x 13)
TEST_RUN_S = 45.0  # the subset's own run time once compiled (assumed)
SETUP_TIMEOUTS = {"nvidia-smi": 10, "pip install": 20, "import check + versions": 30}  # setup's subprocesses
E2E_MODELS_N, E2E_STEP_S, E2E_INIT_S = 4, 0.4, 8.0  # e2e-small: models, s per step (13 steps), DeepSpeed init
PEER_KERNELS = 12  # a peer's kernels at one shape, JIT-compiled in its check (Liger, autotuning off: 3 routing,
#   up, down, gather-sum, 4 backward; not in the AOT warm-up)


def _ceil5(x: float) -> int:
    return int(-(-x // 5) * 5)


def _n_checks(inv: dict) -> int:
    return len(inv.get("checks") or []) or 2 * 11


def estimates(inv: dict, peers: int = 0) -> dict:
    """{step: (seconds, how)}: each step's estimate from the inventory (kernel count, variants
    and checks per shape; :func:`benchmarks.gpu_sweep.inventory`) and the measured constants above."""
    n_k = inv.get("kernels") or FALLBACK_KERNELS
    n_chk = _n_checks(inv)
    waves_k = -(-n_k // AOT_JOBS)
    aot = PROCESS_START_S + RECORD_S + waves_k * COMPILE_S_PER_KERNEL
    refs = len(inv.get("shapes") or TARGET_PRESETS) * REFERENCE_S
    peer_compile = PEER_KERNELS * COMPILE_S_PER_KERNEL if peers else 0.0
    n_peer = len([c for c in inv.get("checks") or [] if c.get("name") in PEER_NAMES])
    one, one_peer = PROCESS_START_S + CHECK_S, PROCESS_START_S + CHECK_S + peer_compile
    slots = (n_chk - n_peer) * one + n_peer * one_peer  # process-seconds of all checks
    check = PROCESS_START_S + refs + max(-(-slots // CHECK_JOBS), one_peer if n_peer else one)
    per_kernel_check = (n_k / max(1, n_chk)) * COMPILE_S_PER_KERNEL
    out = {
        "setup": (sum(SETUP_TIMEOUTS.values()),
                  "sum of its subprocess timeouts: " + ", ".join(f"{k} {v} s" for k, v in SETUP_TIMEOUTS.items())
                  + " (a rebuild of _C gets what is left)"),
        "warm": (aot + check,
                 f"AOT compile: start {PROCESS_START_S:g} + record {RECORD_S:g} + ceil({n_k} kernels / {AOT_JOBS} jobs)"
                 f" x {COMPILE_S_PER_KERNEL:g} s = {aot:.0f} s; self-checks: start {PROCESS_START_S:g} + references "
                 f"{refs:.0f} + ({n_chk - n_peer} checks x ({PROCESS_START_S:g} + {CHECK_S:g})"
                 + (f" + {n_peer} peer checks x (+ {PEER_KERNELS} kernels x {COMPILE_S_PER_KERNEL:g} s)" if n_peer else "")
                 + f") / {CHECK_JOBS} jobs = {check:.0f} s (if the AOT cache missed: + ~{per_kernel_check:.0f} s "
                   "per check)"),
        "tests": (PROCESS_START_S + TEST_KERNELS * COMPILE_S_PER_KERNEL / TEST_WORKERS + TEST_RUN_S,
                  f"start {PROCESS_START_S:g} + {TEST_KERNELS} kernels x {COMPILE_S_PER_KERNEL:g} s / {TEST_WORKERS} "
                  f"workers + run {TEST_RUN_S:g} s"),
    }
    for pn in TARGET_PRESETS:
        n_v = len((inv.get("variants") or {}).get(pn) or []) or 11
        rows = 2 * (n_v + peers) + 2 + BASELINE_ROWS  # fwd, fwd_bwd each; the default also with token_all
        sec = 2 * PROCESS_START_S + (n_v + peers) * CASE_S[pn] + rows * ROW_S[pn] + PROCESS_START_S
        out[f"layer-{pn}"] = (sec, f"parent + child start {2 * PROCESS_START_S:g} + {n_v + peers} variants/peers x case "
                                   f"{CASE_S[pn]:g} s + {rows} rows x {ROW_S[pn]:g} s + one restart {PROCESS_START_S:g} s")
    out["routing"] = (30.0, "fixed: 2 presets x 2 T x 3 routers x 2 masks + the copy, ~1 s each, + start")
    e2e = PROCESS_START_S + E2E_MODELS_N * (E2E_INIT_S + 13 * E2E_STEP_S)
    out["e2e"] = (e2e, f"start {PROCESS_START_S:g} + {E2E_MODELS_N} models x (init {E2E_INIT_S:g} + 13 steps x "
                       f"{E2E_STEP_S:g} s)")
    out["finalize"] = (15.0, "fixed: merge, summary, plots, table")
    return out


TARGET_PRESETS = ("fine-grained", "flexolmo-7x7b")
PEER_NAMES = ("liger_fused_moe",)


def _budget(step: str, est: float) -> int:
    """A step's budget from its estimate: 15% margin, rounded up to 5 s (setup: its timeouts)."""
    return int(est) if step == "setup" else _ceil5(est * 1.15)
