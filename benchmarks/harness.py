"""Timing, run metadata and result rows shared by every benchmark.

Timing rules (see benchmarks/README.md):

* CUDA: ``triton.testing.do_bench`` (warm-up, then repeated calls with the L2 cache cleared
  before each call; median, p20 and p80 of the per-call times from CUDA events). Without
  Triton, an equivalent CUDA-event loop (:func:`_cuda_event_bench`) that clears L2 the same way.
* CPU: ``time.perf_counter`` around each call after warm-up calls. CPU numbers exist only so
  the harness is exercised by CI; they say nothing about kernel performance.
* Inputs are rotated over several freshly drawn random buffer sets (:func:`num_buffer_sets`)
  so that consecutive calls never hit the same activations in L2.

Rows are flat dicts (one per measurement) carrying the run metadata, so that a CSV row or a
JSON row is self-describing (device, library versions, git commit, command, timestamp).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Bytes of L2 cache to exceed when rotating inputs (H100: 50 MB; H200 the same; B200 126 MB).
DEFAULT_L2_BYTES = 50 * 2**20

# Dense bf16/fp16 tensor-core peak (FLOP/s, no sparsity) used for MFU; first match wins.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
]

CPU_WARNING = (
    "CPU RUN: these numbers mean NOTHING about kernel performance. The CPU mode only checks "
    "that the harness runs end to end at tiny shapes; run on a GPU for real figures."
)

# Columns written first in the CSV (others follow alphabetically).
CSV_FIRST = [
    "bench", "preset", "provider", "mode", "mask", "T", "D", "F", "E", "K", "dtype",
    "status", "ms", "ms_p20", "ms_p80", "tflops", "tflops_executed", "gbps", "peak_mem_mb", "flops",
    "flops_executed", "bytes", "tokens_per_s", "mfu", "note",
]


# ----------------------------------------------------------------------------- metadata
def _version(dist: str) -> Optional[str]:
    """Installed version of a distribution, read from its metadata (no import: fast), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    """The repository's HEAD commit (with ``-dirty`` when the tree has changes), or None."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(name: str) -> str:
    """File-system friendly device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """Dense bf16 peak FLOP/s of ``device`` for MFU (None on CPU or unknown GPUs)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16_FLOPS:
        if key in name:
            return val
    return None


def run_metadata(device: torch.device, argv: Sequence[str]) -> dict:
    """Everything needed to reproduce / compare a run: device, versions, commit, command, time."""
    cuda = torch.version.cuda if torch.cuda.is_available() else None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "megablocks": _version("megablocks"),
        "cuda": cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *argv]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "meaningless_cpu_numbers": device.type != "cuda",
    }


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Per-call time in milliseconds: median and the 20th / 80th percentiles."""

    ms: float
    ms_p20: float
    ms_p80: float
    n: int


@dataclass
class TimingConfig:
    warmup_ms: float = 25.0  # CUDA: do_bench warm-up budget
    rep_ms: float = 100.0  # CUDA: do_bench measurement budget
    cpu_warmup: int = 1  # CPU: warm-up calls
    cpu_reps: int = 3  # CPU: timed calls


