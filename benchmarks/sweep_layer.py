"""The timed layer sweep at one shape (:mod:`benchmarks.gpu_sweep` ``layer``): every checked
variant, the baselines and the peers, in a child process; the parent restarts a child for the
variants left when a sticky CUDA error makes one unusable, and merges the parts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from . import harness
from .presets import LAYER_PRESETS
from .sweep_checks import check_file, check_in_subprocess
from .sweep_variants import BASELINES, MODES, _device, resolved_configs, variant_env, variants


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
