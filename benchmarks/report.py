"""Markdown summary, plots and the performance-targets report, all computed from result rows.

Every ratio compares measurements of the same run (same process, same device), medians.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .harness import CPU_WARNING

KERNEL_BACKENDS = ("triton", "cuda")
OURS = ("triton", "cuda", "torch")
LAYER_MODES = ("fwd", "bwd", "fwd_bwd")
TRAIN_T_MIN = 4096


# ----------------------------------------------------------------------------- row helpers
def _ok(rows, **match) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _one(rows, **match) -> Optional[dict]:
    found = _ok(rows, **match)
    return found[0] if found else None


def _ms(rows, **match) -> Optional[float]:
    r = _one(rows, **match)
    return r["ms"] if r and r.get("ms") else None


def _fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _order(values, preferred):
    vals = list(dict.fromkeys(values))
    return [v for v in preferred if v in vals] + [v for v in vals if v not in preferred]


PROVIDER_ORDER = ["triton", "cuda", "torch", "torch_grouped_mm", "hf_grouped_mm", "hf_eager",
                  "megablocks_dmoe", "dense_swiglu", "cublas_gemm"]


def best_ours(rows, kernels_only: bool, **match) -> Optional[dict]:
    """The fastest of our backends on ``match`` (kernel backends only, or any of ours)."""
    names = KERNEL_BACKENDS if kernels_only else OURS
    cands = [r for r in _ok(rows, **match) if r.get("provider") in names and r.get("ms")]
    return min(cands, key=lambda r: r["ms"]) if cands else None


# ----------------------------------------------------------------------------- summary
def summarize(meta: dict, rows: list[dict]) -> str:
    """A markdown report of one run (tables + ratios + targets + failures)."""
    out = ["# flexmoe_kernels benchmark summary", ""]
    if meta.get("meaningless_cpu_numbers", True):
        out += [f"> **WARNING — {CPU_WARNING}**", ""]
    out += [
        _md_table(["field", "value"], [[k, f"`{meta.get(k)}`"] for k in (
            "device", "torch", "triton", "deepspeed", "transformers", "megablocks", "cuda", "python",
            "git_commit", "timestamp", "command")]),
        "",
        "Times are medians (p20-p80 in results.csv). TFLOP/s (and MFU) use model FLOPs: forward "
        "`6*T*K*D*F + 2*T*D*E` (MoE) or `6*T*K*D*F` (dense baselines), backward 2x, fwd+bwd 3x "
        "(`18*P*D*F` for the experts, P = T*K). Executed FLOPs (`flops_executed`, shown as "
        "\"exec\" where they differ) add what an implementation re-runs: our Triton backward "
        "recomputes the gate/up GEMM (`4*P*D*F`, `22*P*D*F` in all) unless `up.keep_preact`. "
        "See benchmarks/README.md and benchmarks/flops.py.",
        "",
    ]
    out += _layer_section(rows)
    out += _routing_section(rows)
    out += _e2e_section(rows)
    out += ["## Performance targets", "", "```", format_targets(meta, rows), "```", ""]
    bad = [r for r in rows if r.get("status") in ("error", "skipped", "fail")]
    if bad:
        out += ["## Skipped / failed measurements", "",
                "`fail`: the variant or provider failed its check against the reference (benchmarks/check.py) "
                "and was not timed.", ""]
        seen = {}
        for r in bad:
            key = (r.get("bench"), r.get("provider"), r.get("status"), r.get("note"))
            seen[key] = seen.get(key, 0) + 1
        out.append(_md_table(["bench", "provider", "status", "count", "reason"],
                             [[str(k[0]), str(k[1]), str(k[2]), str(n), str(k[3])] for k, n in seen.items()]))
        out.append("")
    return "\n".join(out)


def _exec(r: dict) -> str:
    """`` (exec X)``: the executed TFLOP/s of a row when they differ from its model TFLOP/s."""
    te, t = r.get("tflops_executed"), r.get("tflops")
    return f" (exec {_fmt(te)})" if te and t and abs(te - t) > 1e-9 * t else ""


def _layer_section(rows) -> list[str]:
    lay = [r for r in rows if r.get("bench") == "layer"]
    if not lay:
        return []
    out = ["## Layer benchmark", ""]
    for preset in _order([r["preset"] for r in lay], []):
        pr = [r for r in lay if r["preset"] == preset]
        p0 = pr[0]
        out += [f"### {preset} (D {p0['D']}, F {p0['F']}, E {p0['E']}, K {p0['K']}, {p0.get('dtype')})", ""]
        provs = _order([r["provider"] for r in _ok(pr)], PROVIDER_ORDER)
        tokens = sorted({r["T"] for r in pr})
        for mode in LAYER_MODES:
            body = []
            for T in tokens:
                cells = []
                for prov in provs:
                    r = _one(pr, provider=prov, mode=mode, mask="none", T=T)
                    cells.append(f"{_fmt(r['ms'])} ms / {_fmt(r.get('tflops'))}{_exec(r)}" if r else "-")
                if any(c != "-" for c in cells):
                    body.append([str(T)] + cells)
            if body:
                out += [f"**{mode}** (median ms / TFLOP/s, no mask)", "",
                        _md_table(["T"] + provs, body), ""]
        # ratios, side by side in this run
        body = []
        for T in tokens:
            for mode in ("fwd", "fwd_bwd"):
                for ours in [o for o in OURS if _one(pr, provider=o, mode=mode, mask="none", T=T)]:
                    o = _one(pr, provider=ours, mode=mode, mask="none", T=T)
                    g = _one(pr, provider="cublas_gemm", mode=mode, mask="none", T=T)
                    d = _ms(pr, provider="dense_swiglu", mode=mode, mask="none", T=T)
                    gm = _ms(pr, provider="torch_grouped_mm", mode=mode, mask="none", T=T)
                    masks = {}
                    for m in sorted({r["mask"] for r in _ok(pr, provider=ours, mode=mode, T=T)} - {"none"}):
                        mm = _ms(pr, provider=ours, mode=mode, mask=m, T=T)
                        masks[m] = mm / o["ms"] if mm else None
                    body.append([
                        str(T), mode, ours,
                        _fmt(o["tflops"] / g["tflops"] if g and g.get("tflops") else None, ".2f"),
                        _fmt(d / o["ms"] if d else None, ".2f"),
                        _fmt(gm / o["ms"] if gm else None, ".2f"),
                        ", ".join(f"{k}: {_fmt(v, '.3f')}" for k, v in masks.items()) or "-",
                    ])
        if body:
            out += ["**Ratios** (same run, medians): TFLOP/s as a fraction of the equal-FLOPs "
                    "cuBLAS GEMM; speed-up over the dense SwiGLU of equal active FLOPs and over "
                    "torch grouped_mm (>1 = ours faster); masked / unmasked time (>1 = slower).", "",
                    _md_table(["T", "mode", "ours", "vs cuBLAS", "vs dense", "vs grouped_mm",
                               "masked / unmasked"], body), ""]
        mem = _ok(pr, mode="memory")
        if mem:
            mprovs = _order([r["provider"] for r in mem], PROVIDER_ORDER)
            body = [[str(T)] + [_fmt((_one(mem, provider=p, T=T) or {}).get("peak_mem_mb"), ".0f")
                                for p in mprovs] for T in tokens]
            out += ["**Peak memory** of one fwd+bwd (MiB beyond inputs and weights)", "",
                    _md_table(["T"] + mprovs, body), ""]
    return out


def _routing_section(rows) -> list[str]:
    rt = [r for r in rows if r.get("bench") == "routing"]
    if not rt:
        return []
    out = ["## Routing benchmark", ""]
    cp = _one(rt, provider="device_copy")
    out += [f"Device copy bandwidth (same run): **{_fmt(cp['gbps'] if cp else None, '.1f')} GB/s**.", ""]
    body = []
    for r in _ok(rt):
        if r["provider"] == "device_copy":
            continue
        body.append([r["preset"], str(r["T"]), r["provider"], r["mask"], _fmt(r["ms"]), _fmt(r["gbps"]),
                     _fmt(100 * r["pct_of_copy"] if r.get("pct_of_copy") else None, ".1f")])
    if body:
        out += [_md_table(["preset", "T", "router", "mask", "ms", "GB/s", "% of copy"], body), ""]
    return out


def _e2e_section(rows) -> list[str]:
    e2 = [r for r in rows if r.get("bench") == "e2e"]
    if not e2:
        return []
    out = ["## End-to-end training (DeepSpeed)", ""]
    for preset in _order([r["preset"] for r in e2], []):
        pr = _ok(e2, preset=preset)
        if not pr:
            continue
        out += [f"### {preset} (B {pr[0]['batch']} x S {pr[0]['seq']}, D {pr[0]['D']}, L {pr[0]['layers']}, "
                f"{pr[0]['dtype']})", ""]
        body = [[r["provider"], f"{r['E']}/{r['K']}", _fmt(r["ms"]), _fmt(r["tokens_per_s"], ".4g"),
                 _fmt(r.get("tflops")), _fmt(r.get("tflops_executed")),
                 _fmt(100 * r["mfu"] if r.get("mfu") else None, ".1f"),
                 f"{r['params_trainable']:,} / {r['params_total']:,}"] for r in pr]
        out += [_md_table(["model", "E/K", "step ms", "tokens/s", "TFLOP/s (model)", "TFLOP/s (executed)", "MFU %",
                           "trainable / total params"], body), ""]
        c, f2 = _ms(pr, provider="flexolmo_coupled"), _ms(pr, provider="moe2_full")
        m, d = _ms(pr, provider="moe"), _ms(pr, provider="dense")
        out += [f"- coupled expert training speed-up over the fully trainable 2-expert MoE: "
                f"**{_fmt(f2 / c if c and f2 else None, '.2f')}x**",
                f"- step time standard MoE / dense: **{_fmt(m / d if m and d else None, '.2f')}x**; "
                f"2-expert MoE / dense: **{_fmt(f2 / d if f2 and d else None, '.2f')}x**", ""]
    return out


# ----------------------------------------------------------------------------- targets
@dataclass
class Target:
    key: str
    text: str
    op: str  # ">=" | "<=" | ">"
    goal: float
    compute: Callable[[list[dict]], tuple[Optional[float], str]]
    unit: str = ""


def _layer_pair(rows, preset, mode, other: Optional[str], mask="none", other_mask="none"):
    """(ours_row, other_row, T) at the largest T where both exist, preferring training sizes."""
    ts = sorted({r["T"] for r in _ok(rows, bench="layer", preset=preset, mode=mode)}, reverse=True)
    ts = [t for t in ts if t >= TRAIN_T_MIN] + [t for t in ts if t < TRAIN_T_MIN]
    for kernels_only in (True, False):
        for T in ts:
            o = best_ours(rows, kernels_only, bench="layer", preset=preset, mode=mode, mask=mask, T=T)
            if o is None:
                continue
            if other is None:
                return o, None, T
            if other == "ours":
                x = _one(rows, bench="layer", preset=preset, mode=mode, mask=other_mask, T=T, provider=o["provider"])
            else:
                x = _one(rows, bench="layer", preset=preset, mode=mode, mask=other_mask, T=T, provider=other)
            if x is not None and x.get("ms"):
                return o, x, T
    return None, None, None


def _where(o, T) -> str:
    s = f"{o['provider']} at T={T}"
    if o["provider"] == "torch":
        s += " (torch reference backend; no kernel backend measured)"
    if T < TRAIN_T_MIN:
        s += " (not a training-size T)"
    return s


def _layer_target(preset, mode, other, value, detail):
    """A target reader comparing our best backend's layer row with provider ``other`` (None:
    our row alone): returns ``(value(o, g), where + detail(o, g))`` or ``(None, why)``."""
    def f(rows):
        o, g, T = _layer_pair(rows, preset, mode, other)
        if o is None:
            return None, "needs our backend" + (f" and {other}" if other else "") + " rows"
        return value(o, g), _where(o, T) + detail(o, g)
    return f


def _vs_gemm(preset, mode):
    return _layer_target(preset, mode, "cublas_gemm", lambda o, g: o["tflops"] / g["tflops"],
                         lambda o, g: f": {o['tflops']:.4g} vs {g['tflops']:.4g} TFLOP/s")


def _abs_tflops(preset, mode):
    return _layer_target(preset, mode, None, lambda o, g: o["tflops"], lambda o, g: "")


def _vs_gmm(preset, mode):
    return _layer_target(preset, mode, "torch_grouped_mm", lambda o, g: g["ms"] / o["ms"],
                         lambda o, g: f": {o['ms']:.4g} ms vs grouped_mm {g['ms']:.4g} ms")


def _mask_overhead(rows):
    worst, detail = None, "needs fwd rows with mask none and token_all/token_mixed for our backend"
    for preset in sorted({r["preset"] for r in _ok(rows, bench="layer")}):
        for m in ("token_all", "token_mixed"):
            o, x, T = _layer_pair(rows, preset, "fwd", "ours", mask="none", other_mask=m)
            if o is None:
                continue
            v = x["ms"] / o["ms"]
            if worst is None or v > worst:
                worst, detail = v, f"worst: {preset}, mask {m}, {_where(o, T)}"
            break  # token_all (pure overhead) when measured, else the mixed mask
    return worst, detail


def _routing_share(rows):
    worst, detail = None, "needs routing rows and layer fwd rows of the same preset and T"
    routers = ("cuda_route", "triton_route", "torch_route")
    for preset in sorted({r["preset"] for r in _ok(rows, bench="routing") if r.get("preset")}):
        ts = sorted({r["T"] for r in _ok(rows, bench="routing", preset=preset)}, reverse=True)
        for T in ts:
            rt = [r for r in _ok(rows, bench="routing", preset=preset, T=T, mask="none") if r["provider"] in routers]
            lay = best_ours(rows, True, bench="layer", preset=preset, mode="fwd", mask="none", T=T) or \
                best_ours(rows, False, bench="layer", preset=preset, mode="fwd", mask="none", T=T)
            if not rt or lay is None:
                continue
            r = min(rt, key=lambda q: q["ms"])
            v = r["ms"] / lay["ms"]
            if worst is None or v > worst:
                worst, detail = v, f"worst: {preset} T={T}: {r['provider']} {r['ms']:.4g} ms / {lay['provider']} layer fwd {lay['ms']:.4g} ms"
            break
    return worst, detail


def _cuda_router_bw(rows):
    rs = _ok(rows, bench="routing", provider="cuda_route", mask="none")
    rs = [r for r in rs if r.get("pct_of_copy")]
    if not rs:
        return None, "needs cuda_route rows"
    r = max(rs, key=lambda q: q["T"])
    return r["pct_of_copy"], f"{r['preset']} T={r['T']}: {r['gbps']:.4g} GB/s"


def _cuda_vs_triton(rows):
    worst, detail = None, "needs cuda_route and triton_route rows"
    for r in _ok(rows, bench="routing", provider="cuda_route"):
        t = _one(rows, bench="routing", provider="triton_route", preset=r["preset"], T=r["T"], mask=r["mask"])
        if t:
            v = t["ms"] / r["ms"]
            if worst is None or v < worst:
                worst, detail = v, f"slowest case: {r['preset']} T={r['T']} mask {r['mask']}"
    return worst, detail


def _e2e_ratio(num, den, invert=False):
    def f(rows):
        for preset in sorted({r["preset"] for r in _ok(rows, bench="e2e")}):
            a, b = _ms(rows, bench="e2e", preset=preset, provider=num), _ms(rows, bench="e2e", preset=preset, provider=den)
            if a and b:
                return a / b, f"{preset}: {num} {a:.4g} ms, {den} {b:.4g} ms per step"
        return None, f"needs e2e rows for {num} and {den}"
    return f


TARGETS = [
    Target("7x7b-fwd", "flexolmo-7x7b layer fwd >= 90% of cuBLAS dense TFLOP/s", ">=", 0.90,
           _vs_gemm("flexolmo-7x7b", "fwd"), "x"),
    Target("7x7b-fwd-bwd", "flexolmo-7x7b layer fwd+bwd >= 85% of cuBLAS dense TFLOP/s", ">=", 0.85,
           _vs_gemm("flexolmo-7x7b", "fwd_bwd"), "x"),
    Target("fg-fwd", "fine-grained (E128 K8) fwd >= 550 TFLOP/s on H100", ">=", 550,
           _abs_tflops("fine-grained", "fwd"), " TFLOP/s"),
    Target("fg-fwd-bwd", "fine-grained fwd+bwd >= 450 TFLOP/s on H100", ">=", 450,
           _abs_tflops("fine-grained", "fwd_bwd"), " TFLOP/s"),
    Target("routing-share", "routing + permutation <= 3% of layer fwd", "<=", 0.03, _routing_share, "x"),
    Target("mask-overhead", "per-token masks <= 2% over no mask (layer fwd time ratio)", "<=", 1.02,
           _mask_overhead, "x"),
    Target("fg-vs-grouped-mm-fwd", ">= 1.3x torch grouped_mm on fine-grained (fwd)", ">=", 1.3,
           _vs_gmm("fine-grained", "fwd"), "x"),
    Target("fg-vs-grouped-mm-fwd-bwd", ">= 1.3x torch grouped_mm on fine-grained (fwd+bwd)", ">=", 1.3,
           _vs_gmm("fine-grained", "fwd_bwd"), "x"),
    Target("cuda-router-bw", "CUDA router >= 70% of device-copy bandwidth", ">=", 0.70, _cuda_router_bw, "x"),
    Target("cuda-vs-triton-router", "CUDA router faster than Triton routing (speed-up, slowest case)", ">",
           1.0, _cuda_vs_triton, "x"),
    Target("coupled-speedup", "coupled expert training >= 1.3x faster per step than the fully trainable "
           "2-expert MoE", ">=", 1.3, _e2e_ratio("moe2_full", "flexolmo_coupled"), "x"),
    Target("moe-vs-dense", "MoE step time within 1.15x of dense with equal active params", "<=", 1.15,
           _e2e_ratio("moe", "dense"), "x"),
]


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Each target with its measured value (or None), PASS / FAIL / NOT MEASURED and details."""
    out = []
    for t in TARGETS:
        try:
            val, detail = t.compute(rows)
        except Exception as exc:  # noqa: BLE001 - a malformed results file must not hide the others
            val, detail = None, f"could not evaluate: {exc!r}"
        if val is None:
            status = "NOT MEASURED"
        else:
            passed = {">=": val >= t.goal, "<=": val <= t.goal, ">": val > t.goal}[t.op]
            status = "PASS" if passed else "FAIL"
        out.append(dict(key=t.key, text=t.text, op=t.op, goal=t.goal, unit=t.unit,
                        measured=val, status=status, detail=detail))
    return out


