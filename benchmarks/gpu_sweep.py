"""Layer variant sweep of the prepared GPU session (issue 13 item 10; issue 22 item 6).

Every Triton variant that exists today, each first checked against the reference, then timed
side by side with our cuda backend, the cuBLAS GEMM of equal FLOPs, torch grouped_mm and the
peer providers (Liger's fused MoE); its ahead-of-time compile warm-up; and the best-measured
configuration table. Run by ``benchmarks/gpu_session.py`` (see benchmarks/README.md, "Prepared
GPU session"); each command also runs alone:

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
  block shapes, pipeline depth (4 stages everywhere), and the kernel variants of issue 13: TMA
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


ASSUMED_DEVICE = "NVIDIA H100 80GB HBM3"  # what a plan made without a GPU resolves configs for


def _candidates(configs, dev: str, device_type: str, shapes: dict) -> list[Variant]:
    """Every variant before de-duplication (see the module docstring)."""
    out = [Variant("default", ()), Variant("atomic", ((DET_ENV, "0"),))]
    table = configs.load_table(dev) if device_type == "cuda" else None
    if table is not None:
        for pn, T in shapes.items():
            p = LAYER_PRESETS[pn]
            heur = configs.heuristic_configs(T, p.D, p.F, p.E, p.K, torch.bfloat16, "cuda")
            tab = configs.lookup_table(table, T, p.D, p.F, p.E, p.K, torch.bfloat16)
            if tab is not None and tab.to_dict() != heur.to_dict():
                out.append(Variant("heuristic", ((CONFIG_ENV, _pin_string(heur)),)))
                break  # one pin per shape would need per-shape runs; the first differing shape's
    out += [Variant(f"cfg:{n}", ((CONFIG_ENV, pin),)) for n, pin in CONFIG_CANDIDATES.items()]
    return out + _extra_field_variants(configs, SWEPT_FLAGS)


def resolve_variant(v: Variant, preset: str, T: int, device_type: str = "cuda",
                    device_name: Optional[str] = None) -> tuple[dict, str]:
    """The configs (kind -> fields) and source variant ``v`` resolves for ``preset`` at ``T`` on a
    device of ``device_type`` called ``device_name`` (no GPU needed); ``({}, reason)`` when
    they cannot be resolved (a bad pin: its check fails later)."""
    configs = _configs_module()
    p = LAYER_PRESETS[preset]
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    with variant_env(v):
        try:
            c = configs.get_configs(T, p.D, p.F, p.E, p.K, dtype, device_type,
                                    device_name=(device_name or ASSUMED_DEVICE) if device_type == "cuda" else None)
        except Exception as exc:  # noqa: BLE001
            return {}, f"unresolved: {type(exc).__name__}: {exc}"
    return c.to_dict(), c.source


def variants(device: torch.device, shapes: Optional[dict] = None, device_name: Optional[str] = None,
             duplicates: Optional[list] = None) -> list[Variant]:
    """The variants measured on ``device`` at ``shapes`` ({preset: T}; default both targets),
    without duplicates: a variant whose resolved configs (and combine) equal an earlier one's
    at every shape is dropped (e.g. ``cfg:stages4`` under the H100 table, whose entries already
    have 4 stages) and appended to ``duplicates`` as ``(name, same_as)``. ``device_name``:
    resolve as on that CUDA device (default: ``device``'s name; without a GPU
    :data:`ASSUMED_DEVICE`)."""
    configs = _configs_module()
    shapes = shapes or TARGET_SHAPES
    if device.type == "cuda" and device_name is None:
        try:
            device_name = configs.device_name(device)
        except Exception:  # noqa: BLE001 - no GPU here: plan for the assumed one
            device_name = ASSUMED_DEVICE
    dev = device_name or device.type
    seen: dict = {}
    out = []
    for v in _candidates(configs, dev, device.type, shapes):
        sig = (dict(v.env).get(DET_ENV), json.dumps(
            [resolve_variant(v, pn, T, device.type, device_name)[0] or v.name for pn, T in shapes.items()],
            sort_keys=True))
        if sig in seen:
            if duplicates is not None:
                duplicates.append((v.name, seen[sig]))
            continue
        seen[sig] = v.name
        out.append(v)
    return out


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
    peer: Optional[str] = None  # a peer provider being swept (its rows carry the tag too)

    def add(self, **row) -> dict:
        if row.get("provider") == "triton" and self.provider:
            row["provider"] = self.provider
            row["label"] = f"ours (triton, {self.tag.get('variant')})"
        prov = str(row.get("provider", ""))
        row.update(self.tag if prov.startswith("triton") or (self.peer and prov == self.peer)
                   else {"variant": "baseline"})
        return super().add(**row)


# ----------------------------------------------------------------------------- self-check
def check_file(checks: Path, name: str, preset: str, T: int) -> Path:
    """Where the check of variant (or provider) ``name`` at ``preset`` / ``T`` is written."""
    return Path(checks) / f"check-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', name)}-{preset}-T{T}.json"


def _check_pin(v: Variant, preset: str, T: int, device: torch.device) -> Optional[str]:
    """A ``FLEXMOE_TRITON_CONFIG`` text pinning every field variant ``v`` resolves at the full
    ``T`` (so the check, at its token slice, runs the kernels the timing runs); None if the
    variant's own pin does not resolve (the check then reports that error)."""
    configs = _configs_module()
    p = LAYER_PRESETS[preset]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with variant_env(v):
        try:
            c = configs.get_configs(T, p.D, p.F, p.E, p.K, dtype, device)
        except Exception:  # noqa: BLE001
            return None
    return _pin_string(c)


