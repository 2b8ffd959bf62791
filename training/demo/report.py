"""The demo's report: a printed table, the routing table, the audit, the claims (computed from
this run's numbers by :mod:`.claims`), JSON and plots.

Input is the ``results`` dict the pipeline assembles (also the JSON written to disk)::

    results["public_domain"]  = "readmes"
    results["owner_domains"]  = ["code", "man", "licenses"]
    results["losses"][config][domain] = {"loss": nats/token, "ppl": exp(loss), "tokens": int}
    results["configs"][config] = {"kind": ..., "label": ..., "flops_per_token": forward FLOPs, ...}
    results["routing"][config][domain] = RoutingStats.table()   (optional: "experts", "weight" and
                                          "top1" as [layer][expert])
    results["audit"] = [AuditResult.to_json(), ...]           (optional; entries with a "control"
                                          key are the audit's positive control)
    results["router"] = {...}                                 (optional: router init / tuning values,
                                          printed as they are)

Config names and kinds are listed in :mod:`.measure`; a row of an unknown kind is printed after
the known ones.
"""
from __future__ import annotations

import json
import math
from typing import List, Optional

from .claims import DEFAULT_THRESHOLDS, compute_claims, loss_of

__all__ = ["compute_claims", "format_table", "format_routing", "format_audit", "format_report", "format_hints",
           "generate_hints", "write_json", "write_plots", "plot_losses", "plot_routing", "DEFAULT_THRESHOLDS"]

_KIND_RANK = {"public": 0, "owner": 1, "dense": 2, "merged": 3, "untuned": 4, "oracle": 5, "optout": 6, "topk": 7,
              "btm": 8, "moe": 9}


def _fmt(x: Optional[float], nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _label(results: dict, c: str) -> str:
    return results.get("configs", {}).get(c, {}).get("label", c)


def _config_order(results: dict) -> List[str]:
    configs = list(results["losses"])
    kinds = results.get("configs", {})
    return sorted(configs, key=lambda c: (_KIND_RANK.get(kinds.get(c, {}).get("kind", ""), 99), configs.index(c)))


def _columns(head: List[str], rows: List[List[str]], right_from: int = 1) -> List[str]:
    """Aligned text columns (the first ``right_from`` left-aligned, the rest right-aligned)."""
    w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w[i]) if i < right_from else x.rjust(w[i]) for i, x in enumerate(r))  # noqa: E731
    return [line(head), line(["-" * x for x in w])] + [line(r) for r in rows]


def format_table(results: dict) -> str:
    """Held-out loss (nats/token) per config (rows) and domain (columns), the owner-domain mean and
    the forward FLOPs per token of each row (when recorded)."""
    owners = list(results["owner_domains"])
    doms = [results["public_domain"]] + owners
    cfgs = results.get("configs", {})
    has_flops = any("flops_per_token" in cfgs.get(c, {}) for c in results["losses"])
    head = (["model / setting"] + [d + ("*" if d == results["public_domain"] else "") for d in doms] + ["owners avg"]
            + (["MFLOP/tok"] if has_flops else []))
    rows = []
    for c in _config_order(results):
        vals = [loss_of(results, c, d) for d in doms]
        ov = [v for v, d in zip(vals, doms) if d in owners and v is not None]
        avg = sum(ov) / len(ov) if len(ov) == len(owners) and ov else None
        fl = cfgs.get(c, {}).get("flops_per_token")
        rows.append([_label(results, c)] + [_fmt(v) for v in vals] + [_fmt(avg)]
                    + ([f"{fl / 1e6:.3g}" if fl else "-"] if has_flops else []))
    out = _columns(head, rows)
    P = results.get("eval_prefix")
    out.append("(held-out loss in nats per token, lower is better; * = public domain"
               + (f"; every row scored on the same tokens: {P} .. end of each window, the first {P} are context"
                  if P else "") + (("; MFLOP/tok = forward FLOPs per token (BTM: its 2 chosen members; the prefix "
                                    "also runs every member)") if has_flops else "") + ")")
    return "\n".join(out)


