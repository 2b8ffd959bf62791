"""The demo's report: claims computed from this run's numbers, a printed table, JSON and a plot.

Input is the ``results`` dict the pipeline assembles (also the JSON written to disk)::

    results["public_domain"]  = "readmes"
    results["owner_domains"]  = ["code", "man", "licenses"]
    results["losses"][config][domain] = {"loss": nats/token, "ppl": exp(loss), "tokens": int}
    results["configs"][config] = {"kind": ..., "label": ..., ...}
    results["audit"] = [AuditResult.to_json(), ...]          (optional)

Config names used by the pipeline (kinds in brackets):
``public`` [public], ``owner:<d>`` [owner, the 2-expert model of owner d],
``merged`` [merged, all experts at the run's top-k], ``optout:<d>`` [optout, merged with d's
expert opted out], ``topk:<k>`` [topk, merged with k active experts], ``btm-prior`` /
``btm-uniform`` [btm], ``moe`` [moe], ``dense:<d>`` [dense, public model continued on d].
"""
from __future__ import annotations

import json
import math
from typing import List, Optional

__all__ = ["compute_claims", "format_table", "format_report", "format_hints", "generate_hints", "write_json",
           "plot_losses", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = {
    # opting expert d out must give back at least this share of d's gain over the public model
    "optout_min_gain_lost": 0.5,
    # ... and move every other domain by at most this share of the change on d's own domain
    "optout_max_side_effect": 0.25,
}


def _loss(results: dict, config: str, domain: str) -> Optional[float]:
    try:
        return float(results["losses"][config][domain]["loss"])
    except (KeyError, TypeError):
        return None


def _fmt(x: Optional[float], nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _claim(cid: str, claim: str, verdict: str, text: str, numbers: dict) -> dict:
    """One entry of :func:`compute_claims`' list (the keys every claim has, in this order)."""
    return {"id": cid, "claim": claim, "verdict": verdict, "text": text, "numbers": numbers}


def _verdict(missing: bool, numbers: dict, ok: bool) -> str:
    """The verdict of an all-domains claim: "not run" when a setting is missing or nothing was
    measured, else "supported" if ``ok`` holds, "refuted" if not."""
    return "not run" if missing or not numbers else ("supported" if ok else "refuted")


def _owner_avg(results: dict, config: str) -> Optional[float]:
    """Mean loss of ``config`` over the owner domains; None unless every owner domain was measured."""
    v = [_loss(results, config, d) for d in results["owner_domains"]]
    return None if any(x is None for x in v) or not v else sum(v) / len(v)


def _claim_merged_beats_public(results: dict) -> dict:
    """Claim 1: the merged model has a lower loss than the public model on every owner domain."""
    nums, parts, ok, missing = {}, [], True, False
    for d in results["owner_domains"]:
        p, m = _loss(results, "public", d), _loss(results, "merged", d)
        if p is None or m is None:
            missing = True
            continue
        nums[d] = {"public": p, "merged": m, "relative_gain": (p - m) / p}
        ok &= m < p
        parts.append(f"{d}: {p:.3f} -> {m:.3f} ({100 * (p - m) / p:+.1f}%)")
    return _claim("merged_beats_public", "The merged model beats the public model on every owner domain.",
                  _verdict(missing, nums, ok), "held-out loss public -> merged: " + "; ".join(parts), nums)


def _optout_gain_lost(d: str, p: float, m: float, o: float, th: dict) -> tuple:
    """Claim 2 for owner ``d`` from its domain's public / merged / opted-out losses.

    Returns ``(numbers, text part, holds)``: the share of the merged model's gain over the
    public model given back when d's expert is opted out (NaN when there was no gain) and
    whether it reaches ``th["optout_min_gain_lost"]``.
    """
    gain = p - m
    lost = (o - m) / gain if gain > 0 else float("nan")
    good = gain > 0 and lost >= th["optout_min_gain_lost"]
    part = (f"{d}: merged {m:.3f}, without {d} {o:.3f}, public {p:.3f}"
            + (" (the merged model did not improve on it)" if math.isnan(lost)
               else f" ({100 * lost:.0f}% of the gain given back)"))
    return {"public": p, "merged": m, "optout": o, "share_of_gain_lost": lost}, part, good


def _optout_side_effects(results: dict, d: str, own_change: float, th: dict) -> tuple:
    """Claim 3 for owner ``d``: how much opting d's expert out moves the other domains.

    ``own_change`` is the loss change on d's own domain. Returns ``(numbers, text part or
    None, holds)``: the largest absolute change on another measured domain as a share of
    ``own_change`` (inf when ``own_change <= 0`` or nothing else was measured) must be at most
    ``th["optout_max_side_effect"]``.
    """
    owners = results["owner_domains"]
    side = {}
    for other in [results["public_domain"]] + [x for x in owners if x != d]:
        mo, oo = _loss(results, "merged", other), _loss(results, f"optout:{d}", other)
        if None in (mo, oo):
            continue
        side[other] = oo - mo
    worst = max(side, key=lambda k: abs(side[k])) if side else None
    ratio = abs(side[worst]) / own_change if worst is not None and own_change > 0 else float("inf")
    part = None
    if worst is not None:
        part = (f"without {d}: {d} {own_change:+.3f}, largest other change {worst} {side[worst]:+.3f} "
                f"({'inf' if math.isinf(ratio) else f'{100 * ratio:.0f}%'} of it)")
    nums = {"own_domain_change": own_change, "other_domain_changes": side, "worst_ratio": ratio}
    return nums, part, ratio <= th["optout_max_side_effect"]


def _claims_optout(results: dict, th: dict) -> List[dict]:
    """Claims 2 and 3: opting an owner's expert out restores the public model on its domain and
    leaves the other domains nearly unchanged. Both are "not run" if any owner's setting is missing."""
    nums2, parts2, ok2, nums3, parts3, ok3, missing = {}, [], True, {}, [], True, False
    for d in results["owner_domains"]:
        p, m, o = _loss(results, "public", d), _loss(results, "merged", d), _loss(results, f"optout:{d}", d)
        if None in (p, m, o):
            missing = True
            continue
        nums2[d], part2, good2 = _optout_gain_lost(d, p, m, o, th)
        parts2.append(part2)
        ok2 &= good2
        nums3[d], part3, good3 = _optout_side_effects(results, d, o - m, th)
        if part3 is not None:
            parts3.append(part3)
        ok3 &= good3
    return [
        _claim("optout_restores_public",
               f"Opting an owner's expert out brings its domain back near the public model "
               f"(>= {100 * th['optout_min_gain_lost']:.0f}% of the merged model's gain on it is given back).",
               _verdict(missing, nums2, ok2), "; ".join(parts2), nums2),
        _claim("optout_leaves_others",
               f"Opting an owner's expert out leaves the other domains nearly unchanged (each changes by "
               f"<= {100 * th['optout_max_side_effect']:.0f}% of the change on the opted-out domain).",
               _verdict(missing, nums3, ok3), "; ".join(parts3), nums3),
    ]


def _claims_equal_flops(results: dict) -> List[dict]:
    """Claims 4 and 5: the merged model beats the BTM output ensemble (the better of the
    ``btm-prior`` / ``btm-uniform`` settings) and the joint MoE, both of equal training FLOPs,
    on the mean owner-domain loss."""
    m_avg = _owner_avg(results, "merged")
    btm = [c for c in ("btm-prior", "btm-uniform") if _owner_avg(results, c) is not None]
    if m_avg is not None and btm:
        best = min(btm, key=lambda c: _owner_avg(results, c))
        b = _owner_avg(results, best)
        out = [_claim("merged_beats_btm",
                      "The merged model beats the BTM output ensemble (equal training FLOPs) on owner domains.",
                      "supported" if m_avg < b else "refuted",
                      f"mean owner-domain loss: merged {m_avg:.3f} vs best BTM ({best}) {b:.3f}",
                      {"merged": m_avg, best: b})]
    else:
        out = [_claim("merged_beats_btm", "The merged model beats the BTM output ensemble on owner domains.",
                      "not run", "", {})]
    moe = _owner_avg(results, "moe")
    if m_avg is not None and moe is not None:
        out.append(_claim("merged_beats_moe",
                          "The merged model beats a standard MoE trained jointly on all data (equal training FLOPs).",
                          "supported" if m_avg < moe else "refuted",
                          f"mean owner-domain loss: merged {m_avg:.3f} vs joint MoE {moe:.3f}",
                          {"merged": m_avg, "moe": moe}))
    else:
        out.append(_claim("merged_beats_moe", "The merged model beats a standard MoE trained jointly on all data.",
                          "not run", "", {}))
    return out


def _claims_topk(results: dict) -> List[dict]:
    """Claim 6 (only when at least two ``topk:<k>`` settings ran): the largest k has a lower mean
    owner-domain loss than the smallest."""
    ks = sorted(int(c.split(":")[1]) for c in results.get("losses", {}) if c.startswith("topk:"))
    if len(ks) < 2:
        return []
    avg = {k: _owner_avg(results, f"topk:{k}") for k in ks}
    return [_claim("topk_helps", "Quality rises with the number of active experts (top-k).",
                   "supported" if avg[ks[-1]] < avg[ks[0]] else "refuted",
                   "mean owner-domain loss by k: " + ", ".join(f"k={k}: {avg[k]:.3f}" for k in ks),
                   {str(k): avg[k] for k in ks})]


def _claims_extraction(results: dict) -> List[dict]:
    """Claim 7 (only when the audit covers the merged and a dense model): the merged model
    reproduces a smaller share of the audited training documents than the dense model trained
    on the owner's data ("inconclusive" when the shares are equal)."""
    by = {}
    for a in results.get("audit") or []:
        by.setdefault(a["model"], []).append(a)
    if "merged" not in by or "dense" not in by:
        return []

    def share(model):
        rows = by[model]
        n = sum(r["n_docs"] for r in rows)
        return sum(r["n_extracted"] for r in rows) / n if n else 0.0

    sm, sd = share("merged"), share("dense")
    sp = share("public") if "public" in by else None
    return [_claim("extraction", "The merged model reproduces fewer of an owner's training documents than a dense model "
                   "trained on that owner's data.",
                   "supported" if sm < sd else ("refuted" if sm > sd else "inconclusive"),
                   f"extracted share: public {_fmt(sp and 100 * sp, 1)}%, dense-on-owner {100 * sd:.1f}%, "
                   f"merged {100 * sm:.1f}%"
                   + (" (equal: no model reproduced its training data at this size)" if sm == sd else ""),
                   {"public": sp, "dense": sd, "merged": sm})]


def compute_claims(results: dict, thresholds: Optional[dict] = None) -> List[dict]:
    """The paper's claims, each judged "supported" / "refuted" / "not run" from ``results``.

    Returns a list of ``{"id", "claim", "verdict", "text", "numbers"}``; ``text`` states the
    numbers behind the verdict. Nothing here is hard-coded: every verdict is a comparison of
    losses (or extraction shares) measured in this run. ``thresholds`` overrides entries of
    :data:`DEFAULT_THRESHOLDS`. The ``topk_helps`` and ``extraction`` claims are present only
    when their settings ran.
    """
    th = dict(DEFAULT_THRESHOLDS, **(thresholds or {}))
    return ([_claim_merged_beats_public(results)] + _claims_optout(results, th) + _claims_equal_flops(results)
            + _claims_topk(results) + _claims_extraction(results))


def _config_order(results: dict) -> List[str]:
    configs = list(results["losses"])
    kind_rank = {"public": 0, "owner": 1, "dense": 2, "merged": 3, "optout": 4, "topk": 5, "btm": 6, "moe": 7}
    kinds = results.get("configs", {})
    return sorted(configs, key=lambda c: (kind_rank.get(kinds.get(c, {}).get("kind", ""), 9), configs.index(c)))


def format_table(results: dict) -> str:
    """Held-out loss (nats/token) per config (rows) and domain (columns) + the owner-domain mean."""
    owners = list(results["owner_domains"])
    doms = [results["public_domain"]] + owners
    head = ["model / setting"] + [d + ("*" if d == results["public_domain"] else "") for d in doms] + ["owners avg"]
    rows = []
    for c in _config_order(results):
        vals = [_loss(results, c, d) for d in doms]
        ov = [v for v, d in zip(vals, doms) if d in owners and v is not None]
        avg = sum(ov) / len(ov) if len(ov) == len(owners) and ov else None
        label = results.get("configs", {}).get(c, {}).get("label", c)
        rows.append([label] + [_fmt(v) for v in vals] + [_fmt(avg)])
    w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w[0]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r))
    out = [line(head), line(["-" * x for x in w])] + [line(r) for r in rows]
    out.append("(held-out loss in nats per token, lower is better; * = public domain)")
    return "\n".join(out)