def run_check(name: str, preset: str, T: int, device: torch.device, refdir: Path) -> dict:
    """The self-check of variant ``name`` (or the provider ``name``, e.g. ``liger_fused_moe``)
    at ``preset``'s check slice, in this process (see :mod:`benchmarks.check`)."""
    from . import check

    ref = check.prepare_reference(preset, T, device, refdir)
    found = [v for v in variants(device, {preset: T}) if v.name == name]
    if found:
        v = found[0]
        pin = _check_pin(v, preset, T, device)
        env = dict(v.env)
        if pin is not None:
            env[CONFIG_ENV] = pin
        with variant_env(Variant(v.name, tuple(env.items()))):
            res = check.check_provider(preset, T, device, ref)
        res.update(variant=v.name, provider=v.provider, variant_env=dict(v.env), checked_pin=pin)
        return res
    from .providers import PROVIDERS

    if name in PROVIDERS and PROVIDERS[name].check_fwd is not None:
        ok, why = PROVIDERS[name].available(device)
        if not ok:
            return dict(status="SKIPPED", error=why, preset=preset, T_full=T, provider=name, variant=name)
        res = check.check_provider(preset, T, device, ref, fwd=PROVIDERS[name].check_fwd(device))
        res.update(variant=name, provider=name)
        return res
    return dict(status="FAIL", error=f"unknown variant or provider {name!r}", preset=preset, T_full=T, variant=name)


def checked_names(device: torch.device, shapes: dict, providers=()) -> list[tuple[str, str, int]]:
    """(name, preset, T) of every check a sweep over ``shapes`` needs: each variant at each
    shape, and each peer ``providers`` entry with a check."""
    from .providers import PROVIDERS

    out = [(v.name, pn, T) for pn, T in shapes.items() for v in variants(device, {pn: T})]
    out += [(n, pn, T) for pn, T in shapes.items() for n in providers if PROVIDERS[n].check_fwd is not None]
    return out