def _routing_rows(results: dict, tables: dict) -> tuple:
    """Header and rows of one model's routing table: per domain and layer, each expert's average
    routing probability and top-1 share; the domain's own expert is marked with *."""
    doms = [d for d in [results["public_domain"]] + list(results["owner_domains"]) if d in tables]
    names = tables[doms[0]]["experts"]
    rows = []
    for d in doms:
        t = tables[d]
        for layer, (w, t1) in enumerate(zip(t["weight"], t["top1"])):
            rows.append([d if layer == 0 else "", str(layer)]
                        + [f"{w[i]:.2f} ({100 * t1[i]:3.0f}%)" + ("*" if n == d else " ") for i, n in enumerate(names)])
    return ["domain", "layer"] + list(names), rows


def format_routing(results: dict) -> str:
    """The routing tables of the merged model (and of the merge before router tuning), and the owners' 2-expert models'
    preference for their own expert on their domain vs on public text."""
    routing = results.get("routing") or {}
    out = []
    for c in [c for c in ("merged", "merged-untuned") if routing.get(c)]:
        head, rows = _routing_rows(results, routing[c])
        out += [f"Routing of {_label(results, c)}: average routing probability per expert (top-1 share) on each "
                f"domain's held-out tokens; * = the domain's own expert"] + _columns(head, rows, right_from=2) + [""]
    owners = [c for c in routing if c.startswith("owner:")]
    if owners:
        pd = results["public_domain"]
        parts = []
        for c in owners:
            d = c.split(":", 1)[1]
            mean = lambda t: sum(row[1] for row in t["weight"]) / max(1, len(t["weight"]))  # noqa: E731
            if d in routing[c] and pd in routing[c]:
                parts.append(f"{d} {mean(routing[c][d]):.2f} on {d}, {mean(routing[c][pd]):.2f} on {pd}")
        if parts:
            out.append("Owners' 2-expert models, own expert's average routing probability (mean over layers): "
                       + "; ".join(parts))
    return "\n".join(out).rstrip()


def _flat(v, nd: int = 4, max_items: int = 4) -> str:
    """A value of ``results["router"]`` on one line: floats to ``nd`` significant digits, lists
    longer than ``max_items`` shortened (the full values are in results.json)."""
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_flat(x, nd, max_items)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        more = f", ... ({len(v)} in all)" if len(v) > max_items else ""
        return "[" + ", ".join(_flat(x, nd, max_items) for x in v[:max_items]) + more + "]"
    return str(v)


def format_router(results: dict) -> str:
    """``results["router"]`` (router init / tuning values), one line per non-empty key, whatever it holds."""
    r = results.get("router")
    if not r:
        return ""
    if not isinstance(r, dict):
        return f"Router: {_flat(r)}"
    return "\n".join(["Router:"] + [f"  {k}: {_flat(v)}" for k, v in r.items() if v not in ("", None, [], {})])


def format_audit(results: dict) -> str:
    """The extraction audit: per model and owner domain, documents reproduced / audited, then the
    positive control's rows."""
    audit = results.get("audit") or []
    if not audit:
        return ""
    owners = list(results["owner_domains"])
    models = []
    for a in audit:
        if a["model"] not in models:
            models.append(a["model"])
    cell = {(a["model"], a["domain"]): a for a in audit}
    a0 = audit[0]
    lines = [f"Extraction audit: share of audited training documents reproduced "
             f"({a0['prefix_len']}-token prefix, {a0['gen_len']} greedy tokens, similarity >= {a0['threshold']})"]
    rows = []
    for m in models:
        r = [m]
        for d in owners:
            a = cell.get((m, d))
            r.append("-" if a is None else f"{a['n_extracted']}/{a['n_docs']} (sim {a['mean_similarity']:.2f})")
        rows.append(r)
    lines += _columns(["model"] + owners, rows, right_from=len(owners) + 1)[:1] + _columns(
        ["model"] + owners, rows, right_from=len(owners) + 1)[2:]
    ctrl = [a for a in audit if a.get("control") == "memorised"]
    if ctrl:
        det = ctrl[0].get("details") or {}
        lines.append(f"(control: a 1-layer dense model trained on {det.get('trained_on', '?')} of the audited "
                     f"{ctrl[0]['domain']} documents for {det.get('steps', '?')} steps, final loss "
                     f"{det.get('final_loss', '?')}, {det.get('seconds', '?')} s; 'unseen' = the same model on "
                     f"documents it never saw)")
    return "\n".join(lines)