def format_audit(results: dict) -> str:
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
    head = ["model"] + owners
    rows = []
    for m in models:
        r = [m]
        for d in owners:
            a = cell.get((m, d))
            r.append("-" if a is None else f"{a['n_extracted']}/{a['n_docs']} (sim {a['mean_similarity']:.2f})")
        rows.append(r)
    w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        lines.append("  ".join(x.ljust(w[i]) for i, x in enumerate(r)))
    return "\n".join(lines)


def format_report(results: dict, claims: Optional[List[dict]] = None) -> str:
    """The text printed at the end of the demo: corpora, loss table, audit, claims."""
    claims = compute_claims(results) if claims is None else claims
    out = []
    corp = results.get("corpora")
    if corp:
        out.append("Corpora (real text found on this machine):")
        for name, d in corp["domains"].items():
            out.append(f"  {d['role']:6s} {name:10s} {d['train_docs']:5d} train docs {d['train_bytes'] / 1e3:7.0f} kB | "
                       f"{d['test_docs']:4d} held-out docs {d['test_bytes'] / 1e3:5.0f} kB  ({d['source']})")
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
    aud = format_audit(results)
    if aud:
        out += ["", aud]
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
    ``--top-k`` (generate refuses more active experts than allowed ones), so each runs as printed.
    """
    owner = expert_names[1]
    hints = []
    for flag, n_allowed in (("--deny", len(expert_names) - 1), ("--allow", 2)):
        names = owner if flag == "--deny" else f"{expert_names[0]},{owner}"
        k = ["--top-k", str(n_allowed)] if n_allowed < top_k else []
        hints.append(["flexmoe", "generate", "--model", merged, flag, names, *k, prompt])
    return hints


def format_hints(merged: str, expert_names: List[str], top_k: int) -> str:
    """What the demo prints last: :func:`generate_hints` as shell command lines (quoted with shlex)."""
    import shlex

    return "Try opt-out inference on the merged model:\n" + "\n".join(
        "  " + shlex.join(h) for h in generate_hints(merged, expert_names, top_k))


def write_json(path: str, results: dict, claims: List[dict]) -> None:
    """Write ``results`` + ``claims`` atomically as JSON."""
    from flexmoe_kernels.utils.fs import write_text_atomic

    write_text_atomic(path, json.dumps(dict(results, claims=claims), indent=1, default=float))


def plot_losses(results: dict, path: str) -> str:
    """Bar chart of held-out loss per domain for the main models / opt-out settings (+ top-k panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    owners = list(results["owner_domains"])
    doms = [results["public_domain"]] + owners
    main = [c for c in _config_order(results)
            if results.get("configs", {}).get(c, {}).get("kind") in ("public", "merged", "optout", "btm", "moe")]
    ks = sorted(int(c.split(":")[1]) for c in results["losses"] if c.startswith("topk:"))
    fig, axes = plt.subplots(1, 2 if ks else 1, figsize=(13 if ks else 9, 4.5),
                             gridspec_kw={"width_ratios": [3, 1]} if ks else None)
    ax = axes[0] if ks else axes
    width = 0.8 / max(1, len(main))
    for i, c in enumerate(main):
        ys = [_loss(results, c, d) or float("nan") for d in doms]
        label = results.get("configs", {}).get(c, {}).get("label", c)
        ax.bar([j + i * width for j in range(len(doms))], ys, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(doms))])
    ax.set_xticklabels([d + (" (public)" if d == results["public_domain"] else "") for d in doms])
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Per-domain loss by model and opt-out setting")
    vals = [v for c in main for d in doms if (v := _loss(results, c, d)) is not None]
    if vals:
        lo, hi = min(vals), max(vals)
        ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1e-9)), hi + 0.05 * (hi - lo + 1e-9))
    ax.legend(fontsize=7, ncol=2)
    if ks:
        ax2 = axes[1]
        for d in doms:
            ax2.plot(ks, [_loss(results, f"topk:{k}", d) or float("nan") for k in ks], marker="o", label=d)
        ax2.set_xlabel("active experts (top-k)")
        ax2.set_xticks(ks)
        ax2.set_title("Merged model vs top-k")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
