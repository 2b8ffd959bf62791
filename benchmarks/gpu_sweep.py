"""Layer variant sweep of the prepared GPU session (issue 13 item 10).

Every Triton variant that exists today, side by side in one process with our cuda backend,
the cuBLAS GEMM of equal FLOPs and torch grouped_mm; its compile-only warm-up; and the
best-measured configuration table. Run by ``benchmarks/gpu_session.py`` (see
benchmarks/README.md, "Prepared GPU session"); each command also runs alone:

    python -m benchmarks.gpu_sweep layer --preset fine-grained --tokens 32768 --out DIR
    python -m benchmarks.gpu_sweep compile --all --jobs 6 --shapes fine-grained:32768,flexolmo-7x7b:16384
    python -m benchmarks.gpu_sweep table DIR_OR_RESULTS_JSON --out triton_moe_DEVICE.json

Variants (only what ``flexmoe_kernels/ops/triton/configs.py`` and ``backend.py`` offer today):

* ``default``: the device's config table when one matches, else the heuristic;
  deterministic (fixed-order) top-k combine. Its rows keep provider ``triton``.
* ``atomic``: ``FLEXMOE_TRITON_DETERMINISTIC=0`` (fp32 atomic top-k combine).
* ``heuristic``: the heuristic pinned through ``FLEXMOE_TRITON_CONFIG``, only when a table
  applies to the device and differs from it (table vs heuristic).
* ``cfg:NAME``: the hand-picked ``FLEXMOE_TRITON_CONFIG`` pins of :data:`CONFIG_CANDIDATES`:
  block shapes, pipeline depth (4 stages everywhere; 3 is the ``heuristic`` variant where the
  shipped table applies, and the default elsewhere), and the kernel variants of issue 13: TMA weight
  descriptors off (``tma0``; the default table has them on), the persistent tile schedule on
  (``persistent``), both (``tma0-persistent``): TMA on / off x persistent on / off with the
  default;
* ``field:F=V``: the non-default value of every other 0/1 launch-config field (the kept
  pre-activation, gate/up interleaving, ... whatever ``GemmConfig`` has), read at run time.

Non-default variants' rows are named ``triton:VARIANT``; every row carries ``variant``, and
Triton rows the resolved ``triton_config`` (the five kinds) and ``triton_config_source``.
There is no tuner: :func:`best_table` writes the fastest *measured* of these variants per
shape in the format of ``flexmoe_kernels/ops/triton/tables/``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import harness
from .presets import LAYER_PRESETS

DET_ENV = "FLEXMOE_TRITON_DETERMINISTIC"
CONFIG_ENV = "FLEXMOE_TRITON_CONFIG"
BASE_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
# The two target shapes and their token counts (issue 13).
TARGET_SHAPES = {"fine-grained": 32768, "flexolmo-7x7b": 16384}
# Hand-picked pins beside the default; each must fit the 227 KB of Hopper shared memory at the
# training-size configs (benchmarks.compile_report with the pin set says so: 4 stages of the
# 128-row up / down / dX tiles take ~196 KB, with or without TMA). A pin that does not compile
# gets error rows, not a crash.
CONFIG_CANDIDATES = {
    "bn128": "down.BLOCK_N=128,bwd_dx.BLOCK_N=128",
    "bm64": "BLOCK_M=64",
    "stages4": "up.num_stages=4,down.num_stages=4,bwd_up.num_stages=4,bwd_dx.num_stages=4,dw.num_stages=4",
    "tma0": "tma=0",
    "persistent": "persistent=1",
    "tma0-persistent": "tma=0,persistent=1",
}
# Flags swept by the pins above (not again as ``field:`` variants).
SWEPT_FLAGS = ("tma", "persistent")
BASELINES = ("cuda", "cublas_gemm", "torch_grouped_mm")
MODES = ("fwd", "fwd_bwd")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    env: tuple  # ((VAR, value), ...); the variables not named are unset

    @property
    def provider(self) -> str:
        return "triton" if self.name == "default" else f"triton:{self.name}"


def _configs_module():
    from flexmoe_kernels.ops.triton import configs

    return configs


def _pin_string(cfgs) -> str:
    """A ``FLEXMOE_TRITON_CONFIG`` text that pins every field of every kind of ``cfgs``."""
    return ",".join(f"{k}.{f}={int(v)}" for k, d in cfgs.to_dict().items() for f, v in d.items())


def _extra_field_variants(configs, skip: tuple = ()) -> list[Variant]:
    """``field:F=V`` for every 0/1 GemmConfig field beyond :data:`BASE_FIELDS` and ``skip``."""
    out = []
    defaults = {f.name: f.default for f in dataclasses.fields(configs.GemmConfig)}
    for name in getattr(configs, "_FIELDS", ()):
        d = defaults.get(name, dataclasses.MISSING)
        if name in BASE_FIELDS or name in skip or d not in (0, 1):  # also rules out MISSING
            continue
        v = 0 if int(d) else 1
        out.append(Variant(f"field:{name}={v}", ((CONFIG_ENV, f"{name}={v}"),)))
    return out


def variants(device: torch.device, shapes: Optional[dict] = None) -> list[Variant]:
    """The variants measured on ``device`` (see the module docstring)."""
    configs = _configs_module()
    out = [Variant("default", ()), Variant("atomic", ((DET_ENV, "0"),))]
    dev = configs.device_name(device)
    table = configs.load_table(dev) if device.type == "cuda" else None
    if table is not None:
        for pn, T in (shapes or TARGET_SHAPES).items():
            p = LAYER_PRESETS[pn]
            heur = configs.heuristic_configs(T, p.D, p.F, p.E, p.K, torch.bfloat16, "cuda")
            tab = configs.lookup_table(table, T, p.D, p.F, p.E, p.K, torch.bfloat16)
            if tab is not None and tab.to_dict() != heur.to_dict():
                out.append(Variant("heuristic", ((CONFIG_ENV, _pin_string(heur)),)))
                break  # one pin per shape would need per-shape runs; the first differing shape's
    out += [Variant(f"cfg:{n}", ((CONFIG_ENV, pin),)) for n, pin in CONFIG_CANDIDATES.items()]
    return out + _extra_field_variants(configs, SWEPT_FLAGS)


@contextlib.contextmanager
def variant_env(v: Variant):
    """Set the variant's variables (unsetting the other pins) for the duration."""
    keys = (DET_ENV, CONFIG_ENV)
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(dict(v.env))
    try:
        yield
    finally:
        for k, val in saved.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val


