"""The prepared GPU session (issue 13 item 10): its plan, driver, set-up and finalisation.

    bash benchmarks/gpu_session.sh OUT_DIR              # on the GPU machine: the whole session
    bash benchmarks/gpu_session.sh --dry-run [--check]  # anywhere: the plan and the prerequisites

The driver runs the steps of :func:`plan_steps` one after the other (a ``background`` step
runs beside the step that follows it), each until its scheduled end: step i must end by
``start + sum of the budgets of the steps up to i``, so time a step leaves unused goes to the
next ones and the whole run never passes :data:`TOTAL_BUDGET_S`. A step still running at its
end gets SIGINT (pytest and the benchmarks then write what they have), then SIGKILL. After
every step the driver writes ``OUT_DIR/steps.json`` and re-packs the work folder into
``OUT_DIR/session.tar.gz``, so a run cut short still returns its partial results.

What comes back (at most 8 files, the device tool's limit): ``log.txt`` (everything, via the
shell's tee), ``junit.xml``, ``steps.json``, ``session.tar.gz`` (per-step results, harness logs,
plots), and from :func:`cmd_finalize`: ``results.json``, ``results.csv``, ``summary.md`` and
the best-measured table ``triton_moe_<DEVICE>.json``.

Only the standard library is imported here at module level: the plan and the checks run on
any machine (``--dry-run``); the set-up runs before the carried wheels are installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 540  # 9 minutes, kernel compilation included
DEVICE_TIMEOUT_S = 560  # the device tool's timeout_s for the one call
WHEEL_DIR = ".whl"
EXT_DIR = ".gpu_ext"
EXT_FILE = "flexmoe_kernels/_C.cpython-312-x86_64-linux-gnu.so"
SITE = "/tmp/flexmoe-site"  # the carried wheels are installed here (first on PYTHONPATH)
WORK = "/tmp/flexmoe-gpu-session"  # per-step outputs; packed into OUT_DIR/session.tar.gz
TRAVEL_LIMIT = 64 * 2**20
KILL_GRACE_S = 10
SHAPES = "fine-grained:32768,flexolmo-7x7b:16384"  # the two target shapes (gpu_sweep.TARGET_SHAPES)

# What deepspeed needs that the image lacks (KINDS.md lists the image's packages); the
# prepare script downloads exactly these (deepspeed itself is built from its sdist).
REQUIRED_WHEELS = ("deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types",
                   "typing_inspection", "typing_extensions")
# The GPU image's Python packages (KINDS.md, "Python packages already there"), normalised.
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# The gpu tier's essentials: bf16 correctness of every backend and Triton variant against the
# float64 reference (the layer's contract test), CUDA-graph replay with a new mask, no host
# sync, and the CUDA extension's tests (build/import checks and its kernels on the GPU).
TEST_SUBSET = (
    "tests/test_layer.py::test_gpu_bf16_error_within_2x_torch",
    "tests/test_layer.py::test_gpu_cuda_graph_replay_with_new_mask_and_inputs",
    "tests/test_layer.py::test_gpu_no_host_synchronisation_in_forward_and_backward",
    "tests/test_layer.py::test_gpu_auto_resolves_to_an_available_backend",
    "tests/test_routing.py::test_gpu_cuda_graph_replay_with_new_mask_and_logits",
    "tests/test_routing.py::test_cuda_router_forward_matches_reference",
    "tests/test_combine.py::test_cuda_combine_matches_reference",
    "tests/test_combine.py::test_cuda_combine_int64_row_offsets",
    "tests/test_permute.py::test_cuda_gather_rows_matches_reference",
    "tests/test_permute.py::test_cuda_gather_int64_row_offsets",
    "tests/test_cuda_build.py",
    "tests/test_gpu_training_size.py",  # 128-row tiles, BLOCK_N 256, dW via TMA, persistent, keep_preact, interleave
)


@dataclass
class Step:
    name: str
    budget_s: int
    what: str
    argvs: list = field(default_factory=list)  # commands run concurrently
    background: bool = False  # runs beside the next step (counted once in the wall budget)
    estimate: str = ""  # how the budget was estimated (printed by the dry run)


# ----------------------------------------------------------------------------- budgets from measurements
# Issue 22 item 6: every budget is estimated from the kernel count and measured times.
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
TEST_KERNELS = 140  # the gpu subset's distinct kernels (assumed: ~60 before issue 22 + 6 training configs x 13)
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


def _test_argv(py: str, out: str, plugins=None) -> list:
    """The pytest command; ``plugins`` (default: those importable here) among xdist and
    pytest_timeout, both in the GPU image: 4 workers compile Triton kernels at once (one core
    each), and no test may take more than 150 s."""
    if plugins is None:
        plugins = [m for m in ("xdist", "pytest_timeout") if importlib.util.find_spec(m) is not None]
    argv = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out}/junit.xml"]
    argv += ["-n", str(TEST_WORKERS)] if "xdist" in plugins else []
    argv += ["--timeout", "150"] if "pytest_timeout" in plugins else []
    return argv + list(TEST_SUBSET)


def plan_steps(out: str = "OUT_DIR", work: str = WORK, py: str = "python3",
               plugins=("xdist", "pytest_timeout"), inv: dict | None = None, peers=()) -> list:
    """The session's steps, in order, with their budgets (seconds, from :func:`estimates` of
    ``inv``, the sweep's inventory) and commands (``plugins``: the pytest plugins to use, as in
    :func:`_test_argv`; the dry run shows the GPU image's). ``peers``: peer providers checked
    and timed beside the variants (e.g. ``liger_fused_moe``, when its wheel is carried)."""
    inv = inv or {}
    est = estimates(inv, len(peers))
    b = {k: _budget(k, v[0]) for k, v in est.items()}
    b["tests"] = max(b["tests"], b["warm"])  # the warm-up runs beside the tests and ends with them
    how = {k: v[1] for k, v in est.items()}
    run = [py, "-m", "benchmarks.run", "--no-progress", "--no-plots"]
    sweep = [py, "-m", "benchmarks.gpu_sweep"]
    e2e = [*run, "--bench", "e2e", "--e2e-presets", "e2e-small", "--e2e-models", "all"]
    checks = f"{work}/checks"
    peer_args = ["--peers", ",".join(peers)] if peers else []
    layer = [*sweep, "layer", "--checks", checks, *peer_args, "--preset"]
    warm_cmd = (f"{py} -m benchmarks.gpu_sweep compile --aot --jobs {AOT_JOBS} --shapes {SHAPES}; "
                f"{py} -m benchmarks.gpu_sweep check --all --jobs {CHECK_JOBS} --shapes {SHAPES} --checks {checks}"
                + (f" --providers {','.join(peers)}" if peers else ""))
    return [
        Step("setup", b["setup"], "install the carried wheels, link flexmoe_training, put the prebuilt _C in place "
             "(rebuilt for sm_90a only within what is left of the budget), print the GPU and the versions",
             [[py, "-m", "benchmarks.gpu_session", "setup"]], estimate=how["setup"]),
        Step("warm", b["warm"], "beside the tests: compile every distinct kernel of the sweep ahead of time "
             "(triton.compile, no GPU), then self-check every variant (and peer) against the reference, one "
             "process each; and one short e2e run (the e2e models' kernels)",
             [["bash", "-c", warm_cmd], [*e2e, "--e2e-steps", "1", "--out", f"{work}/warm-e2e"]], background=True,
             estimate=how["warm"]),
        Step("tests", b["tests"], "pytest: the gpu tier's essentials (bf16 every backend/variant vs reference, "
             "training-size configs, graph replay with a new mask, no host sync, the CUDA extension's tests) -> "
             "junit.xml", [_test_argv(py, out, plugins)], estimate=how["tests"] + " (and >= the warm-up beside it)"),
        Step("layer-fine-grained", b["layer-fine-grained"], "variant sweep, fwd and fwd+bwd, T 32768, beside cuda, "
             "cuBLAS GEMM of equal FLOPs and torch grouped_mm; a variant that failed its check gets FAIL rows, "
             "not times", [[*layer, "fine-grained", "--tokens", "32768", "--out", f"{work}/layer-fine-grained"]],
             estimate=how["layer-fine-grained"]),
        Step("layer-flexolmo-7x7b", b["layer-flexolmo-7x7b"], "the same at T 16384 (300 ms do_bench budget: "
             "~100 ms calls)", [[*layer, "flexolmo-7x7b", "--tokens", "16384", "--rep-ms", "300",
                                 "--out", f"{work}/layer-flexolmo-7x7b"]], estimate=how["layer-flexolmo-7x7b"]),
        Step("routing", b["routing"], "routers vs the device copy, both presets, T 16384 and 32768, masks "
             "none/token_all", [[*run, "--bench", "routing", "--presets", "fine-grained,flexolmo-7x7b", "--tokens",
                                 "16384,32768", "--masks", "none,token_all", "--out", f"{work}/routing"]],
             estimate=how["routing"]),
        Step("e2e", b["e2e"], "DeepSpeed training step, e2e-small: dense (equal active params), MoE, "
             "2-expert MoE, FlexOlmo coupled", [[*e2e, "--out", f"{work}/e2e"]], estimate=how["e2e"]),
        Step("finalize", b["finalize"], "merge the results, summary and targets, plots, best-measured config table",
             [[py, "-m", "benchmarks.gpu_session", "finalize", out, work]], estimate=how["finalize"]),
    ]


def wall_budget(steps: list) -> int:
    """Seconds the plan may take: background steps overlap the next step and are not added."""
    return sum(s.budget_s for s in steps if not s.background)


def format_plan(steps: list, inv: dict | None = None) -> str:
    inv = inv or {}
    lines = [f"Prepared GPU session (issue 13 item 10): bash benchmarks/gpu_session.sh OUT_DIR", "",
             f"{'#':>2} {'step':22} {'budget_s':>8}  what"]
    for i, s in enumerate(steps, 1):
        tag = " (bg)" if s.background else ""
        lines.append(f"{i:>2} {s.name + tag:22} {s.budget_s:>8}  {s.what}")
        if s.estimate:
            lines.append(f"{'':36}estimate: {s.estimate}")
        lines += [f"{'':36}$ {' '.join(a)}" for a in s.argvs]
    n_k = inv.get("kernels")
    src = (f"recorded for {inv.get('device_name')}" if n_k else
           f"assumed ({inv.get('kernels_error') or 'not recorded'})")
    lines += ["", f"kernels to compile: {n_k or FALLBACK_KERNELS} distinct Triton kernels ({src}), "
              f"{COMPILE_S_PER_KERNEL:g} s each on one core (measured), {AOT_JOBS} processes"]
    if inv.get("kernels_by_name"):
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in sorted(inv["kernels_by_name"].items())))
    dups = {pn: d for pn, d in (inv.get("duplicates") or {}).items() if d}
    if dups:
        lines.append("duplicate variants cut: " + "; ".join(
            f"{pn}: " + ", ".join(f"{a} (= {b})" for a, b in d) for pn, d in dups.items()))
    if inv.get("checks"):
        lines += ["", "self-checks (each in its own process, before timing; the tests' bf16 rule vs the float64 "
                  "reference; a FAIL is not timed and never enters the table):"]
        for c in inv["checks"]:
            env = ", ".join(f"{k}={v if len(v) < 60 else '(every field of every kind)'}" for k, v in c["env"].items())
            lines.append(f"  check {c['name']:24} {c['preset']:14} T {c['T']:>6}: {c['check_tokens']} tokens with "
                         f"the T {c['T']} configs pinned; {env or 'no variant pin'}")
    total = wall_budget(steps)
    verdict = "<=" if total <= TOTAL_BUDGET_S else "EXCEEDS"
    lines += ["", f"total estimate: {total} s wall ({verdict} the {TOTAL_BUDGET_S} s limit; background steps "
              "run beside the next step and count once; each step may use what earlier ones left)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- prerequisites
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_names(wheel_dir: Path) -> dict:
    """{normalised distribution name: [wheel files]} of ``wheel_dir``."""
    out: dict = {}
    for w in sorted(Path(wheel_dir).glob("*.whl")):
        out.setdefault(_norm(w.name.split("-")[0]), []).append(w)
    return out


def _requires(wheel: Path) -> list:
    """The unconditional requirement names of a wheel (its METADATA's Requires-Dist)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            names.append(_norm(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0]))
    return names


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def travel_bytes(root: Path = ROOT, carry=(WHEEL_DIR, EXT_DIR)) -> int | None:
    """Bytes the device call sends: tracked and untracked-not-ignored files plus ``carry``."""
    try:
        ls = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                            capture_output=True, check=True, timeout=30).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return None
    files = sum(_size(root / f) for f in ls.split("\0") if f)
    return files + sum(_size(root / c) for c in carry)