def check_in_subprocess(name: str, preset: str, T: int, checks: Path, refdir: Path,
                        device_arg: Optional[str], timeout: float) -> dict:
    """Run the check of ``name`` in a process of its own (a crash or a sticky CUDA error ends
    there) and return its result; a process that dies or times out is a FAIL."""
    path = check_file(checks, name, preset, T)
    cmd = [sys.executable, "-m", "benchmarks.gpu_sweep", "check", "--variant", name, "--preset", preset,
           "--tokens", str(T), "--checks", str(checks), "--refdir", str(refdir)]
    cmd += ["--device", device_arg] if device_arg else []
    try:
        proc = subprocess.run(cmd, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    if path.is_file():
        return json.loads(path.read_text())
    why = f"the check process timed out after {timeout:.0f} s" if rc is None else f"the check process exited {rc} " \
        "without a result (crashed)"
    res = dict(status="FAIL", error=why, preset=preset, T_full=T, variant=name)
    _write_check(path, res)
    return res


def _write_check(path: Path, res: dict) -> None:
    from .check import write_result

    write_result(path, res)


def cmd_check(args) -> int:
    device = _device(args.device)
    checks, refdir = Path(args.checks), Path(args.refdir or Path(args.checks) / "reference")
    if not args.all:
        res = run_check(args.variant, args.preset, args.tokens, device, refdir)
        _write_check(check_file(checks, args.variant, args.preset, args.tokens), res)
        print(f"[check] {args.variant} {args.preset} T={args.tokens}: {res['status']} {res.get('error') or ''} "
              f"({res.get('seconds', 0)} s)", flush=True)
        return 0
    shapes = parse_shapes(args.shapes)
    from . import check

    for pn, T in shapes.items():  # the references first, once per shape, in this process
        check.prepare_reference(pn, T, device, refdir)
    harness.free_memory(device)
    todo = checked_names(device, shapes, [p for p in (args.providers or "").split(",") if p])
    jobs = args.jobs
    procs: list = []
    for name, pn, T in todo:
        while len([p for p in procs if p.poll() is None]) >= jobs:
            time.sleep(0.2)
        cmd = [sys.executable, "-m", "benchmarks.gpu_sweep", "check", "--variant", name, "--preset", pn,
               "--tokens", str(T), "--checks", str(checks), "--refdir", str(refdir)]
        cmd += ["--device", args.device] if args.device else []
        procs.append(subprocess.Popen(cmd))
    for p in procs:
        p.wait()
    for name, pn, T in todo:
        path = check_file(checks, name, pn, T)
        if not path.is_file():
            _write_check(path, dict(status="FAIL", error="the check process ended without a result (crashed)",
                                    preset=pn, T_full=T, variant=name))
        res = json.loads(path.read_text())
        print(f"[check] {name:24} {pn} T={T}: {res['status']} {res.get('error') or ''}", flush=True)
    return 0


# ----------------------------------------------------------------------------- layer sweep
def _device(arg: Optional[str]) -> torch.device:
    dev = torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


STICKY_EXIT = 3  # a child sweep stopped after a CUDA error; the parent restarts it for the rest


def _check_row_fields(res: dict) -> dict:
    t = res.get("tensors") or {}
    return {"check": res.get("status"), "check_error": res.get("error") or None,
            "check_tokens": res.get("T"),
            "check_max_err_ratio": max((v["err"] / v["bound"] for v in t.values() if v.get("bound")), default=None)}


_TEST_STICKY_ENV = "FLEXMOE_SWEEP_TEST_STICKY_AFTER"  # tests: act as if variant NAME left a sticky error


def _cuda_healthy(device: torch.device, after: str = "") -> bool:
    """False when the device can run nothing more (a sticky CUDA error); ``after``: the variant
    just run (the test hook :data:`_TEST_STICKY_ENV` names one to simulate the error after it)."""
    if after and os.environ.get(_TEST_STICKY_ENV) == after:
        return False
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.empty(1, device=device).add_(1)
        torch.cuda.synchronize(device)
        return True
    except Exception:  # noqa: BLE001 - a sticky error: this process can run nothing more
        return False


def run_sweep(preset: str, T: int, device: torch.device, dtype: torch.dtype, rec: TaggedRecorder,
              timing: harness.TimingConfig, names: Optional[list] = None, baselines=BASELINES,
              checks: Optional[Path] = None, refdir: Optional[Path] = None, device_arg: Optional[str] = None,
              check_timeout: float = 120.0, peers=(), skip=()) -> list:
    """Default Triton (masks none / token_all), the baselines, then every other variant and the
    peer providers; each variant (and peer) is first checked against the reference in its own
    process (the result in ``checks`` when the session's check step wrote it, else run now):
    a FAIL gets ``status="fail"`` rows with the error and is not timed. Returns the names
    done; stops early (the rest not done) when the device has a sticky CUDA error."""
    from .bench_layer import plan_jobs, run_layer

    checks = Path(checks or rec.out_dir / "checks")
    refdir = Path(refdir or checks / "reference")
    masks = ["none", "token_all"]
    done = []
    todo = [v for v in variants(device, {preset: T}) if (not names or v.name in names) and v.name not in skip]
    todo += [n for n in peers if (not names or n in names) and n not in skip]
    for v in todo:
        name = v if isinstance(v, str) else v.name
        path = check_file(checks, name, preset, T)
        res = json.loads(path.read_text()) if path.is_file() else check_in_subprocess(
            name, preset, T, checks, refdir, device_arg, check_timeout)
        print(f"[sweep] {preset} T={T} {name}: check {res['status']} {res.get('error') or ''}", flush=True)
        if isinstance(v, str):  # a peer provider (e.g. Liger's fused MoE)
            rec.tag, rec.provider, rec.peer = {"variant": name, **_check_row_fields(res)}, None, name
            if res["status"] == "PASS":
                run_layer(plan_jobs([preset], [T], [name], ["none"], MODES), device, dtype, rec, timing, False)
            else:
                for mode in MODES:
                    rec.add(bench="layer", preset=preset, provider=name, mode=mode, mask="none", T=T,
                            status="skipped" if res["status"] == "SKIPPED" else "fail",
                            note=("FAIL: " if res["status"] == "FAIL" else "") + str(res.get("error")),
                            **{k: x for k, x in rec.tag.items() if k != "variant"}, variant=name)
            rec.peer = None
            done.append(name)
            if not _cuda_healthy(device, name):
                return done
            continue
        with variant_env(v):
            cfg, source = resolved_configs(preset, T, dtype, device)
            rec.tag = {"variant": v.name, "variant_env": dict(v.env), "triton_config": cfg,
                       "triton_config_source": source, **_check_row_fields(res)}
            rec.provider = v.provider
            print(f"[sweep] {preset} T={T} variant {v.name}: {source}", flush=True)
            if res["status"] == "PASS":
                jobs = plan_jobs([preset], [T], ["triton"], masks if v.name == "default" else ["none"], MODES)
                run_layer(jobs, device, dtype, rec, timing, False)
            else:
                p = LAYER_PRESETS[preset]
                for mode in MODES:
                    rec.add(bench="layer", preset=preset, provider="triton", mode=mode, mask="none", T=T,
                            D=p.D, F=p.F, E=p.E, K=p.K, dtype=str(dtype).replace("torch.", ""),
                            status="fail", note=f"FAIL (not timed): {res.get('error')}")
        done.append(v.name)
        if not _cuda_healthy(device, v.name):
            return done
        if v.name == "default" and baselines:
            rec.provider, rec.tag = None, {}
            jobs = plan_jobs([preset], [T], list(baselines), masks, MODES)
            jobs = [j for j in jobs if j.mask == "none" or j.provider == "cuda"]
            run_layer(jobs, device, dtype, rec, timing, False)
            if not _cuda_healthy(device):
                return done
    return done


def cmd_layer(args) -> int:
    """The sweep at one shape. Unless ``--child``, it runs as a parent that starts a child
    sweep and, when the child stops after a sticky CUDA error, a new child for the variants not
    yet done (so one broken variant costs its own rows only); the parts are merged."""
    out = Path(args.out)
    if not args.child:
        return _layer_parent(args, out)
    device = _device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = harness.run_metadata(device, ["-m", "benchmarks.gpu_sweep", *sys.argv[1:]])
    meta["seed"] = int(torch.seed() % 2**31)
    torch.manual_seed(meta["seed"])
    part = Path(args.part) if args.part else out
    rec = TaggedRecorder(meta, part)
    timing = harness.TimingConfig(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=1)
    names = args.variants.split(",") if args.variants else None
    baselines = [b for b in (args.baselines or "").split(",") if b] if args.baselines is not None else BASELINES
    peers = [p for p in (args.peers or "").split(",") if p]
    skip = [n for n in (args.skip or "").split(",") if n]
    done = []
    try:
        done = run_sweep(args.preset, args.tokens, device, dtype, rec, timing, names, baselines,
                         Path(args.checks) if args.checks else out / "checks", None, args.device,
                         args.check_timeout, peers, skip)
    finally:
        paths = harness.write_results(part, meta, rec.rows)
        rec.close()
        (part / "done.json").write_text(json.dumps(done))
    ok = sum(r["status"] == "ok" for r in rec.rows)
    print(f"[sweep] {len(rec.rows)} rows ({ok} ok) -> {paths['json']}", flush=True)
    expected = [v.name for v in variants(device, {args.preset: args.tokens}) if not names or v.name in names]
    expected += [p for p in peers if not names or p in names]
    return STICKY_EXIT if [n for n in expected if n not in done and n not in skip] else 0


def _layer_parent(args, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:] if a != "--child"] if sys.argv[1:2] == ["layer"] else None
    if argv is None:  # called as a function: rebuild the command from args
        argv = ["layer", "--preset", args.preset, "--tokens", str(args.tokens), "--out", str(out),
                "--warmup-ms", str(args.warmup_ms), "--rep-ms", str(args.rep_ms)]
        for flag, val in (("--variants", args.variants), ("--baselines", args.baselines), ("--device", args.device),
                          ("--checks", args.checks), ("--peers", args.peers),
                          ("--check-timeout", str(args.check_timeout))):
            if val is not None:
                argv += [flag, val]
    skip: list = []
    parts = []
    for attempt in range(1, 20):
        part = out / f"part{attempt}"
        cmd = [sys.executable, "-m", "benchmarks.gpu_sweep", *argv, "--child", "--part", str(part)]
        if skip:
            cmd += ["--skip", ",".join(skip)]
        rc = subprocess.run(cmd).returncode
        parts.append(part)
        done = json.loads((part / "done.json").read_text()) if (part / "done.json").is_file() else []
        new = [n for n in done if n not in skip]
        skip += new
        if rc != STICKY_EXIT or not new:  # finished, crashed, or no progress: stop
            break
        print(f"[sweep] restarting after a CUDA error; done so far: {skip}", flush=True)
    meta, rows = None, []
    for part in parts:
        try:
            m, r = harness.load_results(part)
        except (ValueError, OSError):
            continue
        meta = meta or m
        rows += r
    if meta is not None:
        paths = harness.write_results(out, meta, rows)
        with open(out / "log.txt", "a", encoding="utf-8") as f:
            for part in parts:
                if (part / "log.txt").is_file():
                    f.write((part / "log.txt").read_text(errors="replace"))
        print(f"[sweep] merged {len(rows)} rows of {len(parts)} part(s) -> {paths['json']}", flush=True)
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