def format_targets(meta: dict, rows: list[dict]) -> str:
    lines = []
    if meta.get("meaningless_cpu_numbers", True):
        lines.append("WARNING: " + CPU_WARNING + " PASS/FAIL below is not evidence of anything.")
    lines.append(f"device: {meta.get('device')}   commit: {meta.get('git_commit')}   time: {meta.get('timestamp')}")
    for t in evaluate_targets(rows):
        meas = "-" if t["measured"] is None else f"{t['measured']:.4g}{t['unit']}"
        lines.append(f"[{t['status']:>12}] {t['text']}")
        lines.append(f"{'':15} target {t['op']} {t['goal']:g}{t['unit']}   measured {meas}   ({t['detail']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _log2_axes(ax, ylabel: str, title: Optional[str] = None) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens T")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title is not None:
        ax.set_title(title)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_layers(plt, rows: list[dict], out_dir: Path, title: str, warn: str) -> list[Path]:
    """One figure per layer preset: TFLOP/s against T, forward and forward+backward."""
    paths = []
    lay = _ok(rows, bench="layer", mask="none")
    for preset in _order([r["preset"] for r in lay], []):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, mode in zip(axes, ("fwd", "fwd_bwd")):
            pr = [r for r in lay if r["preset"] == preset and r["mode"] == mode and r.get("tflops")]
            for prov in _order([r["provider"] for r in pr], PROVIDER_ORDER):
                pts = sorted((r["T"], r["tflops"]) for r in pr if r["provider"] == prov)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            _log2_axes(ax, "TFLOP/s (active FLOPs)", mode)
            if pr:
                ax.legend(fontsize=7)
        fig.suptitle(f"MoE layer {preset} {title}", color="red" if warn else "black")
        paths.append(_save(plt, fig, out_dir / f"layer_{preset}.png"))
    return paths


