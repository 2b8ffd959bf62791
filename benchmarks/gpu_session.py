"""The prepared GPU session: its plan, driver, set-up and finalisation.

    bash benchmarks/gpu_session.sh OUT_DIR              # on the GPU machine: the whole session
    bash benchmarks/gpu_session.sh --dry-run [--check]  # anywhere: the plan and the prerequisites

The driver runs the steps of :func:`plan_steps` one after the other (a ``background`` step
runs beside the step that follows it), each until its scheduled end: step i must end by
``start + sum of the budgets of the steps up to i``, so time a step leaves unused goes to the
next ones and the whole run never passes :data:`TOTAL_BUDGET_S`. A step still running at its
end gets SIGINT (pytest and the benchmarks then write what they have), then SIGKILL. After
every step the driver writes ``OUT_DIR/steps.json`` and re-packs the work folder into
``OUT_DIR/session.tar.gz``, so a run cut short still returns its partial results.

What comes back (at most 8 files, the limit of a lent GPU machine; docs/GPU_SESSION.md): ``log.txt`` (everything, via the
shell's tee), ``junit.xml``, ``steps.json``, ``session.tar.gz`` (per-step results, harness logs,
plots), and from :func:`cmd_finalize`: ``results.json``, ``results.csv``, ``summary.md`` and
the best-measured table ``triton_moe_<DEVICE>.json``.

Only the standard library is imported here at module level (the ``session_*`` modules too): the
plan and the checks run on any machine (``--dry-run``); the set-up runs before the carried wheels
are installed. The parts: the budgets in :mod:`benchmarks.session_budget`, what travels and its
checks in :mod:`benchmarks.session_prereq`, the finalisation in :mod:`benchmarks.session_finalize`
(every name stays importable from here).
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
from dataclasses import dataclass, field
from pathlib import Path

# The session's parts (re-exported: ``benchmarks.gpu_session.NAME`` keeps working for every name).
from .session_budget import (  # noqa: F401
    AOT_JOBS, BASELINE_ROWS, CASE_S, CHECK_JOBS, CHECK_S, COMPILE_S_PER_KERNEL, E2E_INIT_S, E2E_MODELS_N, E2E_STEP_S,
    FALLBACK_KERNELS, GPU_CORES, PEER_KERNELS, PEER_NAMES, PROCESS_START_S, RECORD_S, REFERENCE_S, ROW_S,
    SETUP_TIMEOUTS, TARGET_PRESETS, TEST_KERNELS, TEST_RUN_S, TEST_WORKERS, _budget, _ceil5, _n_checks, estimates)
from .session_prereq import (  # noqa: F401
    EXT_DIR, EXT_FILE, IMAGE_PACKAGES, REQUIRED_WHEELS, ROOT, TRAVEL_LIMIT, WHEEL_DIR, _check_ext, _check_wheels,
    _norm, _requires, _size, carried_peers, stamp_commit, travel_bytes, wheel_names)
from .session_finalize import (  # noqa: F401
    PARTS, _dump_logs, _fill_commit, _merge, _steps_section, cmd_finalize)

TOTAL_BUDGET_S = 540  # 9 minutes, kernel compilation included
DEVICE_TIMEOUT_S = 560  # the time to allow the whole run (timeout_s of the one call in docs/GPU_SESSION.md)
SITE = "/tmp/flexmoe-site"  # the carried wheels are installed here (first on PYTHONPATH)
WORK = "/tmp/flexmoe-gpu-session"  # per-step outputs; packed into OUT_DIR/session.tar.gz
KILL_GRACE_S = 10
SHAPES = "fine-grained:32768,flexolmo-7x7b:16384"  # the two target shapes (gpu_sweep.TARGET_SHAPES)

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


# ----------------------------------------------------------------------------- the plan (budgets: session_budget.py)
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
        Step("setup", b["setup"], "install the wheels prepared in .whl/ (if any), link flexmoe_training, put the "
             "prebuilt _C in place (rebuilt for sm_90a only within what is left of the budget), print the GPU and the versions",
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
    lines = ["Prepared GPU session: bash benchmarks/gpu_session.sh OUT_DIR", "",
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


# ----------------------------------------------------------------------------- prerequisites (session_prereq.py)
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
        res.append((n <= TRAVEL_LIMIT, f"checkout to copy with {WHEEL_DIR} and {EXT_DIR}: {n / 2**20:.1f} MiB "
                    f"({'<=' if n <= TRAVEL_LIMIT else 'OVER'} 64 MiB)"))
    bad = missing_tests(root)
    res.append((not bad, f"test subset: {len(TEST_SUBSET)} node ids present" if not bad else f"tests not found: {bad}"))
    return res


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
    print(f"\nto run it: bash benchmarks/gpu_session.sh OUT_DIR on the GPU machine, with {WHEEL_DIR}/ and "
          f"{EXT_DIR}/ beside the checkout (allow {DEVICE_TIMEOUT_S} s); docs/GPU_SESSION.md has the procedure")
    over = wall_budget(steps) > TOTAL_BUDGET_S
    return 1 if over or (args.check and not all(ok for ok, _ in checks)) else 0


# ----------------------------------------------------------------------------- the driver
def child_env() -> dict:
    """The environment of every step: the carried wheels first on the path, the repository
    importable, unbuffered output, one Triton cache shared by all processes."""
    env = dict(os.environ)
    paths = [SITE, str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    # Liger's fused MoE autotunes ~250 configs per shape at its first call (minutes of compiling):
    # the session times its single fallback config (documented in docs/GPU_SESSION.md).
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