def kernel_launches(shapes: dict, device_type: str = "cuda", device_name: Optional[str] = None,
                    capability: int = 90) -> dict:
    """``{launch key: (launch, [variant@preset, ...])}``: every distinct Triton kernel the sweep
    launches at ``shapes`` (each variant's forward + backward, the default also with a (T, E)
    mask), recorded without a GPU by :mod:`benchmarks.kernel_compile` (its kernels must have
    been imported without ``TRITON_INTERPRET``)."""
    from . import kernel_compile as kc
    from .bench_layer import make_mask

    if device_name is None and device_type == "cuda" and torch.cuda.is_available():
        device_name = _configs_module().device_name(torch.device("cuda", torch.cuda.current_device()))
    out: dict = {}
    for pn, T in shapes.items():
        p = LAYER_PRESETS[pn]
        for v in variants(torch.device(device_type), {pn: T}, device_name):
            with variant_env(v):
                try:
                    cfgs = kc.library_configs(T, p.D, p.F, p.E, p.K, torch.bfloat16, device_name or ASSUMED_DEVICE)
                except Exception:  # noqa: BLE001 - a bad pin: its check reports it
                    continue
                det = dict(v.env).get(DET_ENV) != "0"
                for mask in (["none", "token_all"] if v.name == "default" else ["none"]):
                    m = make_mask(mask, T, p, torch.device("cpu"))
                    for launch in kc.record_layer(T, p.D, p.F, p.E, p.K, torch.bfloat16, cfgs, deterministic=det,
                                                  allow_mask=m, norm_topk_prob=False, capability=capability):
                        key = kc.launch_key(launch, capability)
                        out.setdefault(key, (launch, []))[1].append(f"{v.name}@{pn}")
    return out