def resolved_configs(preset: str, T: int, dtype: torch.dtype, device: torch.device) -> tuple[dict, str]:
    """The Triton configs (kind -> fields) and their source for ``preset`` at ``T``, under the
    current environment; ``({}, reason)`` when they cannot be resolved."""
    p = LAYER_PRESETS[preset]
    try:
        cfgs = _configs_module().get_configs(T, p.D, p.F, p.E, p.K, dtype, device)
    except Exception as exc:  # noqa: BLE001 - a bad pin is an error row later, not a crash here
        return {}, f"unresolved: {type(exc).__name__}: {exc}"
    return cfgs.to_dict(), cfgs.source


class TaggedRecorder(harness.Recorder):
    """A Recorder that stamps every row with the current variant (and renames ``triton``)."""

    tag: dict = {}
    provider: Optional[str] = None

    def add(self, **row) -> dict:
        if row.get("provider") == "triton" and self.provider:
            row["provider"] = self.provider
            row["label"] = f"ours (triton, {self.tag.get('variant')})"
        row.update(self.tag if str(row.get("provider", "")).startswith("triton") else {"variant": "baseline"})
        return super().add(**row)


# ----------------------------------------------------------------------------- layer sweep
def _device(arg: Optional[str]) -> torch.device:
    dev = torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def run_sweep(preset: str, T: int, device: torch.device, dtype: torch.dtype, rec: TaggedRecorder,
              timing: harness.TimingConfig, names: Optional[list] = None, baselines=BASELINES) -> None:
    """Default Triton (masks none / token_all), the baselines, then every other variant."""
    from .bench_layer import plan_jobs, run_layer

    masks = ["none", "token_all"]
    for v in variants(device, {preset: T}):
        if names and v.name not in names:
            continue
        with variant_env(v):
            cfg, source = resolved_configs(preset, T, dtype, device)
            rec.tag = {"variant": v.name, "variant_env": dict(v.env), "triton_config": cfg,
                       "triton_config_source": source}
            rec.provider = v.provider
            print(f"[sweep] {preset} T={T} variant {v.name}: {source}", flush=True)
            jobs = plan_jobs([preset], [T], ["triton"], masks if v.name == "default" else ["none"], MODES)
            run_layer(jobs, device, dtype, rec, timing, False)
        if v.name == "default" and baselines:
            rec.provider = None
            jobs = plan_jobs([preset], [T], list(baselines), masks, MODES)
            jobs = [j for j in jobs if j.mask == "none" or j.provider == "cuda"]
            run_layer(jobs, device, dtype, rec, timing, False)


def cmd_layer(args) -> int:
    device = _device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = harness.run_metadata(device, ["-m", "benchmarks.gpu_sweep", *sys.argv[1:]])
    meta["seed"] = int(torch.seed() % 2**31)
    torch.manual_seed(meta["seed"])
    out = Path(args.out)
    rec = TaggedRecorder(meta, out)
    timing = harness.TimingConfig(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=1)
    names = args.variants.split(",") if args.variants else None
    baselines = [b for b in (args.baselines or "").split(",") if b] if args.baselines is not None else BASELINES
    try:
        run_sweep(args.preset, args.tokens, device, dtype, rec, timing, names, baselines)
    finally:
        paths = harness.write_results(out, meta, rec.rows)
        rec.close()
    ok = sum(r["status"] == "ok" for r in rec.rows)
    print(f"[sweep] {len(rec.rows)} rows ({ok} ok) -> {paths['json']}", flush=True)
    return 0