def _mask_ratio_points(rows: list[dict], pr: list[dict], preset: str, prov: str, mask: str) -> list:
    pts = []
    for r in pr:
        if r["provider"] == prov and r["mask"] == mask:
            base = _ms(rows, bench="layer", mode="fwd", preset=preset, provider=prov, mask="none", T=r["T"])
            if base:
                pts.append((r["T"], r["ms"] / base))
    return sorted(pts)


def _plot_masks(plt, rows: list[dict], out_dir: Path, title: str, warn: str) -> list[Path]:
    """Opt-out sweeps: masked / unmasked forward time of each of our backends."""
    masked = [r for r in _ok(rows, bench="layer", mode="fwd") if r["provider"] in OURS and r["mask"] != "none"]
    m_presets = _order([r["preset"] for r in masked], [])
    if not m_presets:
        return []
    fig, axes = plt.subplots(1, len(m_presets), figsize=(5.5 * len(m_presets), 4.2), squeeze=False)
    for ax, preset in zip(axes[0], m_presets):
        pr = [r for r in masked if r["preset"] == preset]
        for prov in _order([r["provider"] for r in pr], PROVIDER_ORDER):
            for m in _order([r["mask"] for r in pr], []):
                pts = _mask_ratio_points(rows, pr, preset, prov, m)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{prov} {m}")
        ax.axhline(1.02, color="r", ls=":", label="target 1.02 (per-token)")
        _log2_axes(ax, "masked / unmasked fwd time", preset)
        ax.legend(fontsize=7)
    fig.suptitle(f"opt-out masks {title}", color="red" if warn else "black")
    return [_save(plt, fig, out_dir / "masks.png")]