def inventory(shapes: Optional[dict] = None, device_name: Optional[str] = None, peers=()) -> dict:
    """What a session sweeps, computed without a GPU: per shape the variants (after cutting
    duplicates, and which were cut), every self-check (variant or peer, preset, timed T, check
    tokens, the pin it checks) and the distinct Triton kernels to compile (recorded)."""
    from .check import check_tokens

    shapes = shapes or TARGET_SHAPES
    dev = torch.device("cuda")
    out: dict = {"device_name": device_name or ASSUMED_DEVICE, "shapes": shapes, "variants": {}, "duplicates": {},
                 "checks": [], "peers": list(peers)}
    for pn, T in shapes.items():
        dups: list = []
        vs = variants(dev, {pn: T}, device_name or ASSUMED_DEVICE, dups)
        out["variants"][pn] = [v.name for v in vs]
        out["duplicates"][pn] = dups
        tc = check_tokens(LAYER_PRESETS[pn], T, dev)
        for v in vs:
            cfg, _ = resolve_variant(v, pn, T, "cuda", device_name)
            out["checks"].append(dict(name=v.name, preset=pn, T=T, check_tokens=tc, env=dict(v.env),
                                      pinned=_pin_string(_configs_module().MoEConfigs(
                                          **{k: _configs_module().GemmConfig(**cfg[k]) for k in cfg}))
                                      if cfg else None))
        out["checks"] += [dict(name=n, preset=pn, T=T, check_tokens=tc, env={}, pinned=None) for n in peers]
    t0 = time.perf_counter()
    try:
        found = kernel_launches(shapes, "cuda", device_name)
        out["kernels"] = len(found)
        names: dict = {}
        for launch, _ in found.values():
            names[launch.name] = names.get(launch.name, 0) + 1
        out["kernels_by_name"] = names
    except Exception as exc:  # noqa: BLE001 - the plan falls back to an assumed count
        out["kernels"], out["kernels_error"] = None, f"{type(exc).__name__}: {exc}"
    out["record_s"] = round(time.perf_counter() - t0, 1)
    return out


