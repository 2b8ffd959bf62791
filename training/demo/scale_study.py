"""Which scale the comparative claims need: the demo at three model sizes on this CPU.

The paper's merged model beats BTM and a standard MoE trained without data restrictions at equal
training FLOPs at 7B. At the demo's sizes (0.76 M and 1.5 M parameters) it does not. This study runs
the whole demo (same corpora, recipe, seed) at ``POINTS``: 1x (the demo's first default), 2x (the
default: the opt-out claim needs it, docs/DEMO.md) and about 4x the public model's parameters,
with the data and the training steps scaled along, and reports
how three gaps of mean owner-domain held-out loss (nats/token; negative = the merged model is
better) move with size:

* ``merged - BTM top-2``: the BTM output ensemble of equal training FLOPs,
* ``merged - joint MoE``: a standard MoE trained on all domains' data, equal training FLOPs,
* ``merged - oracle``: each owner domain routed to {public, its own expert} (what routing costs).

Each point is an ordinary demo run directory under ``WORK_DIR`` (reused when finished), so its
full report and claims are there too. ``flexmoe demo --scale-study`` runs it and writes
``WORK_DIR/scale_study.json``, ``scale_study.md`` (the table) and ``scale_study.png`` (the plot).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional

__all__ = ["POINTS", "GAPS", "format_table", "plot_study", "run_study", "study_row"]

# Overrides of the default demo (= the 2x point) per point: width, FFN and depth for about 1x / 2x / 4x the public
# model's parameters; training bytes per domain and steps scaled by 1.5 and 2 (tokens per
# parameter fall with size: the 4x point has 2x the tokens, so its models see relatively less).
POINTS: Dict[str, dict] = {
    "1x": dict(hidden_size=128, intermediate_size=256, train_bytes=400_000, public_steps=300, expert_steps=250),
    "2x": {},
    "4x": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, train_bytes=800_000, public_steps=600,
               expert_steps=500),
}

# (row key, label, loss config subtracted from the merged model's)
GAPS = [("vs_btm", "merged - BTM top-2", "btm-top2"), ("vs_moe", "merged - joint MoE", "moe"),
        ("vs_oracle", "merged - oracle routing", "oracle")]


def _public_params(run_dir: str) -> int:
    """Parameters of the run's dense public model, counted from its checkpoint."""
    from flexmoe_kernels.models.checkpoint import load_state_dict

    return int(sum(t.numel() for t in load_state_dict(os.path.join(run_dir, "ckpt", "public")).values()))


def study_row(point: str, results: dict) -> dict:
    """One table row from a finished demo's ``results``: sizes, owner-domain means and the gaps."""
    from .claims import owner_avg

    s = results["settings"]
    means = {c: owner_avg(results, c) for c in ("merged", "btm-top2", "moe", "oracle", "public")}
    row = {"point": point, "params": _public_params(results["run_dir"]), "hidden_size": s["hidden_size"],
           "intermediate_size": s["intermediate_size"], "layers": s["num_hidden_layers"],
           "train_bytes": s["train_bytes"], "public_steps": s["public_steps"], "expert_steps": s["expert_steps"],
           "flexolmo_flops": (results.get("flops") or {}).get("flexolmo"), "seconds": results.get("total_s"),
           "owner_avg": means, "run_dir": results["run_dir"]}
    for key, _, other in GAPS:
        m, o = means["merged"], means[other]
        row[key] = None if m is None or o is None else m - o
    row["claims"] = {c["id"]: c["verdict"] for c in results.get("claims", [])}
    return row


def format_table(rows: List[dict]) -> str:
    """The study as a Markdown table (one row per point)."""
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    head = ("| point | public params | D / F / layers | data per domain | steps (public + expert) | merged | BTM top-2 "
            "| joint MoE | oracle | " + " | ".join(label for _, label, _ in GAPS) + " | wall |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        m = r["owner_avg"]
        gaps = " | ".join("-" if r[k] is None else f"{r[k]:+.3f}" for k, _, _ in GAPS)
        wall = "-" if r["seconds"] is None else f"{r['seconds'] / 60:.1f} min"
        lines.append(f"| {r['point']} | {r['params'] / 1e6:.2f} M | {r['hidden_size']} / {r['intermediate_size']} / "
                     f"{r['layers']} | {r['train_bytes'] // 1000} kB | {r['public_steps']} + {r['expert_steps']} | "
                     f"{f(m['merged'])} | {f(m['btm-top2'])} | {f(m['moe'])} | {f(m['oracle'])} | {gaps} | {wall} |")
    return "\n".join(lines)


def plot_study(rows: List[dict], path: str) -> Optional[str]:
    """The three gaps against the public model's parameters (log scale); None without matplotlib."""
    try:
        from .report import _pyplot

        plt = _pyplot()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["params"] / 1e6 for r in rows]
    for key, label, _ in GAPS:
        ax.plot(xs, [float("nan") if r[key] is None else r[key] for r in rows], marker="o", label=label)
    ax.axhline(0.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.minorticks_off()                  # only the points' own labels on the log axis
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:.2f} M\n({r['point']})" for x, r in zip(xs, rows)])
    ax.set_xlabel("public model parameters")
    ax.set_ylabel("gap in mean owner-domain loss (nats/token)\n< 0: the merged model is better")
    ax.set_title("FlexOlmo merged model vs baselines of equal FLOPs, by size")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def run_study(work_dir: str, points: List[str], run: Callable[[str, dict], dict],
              log: Callable[[str], None] = print) -> List[dict]:
    """Run (or reuse) the demo at each of ``points`` with ``run(point, overrides) -> results``,
    then write ``scale_study.json`` / ``.md`` / ``.png`` into ``work_dir``; returns the rows."""
    from flexmoe_kernels.utils.fs import write_text_atomic

    bad = [p for p in points if p not in POINTS]
    if bad:
        raise ValueError(f"unknown scale-study point(s) {bad}; known: {list(POINTS)}")
    rows = []
    for p in points:
        log(f"== scale study: point {p} ({POINTS[p] or 'the default demo'})")
        rows.append(study_row(p, run(p, POINTS[p])))
    os.makedirs(work_dir, exist_ok=True)
    write_text_atomic(os.path.join(work_dir, "scale_study.json"), json.dumps(rows, indent=1))
    table = format_table(rows)
    write_text_atomic(os.path.join(work_dir, "scale_study.md"), table + "\n")
    plot = plot_study(rows, os.path.join(work_dir, "scale_study.png"))
    log("scale study (mean owner-domain held-out loss, nats/token):\n" + table)
    log(f"written: {os.path.join(work_dir, 'scale_study.json')}, scale_study.md" + (", scale_study.png" if plot else ""))
    return rows
