"""Command line of the benchmark harness.

    python -m benchmarks.run --help            # from the repository root
    python benchmarks/run.py --smoke           # CPU smoke run at tiny shapes (CI)
    python -m benchmarks.run --out benchmarks/results/<device-slug>   # the full GPU suite
    python -m benchmarks.run --targets benchmarks/results/<device-slug>/results.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import harness, report  # noqa: E402
from benchmarks.presets import (  # noqa: E402
    E2E_MODELS,
    E2E_PRESETS,
    FULL_PRESETS,
    LAYER_PRESETS,
    MASKS_FULL,
    MASKS_SMOKE,
    TOKENS_DECODE,
    TOKENS_FULL,
    TOKENS_SMOKE,
    TOKENS_TRAIN,
)

BENCHES = ["layer", "routing", "e2e"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _csv(parser, flag, value, choices=None):
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        parser.error(f"{flag} needs at least one value")
    if choices is not None:
        if items == ["all"]:
            return list(choices)
        bad = [v for v in items if v not in choices]
        if bad:
            parser.error(f"{flag}: unknown {bad}; choose from {', '.join(choices)} (or all)")
    return items


def _tokens(parser, value):
    named = {"decode": TOKENS_DECODE, "train": TOKENS_TRAIN, "full": TOKENS_FULL, "smoke": TOKENS_SMOKE}
    out = []
    for v in value.split(","):
        v = v.strip()
        if v in named:
            out += named[v]
            continue
        try:
            t = int(v)
        except ValueError:
            parser.error(f"--tokens: {v!r} is neither an int nor one of {', '.join(named)}")
        if t < 1:
            parser.error(f"--tokens: token counts must be >= 1, got {t}")
        out.append(t)
    return sorted(set(out))


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.bench_layer import MODES
    from benchmarks.bench_routing import ROUTERS
    from benchmarks.providers import PROVIDERS

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="flexmoe_kernels benchmarks: MoE layer (fwd/bwd/fwd+bwd/memory) vs dense, "
        "cuBLAS, grouped_mm, transformers and MegaBlocks; routing GB/s vs device copy; "
        "end-to-end DeepSpeed training (dense, MoE, FlexOlmo coupled). Writes results.json, "
        "results.csv, summary.md, plots and log.txt into --out. CPU numbers mean nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU, fp32, few repetitions: checks the harness in seconds")
    p.add_argument("--bench", default="all", help=f"comma list of {', '.join(BENCHES)} or all")
    p.add_argument("--presets", default=None,
                   help=f"layer presets: {', '.join(LAYER_PRESETS)} or all "
                   f"(default: {','.join(FULL_PRESETS)}; smoke: smoke)")
    p.add_argument("--providers", default="all", help=f"layer providers: {', '.join(PROVIDERS)} or all "
                   "(each runs only where available; unavailable ones get a 'skipped' row)")
    p.add_argument("--modes", default="all", help=f"layer modes: {', '.join(MODES)} or all")
    p.add_argument("--tokens", default=None,
                   help="token counts: ints and/or decode,train,full,smoke "
                   f"(default full = {TOKENS_FULL}; smoke: {TOKENS_SMOKE})")
    p.add_argument("--masks", default=None,
                   help="allow-mask variants: none, token_all, token_mixed, global:FRACTION "
                   f"(default {','.join(MASKS_FULL)}; smoke: {','.join(MASKS_SMOKE)})")
    p.add_argument("--routers", default="all", help=f"routing providers: {', '.join(ROUTERS)} or all")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="layer/routing dtype (default bf16 "
                   "on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda when available; smoke: cpu)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/out/, gitignored)")
    p.add_argument("--save-results", action="store_true",
                   help="write into benchmarks/results/<device-slug>/ (the committed GPU results) instead of --out")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA: do_bench warm-up time per measurement")
    p.add_argument("--rep-ms", type=float, default=100.0, help="CUDA: do_bench measuring time per measurement")
    p.add_argument("--cpu-reps", type=int, default=3, help="CPU: timed calls per measurement")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="CPU: torch intra-op threads (smoke default 1: stable timings on a shared machine)")
    p.add_argument("--l2-mb", type=float, default=50.0, help="L2 size to exceed when rotating input buffers")
    p.add_argument("--e2e-presets", default=None,
                   help=f"end-to-end model sizes: {', '.join(E2E_PRESETS)} (default e2e-small; smoke: e2e-smoke)")
    p.add_argument("--e2e-models", default="all", help=f"end-to-end models: {', '.join(E2E_MODELS)} or all")
    p.add_argument("--e2e-steps", type=int, default=None, help="timed training steps (default per preset)")
    p.add_argument("--e2e-backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="MoE backend of the end-to-end models (FlexOlmoConfig.moe_backend)")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2],
                   help="DeepSpeed ZeRO stage of the end-to-end benchmark")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak TFLOP/s for MFU (default: looked up from the GPU name)")
    p.add_argument("--targets", default=None, metavar="RESULTS_JSON",
                   help="report mode: print each performance target beside the measured figure from a "
                   "results.json (or a directory holding one), then exit")
    p.add_argument("--list", action="store_true", help="list presets and provider availability, then exit")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def _resolve_device(parser: argparse.ArgumentParser, args) -> torch.device:
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and not args.smoke and not args.list and (args.presets is None or args.tokens is None):
        parser.error("no CUDA device: use --smoke, or name --presets and --tokens explicitly to run real "
                     "shapes on the CPU (slow, and CPU numbers mean nothing)")
    return device


def _selection(parser: argparse.ArgumentParser, args, device: torch.device) -> argparse.Namespace:
    """The parsed, checked lists of what to run (benches, presets, providers, ...) and the dtype."""
    from benchmarks.bench_layer import MODES, parse_mask
    from benchmarks.bench_routing import ROUTERS
    from benchmarks.providers import PROVIDERS

    sel = argparse.Namespace(
        benches=_csv(parser, "--bench", args.bench, BENCHES),
        presets=_csv(parser, "--presets", args.presets or ("smoke" if args.smoke else ",".join(FULL_PRESETS)),
                     list(LAYER_PRESETS)),
        providers=_csv(parser, "--providers", args.providers, list(PROVIDERS)),
        modes=_csv(parser, "--modes", args.modes, MODES),
        tokens=_tokens(parser, args.tokens or ("smoke" if args.smoke else "full")),
        masks=_csv(parser, "--masks", args.masks or ",".join(MASKS_SMOKE if args.smoke else MASKS_FULL)),
        routers=_csv(parser, "--routers", args.routers, list(ROUTERS)),
        e2e_presets=_csv(parser, "--e2e-presets", args.e2e_presets or ("e2e-smoke" if args.smoke else "e2e-small"),
                         list(E2E_PRESETS)),
        e2e_models=_csv(parser, "--e2e-models", args.e2e_models, E2E_MODELS),
        dtype=DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32),
    )
    for m in sel.masks:
        try:
            parse_mask(m)
        except ValueError as exc:
            parser.error(str(exc))
    for flag, value in (("--cpu-reps", args.cpu_reps), ("--cpu-threads", args.cpu_threads),
                        ("--e2e-steps", args.e2e_steps)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    return sel


def _print_list(device: torch.device) -> None:
    from benchmarks.bench_routing import ROUTERS
    from benchmarks.providers import PROVIDERS

    print("layer presets:")
    for pr in LAYER_PRESETS.values():
        print(f"  {pr.name:15} D {pr.D:5} F {pr.F:6} E {pr.E:4} K {pr.K}  {pr.note}")
    for title, table in ((f"layer providers on {device}:", PROVIDERS), (f"routers on {device}:", ROUTERS)):
        print(title)
        for item in table.values():
            ok, why = item.available(device)
            print(f"  {item.name:17} {'yes' if ok else 'no ':3}  {why}")
    print("e2e presets:", ", ".join(E2E_PRESETS), "  models:", ", ".join(E2E_MODELS))


def _output_dir(parser: argparse.ArgumentParser, args, device: torch.device) -> Path:
    if args.save_results and args.out:
        parser.error("--save-results and --out are exclusive")
    if args.save_results and device.type != "cuda":
        parser.error("--save-results is for GPU runs (CPU numbers mean nothing); use --out")
    if args.save_results:
        out_dir = harness.REPO_ROOT / "benchmarks" / "results" / harness.device_slug(harness.device_name(device))
    else:
        out_dir = Path(args.out) if args.out else harness.REPO_ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _metadata(device: torch.device, argv: list) -> dict:
    meta = harness.run_metadata(device, ["-m", "benchmarks.run", *argv])
    try:
        import flexmoe_kernels

        status = {n: flexmoe_kernels.backend_status(n, device) for n in ("torch", "triton", "cuda")}
        meta["flexmoe_backends"] = {n: "available" if ok else why for n, (ok, why) in status.items()}
    except Exception as exc:  # noqa: BLE001
        meta["flexmoe_backends"] = f"flexmoe_kernels not importable: {exc}"
    meta["seed"] = int(torch.seed() % 2**31)  # fresh random data every run; recorded
    torch.manual_seed(meta["seed"])
    return meta


def _run_benches(args, sel: argparse.Namespace, device: torch.device, rec: "harness.Recorder") -> None:
    timing = harness.TimingConfig(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=args.cpu_reps)
    l2 = int(args.l2_mb * 2**20)
    show = not args.no_progress
    if "layer" in sel.benches:
        from benchmarks.bench_layer import plan_jobs, run_layer

        jobs = plan_jobs(sel.presets, sel.tokens, sel.providers, sel.masks, sel.modes)
        run_layer(jobs, device, sel.dtype, rec, timing, show, l2, harness.peak_flops(device, args.peak_tflops))
    if "routing" in sel.benches:
        from benchmarks.bench_routing import ROUTING_MASKS, run_routing

        r_masks = [m for m in sel.masks if m in ROUTING_MASKS] or ["none"]
        run_routing(sel.presets, sel.tokens, sel.routers, r_masks, device, sel.dtype, rec, timing, show, l2)
    if "e2e" in sel.benches:
        from benchmarks.bench_e2e import run_e2e

        run_e2e(sel.e2e_presets, sel.e2e_models, device, rec, harness.peak_flops(device, args.peak_tflops), show,
                args.e2e_steps, args.zero_stage, args.e2e_backend)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.targets is not None:
        try:
            meta, rows = harness.load_results(Path(args.targets))
        except ValueError as exc:
            parser.error(f"--targets: {exc}")
        print(report.format_targets(meta, rows))
        return 0

    device = _resolve_device(parser, args)
    sel = _selection(parser, args, device)
    if device.type == "cpu" and (args.cpu_threads or args.smoke):
        torch.set_num_threads(args.cpu_threads or 1)
    if args.list:
        _print_list(device)
        return 0

    out_dir = _output_dir(parser, args, device)
    meta = _metadata(device, argv)
    if meta["meaningless_cpu_numbers"]:
        print("WARNING: " + harness.CPU_WARNING, file=sys.stderr)
    rec = harness.Recorder(meta, out_dir)
    try:
        _run_benches(args, sel, device, rec)
    finally:
        paths = harness.write_results(out_dir, meta, rec.rows)
        rec.close()
    (out_dir / "summary.md").write_text(report.summarize(meta, rec.rows), encoding="utf-8")
    plots = [] if args.no_plots else report.make_plots(meta, rec.rows, out_dir)
    counts = {s: sum(r["status"] == s for r in rec.rows) for s in ("ok", "error", "skipped")}
    print(f"{len(rec.rows)} rows ({counts['ok']} ok, {counts['error']} errors, {counts['skipped']} skipped) -> "
          f"{paths['json']}, {paths['csv']}, {out_dir / 'summary.md'}, {len(plots)} plots, {out_dir / 'log.txt'}")
    print(report.format_targets(meta, rec.rows))
    if meta["meaningless_cpu_numbers"]:
        print("WARNING: " + harness.CPU_WARNING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