def _check_wheels(root: Path) -> list:
    found = wheel_names(root / WHEEL_DIR)
    res = []
    missing = [n for n in REQUIRED_WHEELS if _norm(n) not in found]
    doubles = [n for n, ws in found.items() if len(ws) > 1]
    mib = _size(root / WHEEL_DIR) / 2**20
    if missing or doubles:
        res.append((False, f"wheels in {WHEEL_DIR}/: missing {missing}, more than one version of {doubles} "
                    "(run: bash benchmarks/prepare_gpu_session.sh)"))
        return res
    res.append((True, f"wheels in {WHEEL_DIR}/: {len(found)} distributions, {mib:.1f} MiB"))
    unmet = sorted({r for ws in found.values() for r in _requires(ws[0])} - set(found) - IMAGE_PACKAGES)
    res.append((not unmet, "every requirement of the carried wheels is carried or in the GPU image"
                if not unmet else f"requirements neither carried nor in the GPU image: {unmet}"))
    return res


def _check_ext(root: Path) -> tuple:
    so = root / EXT_DIR / EXT_FILE
    if not so.is_file():
        return False, f"prebuilt extension {EXT_DIR}/{EXT_FILE} missing (run: bash benchmarks/prepare_gpu_session.sh)"
    srcs = [p for p in (root / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")]
    stale = [p.name for p in srcs if p.stat().st_mtime > so.stat().st_mtime + 1]
    if stale:
        return False, f"prebuilt extension older than csrc/{stale}: rerun benchmarks/prepare_gpu_session.sh"
    return True, f"prebuilt extension {EXT_DIR}/{EXT_FILE} ({so.stat().st_size / 2**20:.1f} MiB)"


def missing_tests(root: Path = ROOT) -> list:
    """The node ids of :data:`TEST_SUBSET` whose file or test function does not exist."""
    bad = []
    for node in TEST_SUBSET:
        path, _, func = node.partition("::")
        f = root / path
        if not f.is_file() or (func and not re.search(rf"^def {re.escape(func)}\(", f.read_text(), re.M)):
            bad.append(node)
    return bad


def check_prerequisites(root: Path = ROOT) -> list:
    """[(ok, sentence)] of what can be checked without a GPU."""
    res = _check_wheels(root) + [_check_ext(root)]
    n = travel_bytes(root)
    if n is None:
        res.append((True, "travelling size not checked (no git here)"))
    else:
        res.append((n <= TRAVEL_LIMIT, f"travelling tree with {WHEEL_DIR} and {EXT_DIR}: {n / 2**20:.1f} MiB "
                    f"({'<=' if n <= TRAVEL_LIMIT else 'OVER'} 64 MiB)"))
    bad = missing_tests(root)
    res.append((not bad, f"test subset: {len(TEST_SUBSET)} node ids present" if not bad else f"tests not found: {bad}"))
    return res


def stamp_commit(root: Path = ROOT) -> str | None:
    """Write the checkout's commit to ``.gpu_ext/commit.txt`` (the GPU machine has no .git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not (root / EXT_DIR).is_dir():
        return None
    text = sha + ("-dirty" if dirty else "")
    (root / EXT_DIR / "commit.txt").write_text(text + "\n")
    return text


INVENTORY = f"{EXT_DIR}/inventory.json"  # written by --dry-run --check; read by the session (no re-recording)


def load_inventory(root: Path = ROOT, prefer_file: bool = False, timeout: float = 120.0) -> dict:
    """The sweep's inventory (:func:`benchmarks.gpu_sweep.inventory`: variants, duplicates cut,
    self-checks, kernel count), recorded in a fresh process without ``TRITON_INTERPRET`` (the
    launch recorder needs the compiled kernels' JIT functions); ``prefer_file``: the one
    ``--dry-run --check`` saved in :data:`INVENTORY` if present. ``{}`` (the plan's assumed
    figures) when it cannot be had."""
    saved = root / INVENTORY
    if prefer_file and saved.is_file():
        try:
            return json.loads(saved.read_text())
        except ValueError:
            pass
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "benchmarks.gpu_sweep", "inventory"]
    peers = carried_peers(root)
    cmd += ["--peers", ",".join(peers)] if peers else []
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        return json.loads(r.stdout) if r.returncode == 0 else {"kernels_error": (r.stderr.strip().splitlines()
                                                                                or ["?"])[-1][:200]}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"kernels_error": f"{type(exc).__name__}: {exc}"}


def carried_peers(root: Path = ROOT) -> list:
    """Peer providers whose wheel travels in :data:`WHEEL_DIR` (Liger-Kernel's fused MoE)."""
    return ["liger_fused_moe"] if any((root / WHEEL_DIR).glob("liger_kernel-*.whl")) else []


def cmd_plan(args) -> int:
    inv = load_inventory()
    steps = plan_steps(inv=inv, peers=carried_peers())
    print(format_plan(steps, inv))
    print("\nprerequisites (checked here, without a GPU):")
    checks = check_prerequisites()
    for ok, text in checks:
        print(f"  {'OK     ' if ok else 'MISSING'} {text}")
    if args.check:
        sha = stamp_commit()
        print(f"  commit stamped into {EXT_DIR}/commit.txt: {sha}" if sha else "  commit not stamped")
        if (ROOT / EXT_DIR).is_dir() and inv.get("kernels"):
            (ROOT / INVENTORY).write_text(json.dumps(inv, indent=1) + "\n")
            print(f"  inventory saved to {INVENTORY} (the session reads it instead of recording again)")
    print(f"\ndevice call: run(command=\"bash benchmarks/gpu_session.sh $OUT\", carry=[\"{WHEEL_DIR}\", "
          f"\"{EXT_DIR}\"], timeout_s={DEVICE_TIMEOUT_S})")
    over = wall_budget(steps) > TOTAL_BUDGET_S
    return 1 if over or (args.check and not all(ok for ok, _ in checks)) else 0


# ----------------------------------------------------------------------------- the driver
def child_env() -> dict:
    """The environment of every step: the carried wheels first on the path, the repository
    importable, unbuffered output, one Triton cache shared by all processes."""
    env = dict(os.environ)
    paths = [SITE, str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    # Liger's fused MoE autotunes ~250 configs per shape at its first call (minutes of compiling):
    # the session times its single fallback config (documented in benchmarks/README.md).
    env.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
    env.update(PYTHONPATH=":".join(paths), PYTHONUNBUFFERED="1", DS_ACCELERATOR="cuda", MPLBACKEND="Agg",
               TRITON_CACHE_DIR=env.get("TRITON_CACHE_DIR", "/tmp/flexmoe-triton-cache"),
               TOKENIZERS_PARALLELISM="false")
    return env


def _start(step: Step, env: dict) -> list:
    print(f"\n===== step {step.name} (budget {step.budget_s} s) {time.strftime('%H:%M:%S')} =====", flush=True)
    procs = []
    for argv in step.argvs:
        print("$ " + " ".join(argv), flush=True)
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True))
    return procs


def _signal(procs: list, sig) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def _wait(procs: list, deadline: float) -> tuple:
    """Wait until every process ends or ``deadline`` (monotonic); then SIGINT, then SIGKILL.
    Returns (exit codes, timed_out)."""
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    timed_out = any(p.poll() is None for p in procs)
    if timed_out:
        _signal(procs, signal.SIGINT)
        end = time.monotonic() + KILL_GRACE_S
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            time.sleep(0.2)
        _signal(procs, signal.SIGKILL)
    return [p.wait() for p in procs], timed_out


def _record(records: list, step: Step, t_start: float, rcs: list, timed_out: bool, t0: float) -> None:
    now = time.monotonic()
    rec = dict(step=step.name, budget_s=step.budget_s, background=step.background,
               started_s=round(t_start - t0, 1), elapsed_s=round(now - t_start, 1), exit_codes=rcs,
               timed_out=timed_out)
    records.append(rec)
    state = "TIMED OUT (stopped)" if timed_out else f"exit {rcs}"
    print(f"===== step {step.name}: {rec['elapsed_s']} s of {step.budget_s} s, {state}; "
          f"session at {now - t0:.0f} s =====", flush=True)


def snapshot(out: Path, work: Path, records: list) -> None:
    """``steps.json`` and ``session.tar.gz`` (the work folder) into ``out``, after every step."""
    (out / "steps.json").write_text(json.dumps({"total_budget_s": TOTAL_BUDGET_S, "steps": records}, indent=1))
    tmp = out / "session.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        if work.is_dir():
            tar.add(work, arcname="session")
    os.replace(tmp, out / "session.tar.gz")


def run_session(out: Path, work: Path, steps: list, total: int = TOTAL_BUDGET_S) -> list:
    """Run ``steps`` on their schedule (see the module docstring); returns the step records."""
    env, t0 = child_env(), time.monotonic()
    deadline, records, background = t0, [], None
    for step in steps:
        if step.background:
            background = (step, time.monotonic(), _start(step, env))
            continue
        deadline = t0 + total if step.name == "finalize" else deadline + step.budget_s
        t_start = time.monotonic()
        rcs, timed_out = _wait(_start(step, env), deadline)
        _record(records, step, t_start, rcs, timed_out, t0)
        if background is not None:  # measure nothing while the background step still compiles
            bstep, b_start, bprocs = background
            rcs, timed_out = _wait(bprocs, deadline)
            _record(records, bstep, b_start, rcs, timed_out, t0)
            background = None
        snapshot(out, work, records)
    print(f"\n===== session done in {time.monotonic() - t0:.0f} s (limit {total} s) =====", flush=True)
    return records


def cmd_run(args) -> int:
    out, work = Path(args.out).resolve(), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    inv = load_inventory(prefer_file=True, timeout=60)
    steps = plan_steps(str(out), str(work), sys.executable, plugins=None, inv=inv, peers=carried_peers())
    print(format_plan(steps, inv), flush=True)
    records = run_session(out, work, steps)
    bad = [r["step"] for r in records if r["timed_out"] or any(r["exit_codes"])]
    print(f"steps that timed out or failed: {bad or 'none'}; files in {out}: "
          f"{sorted(p.name for p in out.iterdir())}", flush=True)
    return 0


# ----------------------------------------------------------------------------- set-up (on the GPU machine)
def _sh(argv: list, timeout: float, env: dict | None = None) -> int:
    print("$ " + " ".join(argv), flush=True)
    try:
        return subprocess.run(argv, cwd=ROOT, env=env, timeout=timeout).returncode
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"  -> {type(exc).__name__}: {exc}", flush=True)
        return 1


_VERSIONS = """
import importlib, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(),
      torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')
for name in ('triton', 'transformers', 'deepspeed', 'flexmoe_training', 'liger_kernel', 'xdist', 'pytest_timeout'):
    try:
        print(name, getattr(importlib.import_module(name), '__version__', 'importable'))
    except Exception as exc:
        print(name, 'NOT IMPORTABLE:', type(exc).__name__, exc)
try:
    import flexmoe_kernels as fk
    print('REASON=' + fk.cuda_unavailable_reason())
except Exception as exc:
    print('REASON=flexmoe_kernels not importable: ' + type(exc).__name__ + ': ' + str(exc))
"""


def _import_check(env: dict, timeout: float) -> str:
    """The versions (printed) and ``flexmoe_kernels.cuda_unavailable_reason()`` ("" = available)
    from one fresh process."""
    try:
        r = subprocess.run([sys.executable, "-c", _VERSIONS], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.SubprocessError as exc:
        return f"check failed: {exc}"
    print(r.stdout + r.stderr[-2000:], flush=True)
    found = [line[7:] for line in r.stdout.splitlines() if line.startswith("REASON=")]
    return found[-1] if found else "flexmoe_kernels not importable: " + (r.stderr.strip().splitlines() or ["?"])[-1]


def cmd_setup(args) -> int:
    """Step 1. Its subprocesses run under :data:`SETUP_TIMEOUTS` (their sum is the step's
    budget); rebuilding ``_C`` (only if the prebuilt one does not import) gets what is left of
    that budget after a second import check."""
    t0, env, to = time.monotonic(), child_env(), SETUP_TIMEOUTS
    _sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"], to["nvidia-smi"])
    Path(SITE).mkdir(parents=True, exist_ok=True)
    wheels = sorted(str(p) for p in (ROOT / WHEEL_DIR).glob("*.whl"))
    if wheels:
        _sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", SITE, *wheels], to["pip install"])
    else:
        print(f"WARNING: no wheels in {WHEEL_DIR}/: deepspeed is missing; the e2e rows will say 'skipped'")
    link = Path(SITE) / "flexmoe_training"
    if not link.exists():
        link.symlink_to(ROOT / "training")
    so = ROOT / EXT_DIR / EXT_FILE
    if so.is_file():
        shutil.copyfile(so, ROOT / EXT_FILE)  # a fresh mtime: newer than csrc/ (test_cuda_build)
    reason = _import_check(env, to["import check + versions"])
    if "not importable" in reason:
        left = sum(to.values()) - (time.monotonic() - t0) - to["import check + versions"]
        if left > 20:
            print(f"prebuilt _C unusable ({reason}); building it here for sm_90a within {left:.0f} s", flush=True)
            _sh([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], left,
                env={**env, "FLEXMOE_CUDA_ARCHS": "90a", "FLEXMOE_NVCC_THREADS": "4"})
            reason = _import_check(env, to["import check + versions"])
        else:
            print(f"prebuilt _C unusable ({reason}); no time left in setup to rebuild it", flush=True)
    print(f"cuda backend: {reason or 'available'}", flush=True)
    stamp = ROOT / EXT_DIR / "commit.txt"
    print("commit:", stamp.read_text().strip() if stamp.is_file() else "unknown (no stamp)", flush=True)
    return 0


# ----------------------------------------------------------------------------- finalisation
PARTS = ("layer-fine-grained", "layer-flexolmo-7x7b", "routing", "e2e")


def _merge(work: Path) -> tuple:
    """(meta of the first part, every part's rows, every part's command)."""
    from benchmarks import harness

    meta, rows, cmds = None, [], []
    for part in PARTS:
        try:
            m, r = harness.load_results(work / part)
        except (ValueError, OSError) as exc:
            print(f"[finalize] {part}: no results ({exc})", flush=True)
            continue
        meta = meta or dict(m)
        rows += r
        cmds.append(m.get("command"))
    return meta, rows, cmds


def _fill_commit(meta: dict, rows: list) -> None:
    """Without .git on the GPU machine, take the commit stamped by ``--dry-run --check``."""
    if meta.get("git_commit"):
        return
    stamp = ROOT / EXT_DIR / "commit.txt"
    sha = stamp.read_text().strip() if stamp.is_file() else None
    meta["git_commit"] = sha
    meta["git_commit_source"] = f"{EXT_DIR}/commit.txt (stamped before the device call)" if sha else "unknown"
    for r in rows:
        r["git_commit"] = r.get("git_commit") or sha


def _steps_section(out: Path) -> str:
    try:
        steps = json.loads((out / "steps.json").read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return ""
    lines = ["## Session steps", "", "| step | budget s | elapsed s | exit | timed out |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['budget_s']} | {s['elapsed_s']} | {s['exit_codes']} | {s['timed_out']} |"
              for s in steps]
    return "\n".join(lines) + "\n"


def _dump_logs(work: Path) -> None:
    """Every harness log (one line per row, tracebacks) into the console, hence log.txt."""
    for log in sorted(work.glob("*/log.txt")):
        text = log.read_text(errors="replace")
        print(f"\n----- {log.parent.name}/log.txt ({len(text)} chars) -----\n{text[-200_000:]}", flush=True)


def cmd_finalize(args) -> int:
    from benchmarks import harness, report
    from benchmarks.gpu_sweep import best_table, table_file_name

    out, work = Path(args.out), Path(args.work)
    _dump_logs(work)
    meta, rows, cmds = _merge(work)
    if meta is None:
        print("[finalize] nothing to merge", flush=True)
        return 0
    _fill_commit(meta, rows)
    meta.update(command="bash benchmarks/gpu_session.sh OUT_DIR", parts=cmds)
    paths = harness.write_results(out, meta, rows)
    print(f"[finalize] {len(rows)} rows -> {paths['json']}, {paths['csv']}", flush=True)
    table, notes = best_table([r for r in rows if r.get("bench") == "layer"], meta["device"])
    for n in notes:
        print(f"[finalize] table: {n}", flush=True)
    if table is not None:
        (out / table_file_name(meta["device"])).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    for what, fn in (("summary", lambda: (out / "summary.md").write_text(
            report.summarize(meta, rows) + "\n" + _steps_section(out), encoding="utf-8")),
                     ("plots", lambda: report.make_plots(meta, rows, work / "plots")),
                     ("targets", lambda: print(report.format_targets(meta, rows), flush=True))):
        try:
            (work / "plots").mkdir(exist_ok=True)
            fn()
        except Exception as exc:  # noqa: BLE001 - each is a convenience; the rows are written
            print(f"[finalize] {what} failed: {type(exc).__name__}: {exc}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    plan = sub.add_parser("plan", help="print the plan and check the prerequisites (the dry run)")
    plan.add_argument("--check", action="store_true", help="exit 1 when a prerequisite is missing; stamp the commit")
    run = sub.add_parser("run", help="the whole session (on the GPU machine)")
    run.add_argument("out")
    run.add_argument("--work", default=WORK)
    sub.add_parser("setup", help="step 1: wheels, extension, versions")
    fin = sub.add_parser("finalize", help="last step: merge, summary, plots, table")
    fin.add_argument("out")
    fin.add_argument("work")
    args = p.parse_args(argv)
    return {"plan": cmd_plan, "run": cmd_run, "setup": cmd_setup, "finalize": cmd_finalize}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
