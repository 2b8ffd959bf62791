"""The compile warm-up of the layer sweep (:mod:`benchmarks.gpu_sweep` ``compile`` and
``inventory``): every distinct Triton kernel the sweep launches, recorded without a GPU and
compiled ahead of time into Triton's cache (or by running each variant once).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import harness
from .presets import LAYER_PRESETS
from .sweep_variants import (ASSUMED_DEVICE, DET_ENV, TARGET_SHAPES, _configs_module, _device, _pin_string,
                             parse_shapes, resolve_variant, variant_env, variants)


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