# ----------------------------------------------------------------------------- compile warm-up
def parse_shapes(text: str) -> dict:
    """``"fine-grained:32768,flexolmo-7x7b:16384"`` -> {preset: T}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, t = item.partition(":")
        if name not in LAYER_PRESETS or not t.isdigit():
            raise ValueError(f"--shapes item {item!r}: expected PRESET:TOKENS with a preset of {list(LAYER_PRESETS)}")
        out[name] = int(t)
    return out


def compile_variant(name: str, shapes: dict, device: torch.device) -> None:
    """One forward+backward of the Triton layer per shape under variant ``name`` (the default
    variant also with a per-token mask): compiles every kernel the sweep will launch into
    Triton's on-disk cache, so that the measuring process finds them compiled."""
    from .bench_layer import make_mask
    from .providers import PROVIDERS, LayerWeights

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for pn, T in shapes.items():
        found = [v for v in variants(device, {pn: T}) if v.name == name]
        if not found:
            continue
        t0 = time.perf_counter()
        p = LAYER_PRESETS[pn]
        with variant_env(found[0]):
            w = LayerWeights.random(p, device, dtype)
            built = PROVIDERS["triton"].build(p, w, device, dtype)
            for mask in ["none", "token_all"] if name == "default" else ["none"]:
                x = torch.randn(T, p.D, device=device, dtype=dtype, requires_grad=True)
                out = built.fwd(x, make_mask(mask, T, p, device))
                out.backward(torch.randn_like(out))
            harness.synchronize(device)
        print(f"[warm] {name} {pn} T={T}: {time.perf_counter() - t0:.1f} s", flush=True)
        del w, built
        harness.free_memory(device)


def cmd_compile(args) -> int:
    device = _device(args.device)
    shapes = parse_shapes(args.shapes)
    vs = variants(device, shapes)
    if args.all:  # fan out: one process per variant (Triton compiles on one core per process)
        cmd = [sys.executable, "-m", "benchmarks.gpu_sweep", "compile", "--shapes", args.shapes]
        cmd += ["--device", args.device] if args.device else []
        jobs = args.jobs
        if device.type == "cuda":  # ~10 GB each at the 7x7B shape: fewer at once on an 80 GB H100
            jobs = min(jobs, max(2, int(torch.cuda.get_device_properties(device).total_memory / 2**30 // 22)))
        procs, rc = [], 0
        for v in vs:
            while len([p for p in procs if p.poll() is None]) >= jobs:
                time.sleep(0.2)
            procs.append(subprocess.Popen(cmd + ["--variant", v.name]))
        for p in procs:
            rc = max(rc, p.wait())
        return rc
    if args.variant not in [v.name for v in vs]:
        print(f"unknown variant {args.variant!r}; variants here: {[v.name for v in vs]}", file=sys.stderr)
        return 2
    try:
        compile_variant(args.variant, shapes, device)
    except Exception as exc:  # noqa: BLE001 - a pin that does not compile is reported by the sweep
        print(f"[warm] {args.variant}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return 0


# ----------------------------------------------------------------------------- best-measured table
def table_file_name(device: str) -> str:
    """``triton_moe_<DEVICE>.json``, e.g. ``triton_moe_NVIDIA_H200.json`` (the tables' naming)."""
    return "triton_moe_" + (re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_") or "unknown") + ".json"


def _by_variant(rows: list[dict], preset: str) -> dict:
    """{variant: {mode: row}} of the ok, unmasked Triton rows of ``preset``."""
    out: dict = {}
    for r in rows:
        if (r.get("bench") == "layer" and r.get("preset") == preset and r.get("status") == "ok"
                and str(r.get("provider", "")).startswith("triton") and r.get("mask") == "none" and r.get("ms")):
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
    com = sub.add_parser("compile", help="compile the variants' kernels into Triton's cache")
    com.add_argument("--shapes", default=",".join(f"{k}:{v}" for k, v in TARGET_SHAPES.items()))
    group = com.add_mutually_exclusive_group(required=True)
    group.add_argument("--variant")
    group.add_argument("--all", action="store_true", help="every variant, one process each")
    com.add_argument("--jobs", type=int, default=6)
    com.add_argument("--device", default=None)
    tab = sub.add_parser("table", help="write the best-measured config table of a results.json")
    tab.add_argument("results")
    tab.add_argument("--out", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"layer": cmd_layer, "compile": cmd_compile, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