def format_report(results: dict, claims: Optional[List[dict]] = None) -> str:
    """The text printed at the end of the demo: corpora, loss table, routing, router, audit, claims."""
    claims = compute_claims(results) if claims is None else claims
    out = []
    corp = results.get("corpora")
    if corp:
        out.append("Corpora (real text found on this machine):")
        for name, d in corp["domains"].items():
            out.append(f"  {d['role']:6s} {name:10s} {d['train_docs']:5d} train docs {d['train_bytes'] / 1e3:7.0f} kB | "
                       f"{d['test_docs']:4d} held-out docs {d['test_bytes'] / 1e3:5.0f} kB  ({d['source']})")
            if d.get("composition"):  # the broad public corpus: docs and bytes per kind of text
                out.append("         by kind (train docs / kB, proxy-pool docs): " + "; ".join(
                    f"{k} {c.get('train_docs', 0)} / {c.get('train_bytes', 0) / 1e3:.0f}, {c.get('pool_docs', 0)}"
                    for k, c in d["composition"].items()))
        for name, why in (corp.get("skipped") or {}).items():
            out.append(f"  skipped {name}: {why}")
        out.append("")
    out.append(format_table(results))
    fl = results.get("flops")
    if fl and fl.get("flexolmo"):
        parts = [f"FlexOlmo {fl['flexolmo']:.3g} (public + owners)"]
        if fl.get("btm"):
            parts.append(f"BTM {fl['btm']:.3g} (public + continued dense)")
        if fl.get("moe"):
            parts.append(f"joint MoE {fl['moe']:.3g}")
        out.append("Training FLOPs (from the runs' run.json): " + ", ".join(parts))
    errs = results.get("baseline_errors") or {}
    for k, v in errs.items():
        out.append(f"  baseline {k} FAILED: {v}")
    for block in (format_routing(results), format_router(results), format_audit(results)):
        if block:
            out += ["", block]
    out += ["", "Claims (judged from this run's numbers):"]
    for c in claims:
        out.append(f"  [{c['verdict'].upper():9s}] {c['claim']}")
        if c["text"]:
            out.append(f"              {c['text']}")
    return "\n".join(out)


def generate_hints(merged: str, expert_names: List[str], top_k: int, prompt: str = "def main(") -> List[List[str]]:
    """The ``flexmoe generate`` commands the demo suggests on its merged model, as argument lists.

    One opts the first owner out (``--deny``), one allows only the public expert and that owner
    (``--allow``). A command whose allowed experts are fewer than the model's ``top_k`` passes
    ``--experts-per-token`` (generate refuses more active experts than allowed ones), so each runs
    as printed.
    """
    owner = expert_names[1]
    hints = []
    for flag, n_allowed in (("--deny", len(expert_names) - 1), ("--allow", 2)):
        names = owner if flag == "--deny" else f"{expert_names[0]},{owner}"
        k = ["--experts-per-token", str(n_allowed)] if n_allowed < top_k else []
        hints.append(["flexmoe", "generate", "--model", merged, flag, names, *k, prompt])
    return hints


def format_hints(merged: str, expert_names: List[str], top_k: int) -> str:
    """What the demo prints last: :func:`generate_hints` as shell command lines (quoted with shlex)."""
    import shlex

    return ("Try opt-out inference on the merged model. A model this small writes nonsense text: what to\n"
            "look at is which experts served the tokens (the table generate prints after the text):\n"
            + "\n".join("  " + shlex.join(h) for h in generate_hints(merged, expert_names, top_k)))


def write_json(path: str, results: dict, claims: List[dict]) -> None:
    """Write ``results`` + ``claims`` atomically as JSON."""
    from flexmoe_kernels.utils.fs import write_text_atomic

    write_text_atomic(path, json.dumps(dict(results, claims=claims), indent=1, default=float))


