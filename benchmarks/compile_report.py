"""Compile report: what the Triton kernels of one MoE layer compile to, without a GPU.

::

    python -m benchmarks.compile_report --arch sm_90a --preset fine-grained --tokens 32768 [--json FILE]

Records every Triton kernel launch of one forward and one backward of the layer (backend
"triton", every input needing a gradient, no frozen experts; ``--dtype`` bf16 by default) for
that shape, with the configs the library would choose on that device (``get_configs`` with
the device name of ``--arch``: the H100 table for sm_90a, the heuristics for the others;
``FLEXMOE_TRITON_CONFIG`` / ``FLEXMOE_TRITON_DETERMINISTIC`` apply as in the library), compiles
each with ``triton.compile`` for that architecture (see :mod:`benchmarks.kernel_compile`) and
prints a row per launch. Routing kernels are included; torch ops the layer also runs (router
GEMM ``x @ R.T`` and its backward, the router-weight-gradient sum, the bias gradient) are not
Triton kernels and are not listed. Needs Triton with its NVIDIA backend and a ptxas; no GPU,
no ``TRITON_INTERPRET`` (it is removed from the environment before the kernels are imported).
Distinct kernels are compiled in parallel over ``--jobs`` processes (default: up to 2);
nothing is written in the repository (Triton's own cache is in ``~/.triton`` or
``TRITON_CACHE_DIR``).

How each column is derived (and how precise it is):

* ``mma``: "wgmma" if the PTX has ``wgmma.mma_async`` (or the SASS ``HGMMA``), "mma.sync" if
  it has ``mma.sync`` (or ``HMMA``), else "none". ``mma_n``: the N of the wgmma shape
  ``m64nNk16`` (the largest if a kernel has several), null without wgmma. Exact.
* ``tma``: ``cp.async.bulk.tensor`` appears in the PTX or ``UTMALDG`` in the SASS (a load
  through a tensor descriptor). Exact, but does not say which operand uses it.
* ``buffers``: depth of the shared-memory operand ring, read from the TTGIR after Triton's
  pipeliner: the smallest leading dimension ``N`` of the rank-3 ``NxRxC`` floating-point
  ``ttg.local_alloc`` buffers (one slot per stage in flight; with ``N`` slots the loads run
  ``N - 1`` k-steps ahead of the MMA). Integer index buffers (e.g. ``1x64xi32`` pair ids) are
  not counted (before the dW kernel prefetched its pair ids one k-step ahead, such an index
  load took a stage and left the dW operands 2 slots of 3). 1 = a single-buffered operand tile, 0 = no operand in shared memory (not a
  GEMM). It is the allocation, not a measurement of copies in flight at run time; ``num_stages``
  (the value compiled) is also in the JSON. Cross-check: the PTX ``cp.async.wait_group``
  counts follow the same rings but count commit groups, not stages.
* ``registers``, ``spill_bytes`` (spill stores + spill loads), ``stack_bytes``: ``ptxas -v``
  on the PTX Triton emitted, with Triton's flags, run by the newest of Triton's bundled ptxas
  for that architecture (the one that built the cubin: it reads that PTX version by
  construction) and CUDA's (named in the header). Exact for that ptxas; a different ptxas
  version can allocate differently.
* ``smem_bytes``: Triton's ``metadata.shared``, the dynamic shared memory a launch requests;
  ``fits`` = ``smem_bytes`` <= the architecture's per-block limit (227 KB on sm_90).
* ``grid``: programs launched (from the worst-case static grids: tiles of unused experts exit).
* ``wgmma_serialized``: ptxas reported C7515 ("wgmma.mma_async instructions are serialized"),
  or the SASS waits for every ``HGMMA`` alone (a full ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after
  each, before the next HGMMA): no two wgmma overlap. ``wgmma_serialized_by`` (JSON) names the
  evidence ("ptxas C7515", "sass"). False for a pipelined loop and for kernels without wgmma.
* ``device_descriptors`` (JSON; per program): TMA descriptors a program makes on the device
  (``tl.make_tensor_descriptor`` ops in the TTIR: each ~15 ``tensormap.replace``, a 128-byte
  copy to global memory and a fence); ``dev_desc_launch`` = that x ``grid`` (an upper bound:
  the kernels make them after the dead-tile exit, so programs of unused tiles make none);
  ``host_desc`` = ``TensorDescriptor`` arguments of the launch (made once on the host).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

# argument "arch" -> (compute capability, device name whose configs the library would pick,
# max dynamic shared memory per block in bytes)
ARCHS = {
    "sm_90a": (90, "NVIDIA H100 80GB HBM3", 232448),
    "sm_89": (89, "NVIDIA L40S", 101376),
    "sm_86": (86, "NVIDIA RTX A6000", 101376),
    "sm_80": (80, "NVIDIA A100-SXM4-80GB", 166912),
}
DTYPES = ("bfloat16", "float16", "float32")
_ROLES = {"_topk_softmax_kernel": "route_topk", "_block_prefix_kernel": "route_prefix",
          "_scatter_pad_kernel": "route_scatter", "_topk_softmax_bwd_kernel": "route_bwd"}
_GEMM_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")

# Set for the forked compile workers (they inherit the recorded launches).
_WORK: dict = {}


def _role(launch) -> str:
    kw, name = launch.kwargs, launch.name
    if name in ("_up_swiglu_kernel", "_up_interleaved_kernel"):  # the backward's recompute: bwd_up
        return "bwd_up" if launch.phase == "bwd" or kw.get("BWD") else "up"
    if name == "_dh_swiglu_bwd_kernel":
        return "bwd_dh"
    if name == "_tile_gemm_scatter_kernel":
        return "down" if kw.get("HAS_WEIGHT") else "bwd_dx"
    if name == "_combine_kernel":
        return "combine" if launch.phase == "fwd" else "dx_combine"
    return _ROLES.get(name, name)


def _config_text(launch) -> str:
    kw = launch.kwargs
    if all(f in kw for f in _GEMM_FIELDS):
        return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} g{kw['GROUP_M']} "
                f"w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}")
    blocks = " ".join(f"{k[6:] if k.startswith('BLOCK_') else 'tpp'}{v}" for k, v in kw.items()
                      if k.startswith("BLOCK_") or k == "TILES_PER_PROG")
    return f"{blocks} w{kw.get('num_warps', 4)}"


def _compile_one(index: int) -> dict:
    """Worker: compile one distinct launch and read it (errors become an ``error`` field)."""
    from benchmarks.kernel_compile import compile_launch, read_kernel

    try:
        compiled, _ = compile_launch(_WORK["launches"][index], _WORK["capability"])
        return read_kernel(compiled, _WORK["ptxas"])
    except Exception as exc:  # noqa: BLE001 - reported in the row, the run goes on
        return {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}


def _compile_all(launches: list, capability: int, ptxas: str, jobs: int) -> list[dict]:
    """One result per launch; launches with equal :func:`launch_key` are compiled once."""
    from benchmarks.kernel_compile import launch_key

    keys = [launch_key(launch, capability) for launch in launches]
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    todo = sorted(first.values())
    _WORK.update(launches=launches, capability=capability, ptxas=ptxas)
    if jobs > 1 and len(todo) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(jobs, len(todo))) as pool:
            results = pool.map(_compile_one, todo, chunksize=1)
    else:
        results = [_compile_one(i) for i in todo]
    by_index = dict(zip(todo, results))
    return [by_index[first[k]] for k in keys]


def build_report(preset_name: str, tokens: int, arch: str, dtype_name: str = "bfloat16",
                 jobs: int = 2, device_name: Optional[str] = None) -> tuple[dict, list[dict]]:
    """``(header, rows)`` of the compile report (see the module docstring for the fields)."""
    import torch
    import triton

    from benchmarks.kernel_compile import find_ptxas, host_descriptors, library_configs, record_layer
    from benchmarks.presets import LAYER_PRESETS
    from flexmoe_kernels.ops.triton.backend import default_deterministic

    preset = LAYER_PRESETS[preset_name]
    capability, default_name, smem_limit = ARCHS[arch]
    device_name = device_name or default_name
    dtype = getattr(torch, dtype_name)
    ptxas, ptxas_version = find_ptxas(capability)
    if ptxas is None:
        raise RuntimeError(ptxas_version)
    cfgs = library_configs(tokens, preset.D, preset.F, preset.E, preset.K, dtype, device_name)
    det = default_deterministic()
    launches = record_layer(tokens, preset.D, preset.F, preset.E, preset.K, dtype, cfgs, deterministic=det,
                            capability=capability)
    t0 = time.perf_counter()
    results = _compile_all(launches, capability, ptxas, jobs)
    header = dict(preset=preset_name, shape=dict(D=preset.D, F=preset.F, E=preset.E, K=preset.K), tokens=tokens,
                  dtype=dtype_name, arch=arch, device_name=device_name, configs=cfgs.source, deterministic=det,
                  triton=triton.__version__, ptxas=ptxas, ptxas_version=ptxas_version, smem_limit=smem_limit,
                  launches=len(launches), distinct=len({id(r) for r in results}),
                  compile_s=round(time.perf_counter() - t0, 1), jobs=jobs)
    rows = []
    dw_roles = iter(("dw_gate_up", "dw_down"))  # launch order of the backward (operands may swap)
    for launch, res in zip(launches, results):
        role = next(dw_roles, "dw") if launch.name == "_grouped_dw_kernel" else _role(launch)
        row = dict(kernel=launch.name, role=role, phase=launch.phase, config=_config_text(launch),
                   grid=int(_prod(launch.grid)), preset=preset_name, tokens=tokens, arch=arch, dtype=dtype_name,
                   host_desc=host_descriptors(launch))
        row.update(res)
        if "smem_bytes" in row:
            row["fits"] = row["smem_bytes"] <= smem_limit
        if "device_descriptors" in row:
            row["dev_desc_launch"] = row["device_descriptors"] * row["grid"]
        rows.append(row)
    return header, rows


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


_COLUMNS = [("phase", 5), ("role", 13), ("kernel", 26), ("config", 24), ("grid", 8), ("mma", 8),
            ("mma_n", 5), ("tma", 5), ("buffers", 7), ("registers", 9), ("spill_bytes", 11),
            ("smem_bytes", 10), ("fits", 5), ("wgmma_serialized", 16), ("host_desc", 9), ("dev_desc_launch", 15)]


def format_report(header: dict, rows: list[dict]) -> str:
    """The header lines and a fixed-width table, one row per launch."""
    s = header["shape"]
    lines = [
        f"# compile report: {header['preset']} (D {s['D']}, F {s['F']}, E {s['E']}, K {s['K']}), "
        f"T {header['tokens']}, {header['dtype']}, {header['arch']} as {header['device_name']!r}",
        f"# configs: {header['configs']}; deterministic combine: {header['deterministic']}",
        f"# triton {header['triton']}; ptxas {header['ptxas_version']} ({header['ptxas']})",
        f"# {header['launches']} launches, {header['distinct']} distinct kernels compiled in "
        f"{header['compile_s']} s ({header['jobs']} jobs); smem limit {header['smem_limit']} B/block; "
        "torch ops (router GEMM and its backward, small reductions) not listed",
        "  ".join(name.ljust(w) for name, w in _COLUMNS),
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['phase']:<5}  {row['role']:<13}  {row['kernel']:<26}  ERROR {row['error'][-300:]}")
            continue
        cells = ["-" if row.get(name) is None else str(row[name]) for name, _ in _COLUMNS]
        lines.append("  ".join(c.ljust(w) for c, (_, w) in zip(cells, _COLUMNS)))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90a", help=f"target architecture: {', '.join(ARCHS)} (default sm_90a)")
    p.add_argument("--preset", default="fine-grained", help="layer preset of benchmarks/presets.py")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per layer call T (default 16384)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--device-name", default=None,
                   help="device name whose configs the library would pick (default: one per --arch)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows as a JSON list to FILE")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; exit status 0 when every kernel compiled, 1 when one failed, 2 for bad
    arguments, 3 when the compile toolchain (Triton's NVIDIA backend, ptxas) is missing."""
    args = _parser().parse_args(argv)
    from benchmarks.presets import LAYER_PRESETS

    if args.arch not in ARCHS:
        _parser().error(f"unknown arch {args.arch!r}; known: {', '.join(ARCHS)}")
    if args.preset not in LAYER_PRESETS:
        _parser().error(f"unknown preset {args.preset!r}; known: {', '.join(LAYER_PRESETS)}")
    if args.tokens < 1 or args.jobs < 1:
        _parser().error("--tokens and --jobs must be positive")
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernel modules are imported
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - no Triton, or no NVIDIA backend
        print(f"compile report unavailable: Triton's NVIDIA backend cannot be imported: {exc}", file=sys.stderr)
        return 3
    try:
        header, rows = build_report(args.preset, args.tokens, args.arch, args.dtype, args.jobs, args.device_name)
    except RuntimeError as exc:
        if "ptxas" not in str(exc):
            raise
        print(f"compile report unavailable: {exc}", file=sys.stderr)
        return 3
    print(format_report(header, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
