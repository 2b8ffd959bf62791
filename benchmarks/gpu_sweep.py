"""Layer variant sweep of the prepared GPU session (checked, then timed; budgets from measurements).

Every Triton variant that exists today, each first checked against the reference, then timed
side by side with our cuda backend, the cuBLAS GEMM of equal FLOPs, torch grouped_mm and the
peer providers (Liger's fused MoE); its ahead-of-time compile warm-up; and the best-measured
configuration table. Run by ``benchmarks/gpu_session.py`` (see benchmarks/README.md, "Prepared
GPU session", and docs/GPU_SESSION.md); each command also runs alone:

    python -m benchmarks.gpu_sweep compile --aot --jobs 10 --shapes fine-grained:32768,flexolmo-7x7b:16384
    python -m benchmarks.gpu_sweep check --all --jobs 8 --checks DIR [--providers liger_fused_moe]
    python -m benchmarks.gpu_sweep layer --preset fine-grained --tokens 32768 --out DIR [--checks DIR]
    python -m benchmarks.gpu_sweep inventory              # variants, duplicates, checks, kernel count (no GPU)
    python -m benchmarks.gpu_sweep table DIR_OR_RESULTS_JSON --out triton_moe_DEVICE.json

Variants (only what ``flexmoe_kernels/ops/triton/configs.py`` and ``backend.py`` offer today):

* ``default``: the device's config table when one matches, else the heuristic;
  deterministic (fixed-order) top-k combine. Its rows keep provider ``triton``.
* ``atomic``: ``FLEXMOE_TRITON_DETERMINISTIC=0`` (fp32 atomic top-k combine).
* ``heuristic``: the heuristic pinned through ``FLEXMOE_TRITON_CONFIG``, only when a table
  applies to the device and differs from it (table vs heuristic).
* ``cfg:NAME``: the hand-picked ``FLEXMOE_TRITON_CONFIG`` pins of :data:`CONFIG_CANDIDATES`:
  block shapes, pipeline depth (4 stages everywhere), and the kernel variants: TMA
  weight descriptors off (``tma0``), the persistent tile schedule on (``persistent``), both
  (``tma0-persistent``);
* ``field:F=V``: the non-default value of every other 0/1 launch-config field (the kept
  pre-activation, gate/up interleaving, ... whatever ``GemmConfig`` has), read at run time.

Duplicates are cut (:func:`variants`): a variant whose resolved configs (and combine) equal an
earlier one's at the shape is not swept (``cfg:stages4`` under the H100 table, which already
has 4 stages). Self-check (:mod:`benchmarks.check`): before it is timed, each variant (and peer)
runs forward + backward on a token slice of the shape with the configs of the timed T pinned,
in a process of its own, against the float64 reference with the tests' bf16 rule; a FAIL gets
``status="fail"`` rows carrying the error, is never timed and never enters the table. The
timing process is restarted for the variants left when a CUDA error makes it unusable.

Non-default variants' rows are named ``triton:VARIANT``; every row carries ``variant`` and the
check (``check``, ``check_error``, ``check_max_err_ratio``), and Triton rows the resolved
``triton_config`` (the kinds) and ``triton_config_source``. There is no tuner:
:func:`best_table` writes the fastest *measured and checked* of these variants per shape in the
format of ``flexmoe_kernels/ops/triton/tables/``.

The parts (every name stays importable from here): the variants in :mod:`benchmarks.sweep_variants`,
the self-checks in :mod:`benchmarks.sweep_checks`, the timed sweep and its restarts in
:mod:`benchmarks.sweep_layer`, the compile warm-up and inventory in :mod:`benchmarks.sweep_compile`;
here the best-measured table and the command line.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from pathlib import Path
from typing import Optional

from . import harness
from .presets import LAYER_PRESETS
# The sweep's parts (re-exported: ``benchmarks.gpu_sweep.NAME`` keeps working for every name).
from .sweep_variants import (  # noqa: F401
    ASSUMED_DEVICE, BASE_FIELDS, BASELINES, CONFIG_CANDIDATES, CONFIG_ENV, DET_ENV, MODES, SWEPT_FLAGS,
    TARGET_SHAPES, Variant, _candidates, _configs_module, _device, _extra_field_variants, _pin_string, parse_shapes,
    resolve_variant, resolved_configs, variant_env, variants)
from .sweep_checks import (  # noqa: F401
    _check_pin, _write_check, check_file, check_in_subprocess, checked_names, cmd_check, run_check)
from .sweep_layer import (  # noqa: F401
    _TEST_STICKY_ENV, STICKY_EXIT, TaggedRecorder, _check_row_fields, _cuda_healthy, _layer_parent, cmd_layer,
    run_sweep)
from .sweep_compile import (  # noqa: F401
    _AOT_LAUNCHES, _aot_worker, cmd_compile, cmd_inventory, compile_aot, compile_variant, inventory,
    kernel_launches)


# ----------------------------------------------------------------------------- best-measured table
def table_file_name(device: str) -> str:
    """``triton_moe_<DEVICE>.json``, e.g. ``triton_moe_NVIDIA_H200.json`` (the tables' naming)."""
    return "triton_moe_" + (re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_") or "unknown") + ".json"


def _by_variant(rows: list[dict], preset: str) -> dict:
    """{variant: {mode: row}} of the ok, unmasked Triton rows of ``preset`` whose variant passed
    its self-check (a variant with a failed check never enters the table)."""
    failed = {r.get("variant") for r in rows if r.get("check") == "FAIL" or r.get("status") == "fail"}
    out: dict = {}
    for r in rows:
        if (r.get("bench") == "layer" and r.get("preset") == preset and r.get("status") == "ok"
                and str(r.get("provider", "")).startswith("triton") and r.get("mask") == "none" and r.get("ms")
                and r.get("check", "PASS") == "PASS" and r.get("variant", "default") not in failed):
            out.setdefault(r.get("variant", "default"), {})[r["mode"]] = r
    return out


def _best(per: dict) -> Optional[str]:
    """The fastest variant with a resolved config: fwd+bwd median ms first, then fwd (the atomic
    combine is not a table field, so it is compared separately)."""
    cands = [v for v, m in per.items() if v != "atomic" and any(r.get("triton_config") for r in m.values())]
    for mode in ("fwd_bwd", "fwd"):
        timed = [v for v in cands if mode in per[v]]
        if timed:
            return min(timed, key=lambda v: per[v][mode]["ms"])
    return None


def best_table(rows: list[dict], device: str) -> tuple[Optional[dict], list[str]]:
    """A config table (``flexmoe_kernels/ops/triton/tables/`` format) holding, per measured shape
    and T, the configs of the fastest measured variant; ``(None, reasons)`` when none was measured."""
    shapes: dict = {}
    measured: dict = {}
    notes = []
    for preset in sorted({r.get("preset") for r in rows if r.get("bench") == "layer" and r.get("preset")}):
        per = _by_variant(rows, preset)
        best = _best(per)
        if best is None:
            notes.append(f"{preset}: no ok Triton row with a resolved config")
            continue
        row = next(iter(per[best].values()))
        key = f"D={row['D']},F={row['F']},E={row['E']},K={row['K']},dtype={row['dtype']}"
        bucket = _configs_module().tokens_per_expert_bucket(int(row["T"]), int(row["K"]), int(row["E"]))
        shapes.setdefault(key, {})[str(bucket)] = row["triton_config"]
        measured[key] = {v: {m: round(r["ms"], 5) for m, r in modes.items()} for v, modes in per.items()}
        notes.append(f"{preset} T={row['T']}: best {best} ({row.get('triton_config_source')})")
    if not shapes:
        return None, notes
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    table = {
        "status": f"measured on {device} ({when}): per shape, the fastest of a fixed list of variants by "
                  "fwd+bwd median ms (benchmarks/gpu_sweep.py; no tuner, no search)",
        "note": "; ".join(notes) + ". 'measured_ms' holds every variant's median ms per mode; the "
                "atomic variant (FLEXMOE_TRITON_DETERMINISTIC=0) is not a table field.",
        "devices": [device],
        "device_substrings": [],
        "key": "tokens_per_expert",
        "format": "shapes[shape_key][m] = {kind: GemmConfig fields}, m = ceil(T*K/E) rounded up to a power "
                  "of two; lookup takes the nearest m in log2",
        "shapes": shapes,
        "measured_ms": measured,
    }
    return table, notes


def cmd_table(args) -> int:
    meta, rows = harness.load_results(Path(args.results))
    device = meta.get("device") or "unknown"
    table, notes = best_table(rows, device)
    for n in notes:
        print(f"[table] {n}")
    if table is None:
        print("[table] no table written: nothing was measured")
        return 0
    out = Path(args.out) if args.out else Path(args.results).parent / table_file_name(device)
    if out.is_dir():
        out = out / table_file_name(device)
    out.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"[table] wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_sweep", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lay = sub.add_parser("layer", help="measure every variant and the baselines at one shape")
    lay.add_argument("--preset", required=True, choices=list(LAYER_PRESETS))
    lay.add_argument("--tokens", type=int, required=True)
    lay.add_argument("--out", required=True)
    lay.add_argument("--variants", default=None, help="comma list of variant names (default: all)")
    lay.add_argument("--baselines", default=None, help=f"comma list (default {','.join(BASELINES)}; '' for none)")
    lay.add_argument("--warmup-ms", type=float, default=25.0)
    lay.add_argument("--rep-ms", type=float, default=100.0)
    lay.add_argument("--device", default=None)
    lay.add_argument("--checks", default=None, help="folder of the check results (default OUT/checks); a variant "
                     "without one is checked now, in a process of its own")
    lay.add_argument("--check-timeout", type=float, default=120.0, help="seconds for a check run by the sweep")
    lay.add_argument("--peers", default=None, help="peer providers to check and time beside the variants, "
                     "e.g. liger_fused_moe")
    lay.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    lay.add_argument("--part", default=None, help=argparse.SUPPRESS)
    lay.add_argument("--skip", default=None, help=argparse.SUPPRESS)
    chk = sub.add_parser("check", help="check variants (and peers) against the reference, each in its own process")
    g2 = chk.add_mutually_exclusive_group(required=True)
    g2.add_argument("--variant", help="one variant or provider, in this process")
    g2.add_argument("--all", action="store_true", help="every variant at --shapes, one process each")
    chk.add_argument("--preset", choices=list(LAYER_PRESETS))
    chk.add_argument("--tokens", type=int, help="the timed T (the check runs a token slice with its configs)")
    chk.add_argument("--shapes", default=",".join(f"{k}:{v}" for k, v in TARGET_SHAPES.items()))
    chk.add_argument("--providers", default=None, help="peer providers to check too (with --all)")
    chk.add_argument("--checks", required=True, help="folder for the results (check-NAME-PRESET-TT.json)")
    chk.add_argument("--refdir", default=None, help="folder of the references (default CHECKS/reference)")
    chk.add_argument("--jobs", type=int, default=4)
    chk.add_argument("--device", default=None)
    com = sub.add_parser("compile", help="compile the variants' kernels into Triton's cache")
    com.add_argument("--shapes", default=",".join(f"{k}:{v}" for k, v in TARGET_SHAPES.items()))
    group = com.add_mutually_exclusive_group(required=True)
    group.add_argument("--variant")
    group.add_argument("--all", action="store_true", help="every variant, one process each")
    group.add_argument("--aot", action="store_true", help="every distinct kernel, ahead of time with "
                       "triton.compile (no GPU needed), --jobs processes")
    com.add_argument("--jobs", type=int, default=6)
    com.add_argument("--capability", type=int, default=90, help="--aot: the GPU's compute capability")
    com.add_argument("--device", default=None)
    inv = sub.add_parser("inventory", help="JSON: variants, duplicates cut, self-checks and the kernel count "
                         "of a session (no GPU; run without TRITON_INTERPRET)")
    inv.add_argument("--shapes", default=",".join(f"{k}:{v}" for k, v in TARGET_SHAPES.items()))
    inv.add_argument("--device-name", default=None, help=f"resolve as on this GPU (default {ASSUMED_DEVICE!r})")
    inv.add_argument("--peers", default=None)
    inv.add_argument("--json", default=None)
    tab = sub.add_parser("table", help="write the best-measured config table of a results.json")
    tab.add_argument("results")
    tab.add_argument("--out", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "check" and not args.all and (args.preset is None or args.tokens is None):
        build_parser().error("check --variant needs --preset and --tokens")
    return {"layer": cmd_layer, "check": cmd_check, "compile": cmd_compile, "table": cmd_table,
            "inventory": cmd_inventory}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())