def _plot_routing(plt, rows: list[dict], out_dir: Path, title: str, warn: str) -> list[Path]:
    rt = [r for r in _ok(rows, bench="routing", mask="none") if r["provider"] != "device_copy"]
    if not rt:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset in _order([r["preset"] for r in rt], []):
        for prov in _order([r["provider"] for r in rt], []):
            pts = sorted((r["T"], r["gbps"]) for r in rt if r["preset"] == preset and r["provider"] == prov)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{preset} {prov}")
    cp = _one(rows, bench="routing", provider="device_copy")
    if cp:
        ax.axhline(cp["gbps"], color="k", ls="--", label="device copy")
    _log2_axes(ax, "GB/s (minimal traffic)")
    ax.legend(fontsize=7)
    ax.set_title(f"routing {title}", color="red" if warn else "black")
    return [_save(plt, fig, out_dir / "routing.png")]


def _plot_e2e(plt, rows: list[dict], out_dir: Path, title: str, warn: str) -> list[Path]:
    e2 = _ok(rows, bench="e2e")
    if not e2:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar(range(len(e2)), [r["tokens_per_s"] for r in e2])
    ax.set_xticks(range(len(e2)))
    ax.set_xticklabels([f"{r['preset']}\n{r['provider']}" for r in e2], fontsize=7)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"training step throughput (DeepSpeed) {title}", color="red" if warn else "black")
    return [_save(plt, fig, out_dir / "e2e.png")]


def make_plots(meta: dict, rows: list[dict], out_dir: Path) -> list[Path]:
    """PNG plots (matplotlib, Agg) made from the rows; returns the written paths: one per layer
    preset (TFLOP/s vs T), the opt-out mask overhead, routing GB/s, e2e tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    warn = "\nCPU SMOKE RUN: NUMBERS MEAN NOTHING" if meta.get("meaningless_cpu_numbers", True) else ""
    title = f"on {meta.get('device', '?')}{warn}"
    paths: list[Path] = []
    for plot in (_plot_layers, _plot_masks, _plot_routing, _plot_e2e):
        paths += plot(plt, rows, out_dir, title, warn)
    return paths
