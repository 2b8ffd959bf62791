"""The self-checks of the layer sweep (:mod:`benchmarks.gpu_sweep` ``check``): each variant (or
peer provider) runs forward + backward on a token slice of the shape against the float64
reference (:mod:`benchmarks.check`), in a process of its own, before it is timed.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import harness
from .presets import LAYER_PRESETS
from .sweep_variants import (CONFIG_ENV, Variant, _configs_module, _device, _pin_string, parse_shapes, variant_env,
                             variants)


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