def _quantiles(samples: Sequence[float]) -> Timing:
    t = torch.tensor(list(samples), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(float(q[0]), float(q[1]), float(q[2]), len(samples))


_L2_FLUSH: dict = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    return _L2_FLUSH[device]


def _cuda_event_bench(fn: Callable[[], object], cfg: TimingConfig, grad_to_none, device) -> Timing:
    """CUDA-event timing with an L2 flush before each call (used when Triton is missing)."""
    cache = _flush_buffer(device)
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / 5, 1e-3)
    n_warm = max(1, int(cfg.warmup_ms / est))
    n_rep = max(5, int(cfg.rep_ms / est))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        for g in grad_to_none or ():
            g.grad = None
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def bench(
    fn: Callable[[], object],
    device: torch.device,
    cfg: TimingConfig,
    grad_to_none: Optional[Sequence[torch.Tensor]] = None,
) -> Timing:
    """Median / p20 / p80 milliseconds per call of ``fn`` on ``device`` (after warm-up)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            q = do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, grad_to_none=grad_to_none,
                         quantiles=[0.5, 0.2, 0.8])
            n = max(1, int(cfg.rep_ms / max(q[0], 1e-3)))
            return Timing(float(q[0]), float(q[1]), float(q[2]), n)
        return _cuda_event_bench(fn, cfg, grad_to_none, device)
    for _ in range(cfg.cpu_warmup):
        fn()
    samples = []
    for _ in range(cfg.cpu_reps):
        for g in grad_to_none or ():
            g.grad = None
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated during one call of ``fn`` beyond what was allocated before
    (MiB); None on CPU (PyTorch does not track CPU allocations)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def num_buffer_sets(bytes_per_set: int, l2_bytes: int = DEFAULT_L2_BYTES, max_sets: int = 8,
                    max_total_bytes: int = 2 * 2**30) -> int:
    """How many input sets to rotate over: enough to exceed 2x L2 when that stays small
    (at most ``max_sets`` and ``max_total_bytes``), at least 1."""
    bytes_per_set = max(1, int(bytes_per_set))
    want = math.ceil(2 * l2_bytes / bytes_per_set)
    by_mem = max(1, max_total_bytes // bytes_per_set)
    return int(max(1, min(want, max_sets, by_mem)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop cached CUDA blocks between cases (a no-op on CPU, where gc.collect only costs time)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------- rows + files
class Recorder:
    """Collects rows, mirrors a one-line log of each to ``log.txt`` (the raw log)."""

    def __init__(self, meta: dict, out_dir: Path):
        self.meta = meta
        self.rows: list[dict] = []
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.out_dir / "log.txt", "a", encoding="utf-8")
        self.log(f"# run {meta['timestamp']} on {meta['device']} commit {meta['git_commit']}")
        self.log(f"# command: {meta['command']}")
        self.log(f"# versions: torch {meta['torch']} triton {meta['triton']} deepspeed "
                 f"{meta['deepspeed']} transformers {meta['transformers']} cuda {meta['cuda']}")
        if meta["meaningless_cpu_numbers"]:
            self.log("# " + CPU_WARNING)

    def log(self, line: str) -> None:
        self._log.write(line + "\n")
        self._log.flush()

    def add(self, **row) -> dict:
        full = {**row}
        full.setdefault("status", "ok")
        for k, v in self.meta.items():
            full.setdefault(k, v)
        self.rows.append(full)
        keys = [k for k in CSV_FIRST if full.get(k) is not None]
        self.log(" ".join(f"{k}={_fmt(full[k])}" for k in keys))
        return full

    def close(self) -> None:
        self._log.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace(" ", "_") if isinstance(v, str) else str(v)


def write_results(out_dir: Path, meta: dict, rows: list[dict]) -> dict[str, Path]:
    """Write ``results.json`` ({"meta", "rows"}) and ``results.csv`` (one row per measurement)."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv"}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    keys: list[str] = [k for k in CSV_FIRST]
    extra = sorted({k for r in rows for k in r} - set(keys))
    keys += extra
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(r[k]) if isinstance(r.get(k), (dict, list)) else r.get(k) for k in keys})
    return paths


def load_results(path: Path) -> tuple[dict, list[dict]]:
    """Read a ``results.json`` written by :func:`write_results` (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ValueError(f"results path {str(path)!r} is not a results.json file")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path} is not a benchmark results file (no 'rows')")
    return data.get("meta", {}), data["rows"]


def progress(items: Iterable, total: int, desc: str, enabled: bool = True):
    """A tqdm progress bar over ``items`` (plain iteration when tqdm is missing or disabled)."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)