def _pyplot():
    """matplotlib's pyplot on the Agg backend (ImportError when matplotlib is not installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(results: dict, path: str) -> str:
    """Bar chart of held-out loss per domain for the main models / opt-out settings (+ top-k panel)."""
    plt = _pyplot()
    owners = list(results["owner_domains"])
    doms = [results["public_domain"]] + owners
    main = [c for c in _config_order(results) if results.get("configs", {}).get(c, {}).get("kind")
            in ("public", "merged", "oracle", "optout", "untuned", "btm", "moe")]
    ks = sorted(int(c.split(":")[1]) for c in results["losses"] if c.startswith("topk:"))
    fig, axes = plt.subplots(1, 2 if ks else 1, figsize=(13 if ks else 9, 4.5),
                             gridspec_kw={"width_ratios": [3, 1]} if ks else None)
    ax = axes[0] if ks else axes
    width = 0.8 / max(1, len(main))
    for i, c in enumerate(main):
        ys = [loss_of(results, c, d) or float("nan") for d in doms]
        ax.bar([j + i * width for j in range(len(doms))], ys, width, label=_label(results, c))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(doms))])
    ax.set_xticklabels([d + (" (public)" if d == results["public_domain"] else "") for d in doms])
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Per-domain loss by model and opt-out setting")
    vals = [v for c in main for d in doms if (v := loss_of(results, c, d)) is not None]
    if vals:
        lo, hi = min(vals), max(vals)
        ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1e-9)), hi + 0.05 * (hi - lo + 1e-9))
    # below the axes: inside, it covered the bars
    ax.legend(fontsize=7, ncol=min(4, max(1, len(main))), loc="upper center", bbox_to_anchor=(0.5, -0.12),
              frameon=False)
    if ks:
        ax2 = axes[1]
        for d in doms:
            ax2.plot(ks, [loss_of(results, f"topk:{k}", d) or float("nan") for k in ks], marker="o", label=d)
        ax2.set_xlabel("active experts (top-k)")
        ax2.set_xticks(ks)
        ax2.set_title("Merged model vs top-k")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_routing(results: dict, path: str) -> Optional[str]:
    """Heatmaps of the merged model's routing (and the merge's before router tuning): rows = (domain, layer), columns =
    experts, colour and number = average routing probability. None when no routing was recorded."""
    routing = results.get("routing") or {}
    shown = [c for c in ("merged", "merged-untuned") if routing.get(c)]
    if not shown:
        return None
    plt = _pyplot()
    doms = [results["public_domain"]] + list(results["owner_domains"])
    n_rows = sum(len(routing[shown[0]][d]["weight"]) for d in doms if d in routing[shown[0]])
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown) + 1.5, 0.35 * n_rows + 2.0), squeeze=False,
                             sharey=True)
    for n_ax, (ax, c) in enumerate(zip(axes[0], shown)):
        tables = routing[c]
        ds = [d for d in doms if d in tables]
        names = tables[ds[0]]["experts"]
        grid = [w for d in ds for w in tables[d]["weight"]]
        rows = [(d, layer) for d in ds for layer in range(len(tables[d]["weight"]))]
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
            if rows[i][0] in names:  # outline the domain's own expert
                ax.add_patch(plt.Rectangle((names.index(rows[i][0]) - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5,
                                           edgecolor="orange"))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, fontsize=8)
        if n_ax == 0:
            ax.set_yticks(range(len(rows)))
            ax.set_yticklabels([f"{d} L{layer}" for d, layer in rows], fontsize=7)
        ax.set_title(_label(results, c), fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="average routing probability")
    fig.suptitle("Which expert the router prefers, per domain and layer (orange: the domain's own expert)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(results: dict, run_dir: str, log=print) -> List[str]:
    """``losses.png`` and ``routing.png`` (when routing was recorded) in ``run_dir``; returns the paths
    written. Without matplotlib the plots are skipped with a note in ``log``; a failing plot is
    logged and never loses the numbers (results.json and report.txt are written anyway)."""
    import os

    out = []
    for name, fn in (("losses.png", plot_losses), ("routing.png", plot_routing)):
        try:
            path = fn(results, os.path.join(run_dir, name))
        except ImportError as e:
            log(f"plots skipped: matplotlib is not installed ({e}); the numbers are in results.json and report.txt")
            break
        except Exception as e:  # noqa: BLE001  (a plot must never lose the numbers)
            log(f"plot {name} failed: {type(e).__name__}: {e}")
            continue
        if path:
            out.append(path)
    return out