def cmd_inventory(args) -> int:
    peers = [p for p in (args.peers or "").split(",") if p]
    inv = inventory(parse_shapes(args.shapes), args.device_name, peers)
    text = json.dumps(inv, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


_AOT_LAUNCHES: list = []  # the launches to compile, inherited by the forked workers (not picklable)


def _aot_worker(args) -> tuple:
    indices, capability = args
    from . import kernel_compile as kc

    done, failed = 0, []
    for launch in (_AOT_LAUNCHES[i] for i in indices):
        try:
            kc.compile_launch(launch, capability)
            done += 1
        except Exception as exc:  # noqa: BLE001 - reported; the JIT compiles it later if it can
            failed.append(f"{launch.name}: {type(exc).__name__}: {str(exc)[:200]}")
    return done, failed


def compile_aot(shapes: dict, jobs: int, capability: int = 90, device_name: Optional[str] = None) -> int:
    """Compile every distinct kernel of the sweep (:func:`kernel_launches`) ahead of time with
    ``triton.compile`` into Triton's cache, ``jobs`` processes (fork) at once: CPU only, no GPU
    memory; the later runs find them in the cache when their keys match (the same launch binder
    and options: see :mod:`benchmarks.kernel_compile`)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    found = kernel_launches(shapes, "cuda", device_name, capability)
    launches = [launch for launch, _ in found.values()]
    print(f"[warm] {len(launches)} distinct kernels ({time.perf_counter() - t0:.1f} s to record), "
          f"{jobs} processes", flush=True)
    _AOT_LAUNCHES[:] = launches
    idx = list(range(len(launches)))
    chunks = [(idx[i::jobs], capability) for i in range(jobs) if idx[i::jobs]]
    done, failed = 0, []
    with ProcessPoolExecutor(max_workers=max(1, len(chunks)), mp_context=mp.get_context("fork")) as ex:
        for d, f in ex.map(_aot_worker, chunks):
            done, failed = done + d, failed + f
    for f in failed:
        print(f"[warm] compile failed: {f}", flush=True)
    print(f"[warm] compiled {done} of {len(launches)} kernels in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


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
    shapes = parse_shapes(args.shapes)
    if args.aot:
        return compile_aot(shapes, args.jobs, args.capability)
    device = _device(args.device)
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
