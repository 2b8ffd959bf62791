"""The paper's claims, each judged from the demo run's own numbers (never hard-coded).

Input is the ``results`` dict of :mod:`.measure` / :mod:`.pipeline` (see :mod:`.report`). Each
claim is ``{"id", "claim", "verdict", "text", "numbers"}`` with verdict "supported", "refuted",
"inconclusive" (the measurement cannot decide, the text says why) or "not run" (a setting it
needs is missing). Claims about the final model are made for the merged model (``merged``, ids
``merged_*`` / ``optout_*``; router-tuned when the run tuned the router); the routing claims
(public text, oracle gap, own expert) also for the merge before router tuning when the run has
one (``merged-untuned``, ids ``untuned_*``), to show what tuning changed.
"""
from __future__ import annotations

import math
from typing import List, Optional

__all__ = ["compute_claims", "DEFAULT_THRESHOLDS", "PAPER_EXTRACTION", "loss_of", "owner_avg"]

DEFAULT_THRESHOLDS = {
    # opting expert d out must give back at least this share of d's gain over the public model
    "optout_min_gain_lost": 0.5,
    # ... and move every other domain by at most this share of the change on d's own domain
    "optout_max_side_effect": 0.25,
    # the merged model may be at most this much worse (nats/token) than the public model on public text
    "public_max_loss_increase": 0.05,
    # ... and at most this much worse than oracle routing on the mean owner-domain loss
    "oracle_max_gap": 0.05,
}

#: the paper's extraction rates (share of training documents reproduced), quoted for comparison only
PAPER_EXTRACTION = {"public": 0.001, "dense": 0.016, "flexolmo": 0.007}


def loss_of(results: dict, config: str, domain: str) -> Optional[float]:
    """The held-out loss of ``config`` on ``domain``, None when not measured."""
    try:
        return float(results["losses"][config][domain]["loss"])
    except (KeyError, TypeError):
        return None


def owner_avg(results: dict, config: str) -> Optional[float]:
    """Mean loss of ``config`` over the owner domains; None unless every owner domain was measured."""
    v = [loss_of(results, config, d) for d in results["owner_domains"]]
    return None if any(x is None for x in v) or not v else sum(v) / len(v)


def _claim(cid: str, claim: str, verdict: str, text: str, numbers: dict) -> dict:
    """One entry of :func:`compute_claims`' list (the keys every claim has, in this order)."""
    return {"id": cid, "claim": claim, "verdict": verdict, "text": text, "numbers": numbers}


def _verdict(missing: bool, numbers: dict, ok: bool) -> str:
    """The verdict of an all-domains claim: "not run" when a setting is missing or nothing was
    measured, else "supported" if ``ok`` holds, "refuted" if not."""
    return "not run" if missing or not numbers else ("supported" if ok else "refuted")


def _who(base: str) -> str:
    return "The merged model" if base == "merged" else "The merged model before router tuning"


def _cid(base: str, suffix: str) -> str:
    return f"{'merged' if base == 'merged' else 'untuned'}_{suffix}"


def _claim_beats_public(results: dict, base: str) -> dict:
    """The final model has a lower loss than the public model on every owner domain."""
    nums, parts, ok, missing = {}, [], True, False
    for d in results["owner_domains"]:
        p, m = loss_of(results, "public", d), loss_of(results, base, d)
        if p is None or m is None:
            missing = True
            continue
        nums[d] = {"public": p, base: m, "relative_gain": (p - m) / p}
        ok &= m < p
        parts.append(f"{d}: {p:.3f} -> {m:.3f} ({100 * (p - m) / p:+.1f}%)")
    return _claim(_cid(base, "beats_public"), f"{_who(base)} beats the public model on every owner domain.",
                  _verdict(missing, nums, ok), f"held-out loss public -> {base}: " + "; ".join(parts), nums)


def _optout_gain_lost(d: str, p: float, m: float, o: float, th: dict) -> tuple:
    """Opt-out of owner ``d`` from its domain's public / merged / opted-out losses: ``(numbers,
    text part, holds)``; the share of the gain over the public model given back (NaN without a
    gain) must reach ``th["optout_min_gain_lost"]``."""
    gain = p - m
    lost = (o - m) / gain if gain > 0 else float("nan")
    good = gain > 0 and lost >= th["optout_min_gain_lost"]
    part = (f"{d}: with all {m:.3f}, without {d} {o:.3f}, public {p:.3f}"
            + (" (the model did not improve on it)" if math.isnan(lost)
               else f" ({100 * lost:.0f}% of the gain given back)"))
    return {"public": p, "merged": m, "optout": o, "share_of_gain_lost": lost}, part, good


def _optout_side_effects(results: dict, d: str, own_change: float, base: str, optout: str, th: dict) -> tuple:
    """How much opting ``d`` out moves the other domains: ``(numbers, text part or None, holds)``;
    the largest absolute change elsewhere as a share of ``own_change`` (inf when ``own_change <=
    0``) must be at most ``th["optout_max_side_effect"]``."""
    side = {}
    for other in [results["public_domain"]] + [x for x in results["owner_domains"] if x != d]:
        mo, oo = loss_of(results, base, other), loss_of(results, f"{optout}:{d}", other)
        if None not in (mo, oo):
            side[other] = oo - mo
    worst = max(side, key=lambda k: abs(side[k])) if side else None
    ratio = abs(side[worst]) / own_change if worst is not None and own_change > 0 else float("inf")
    part = None
    if worst is not None:
        part = (f"without {d}: {d} {own_change:+.3f}, largest other change {worst} {side[worst]:+.3f} "
                f"({'inf' if math.isinf(ratio) else f'{100 * ratio:.0f}%'} of it)")
    nums = {"own_domain_change": own_change, "other_domain_changes": side, "worst_ratio": ratio}
    return nums, part, ratio <= th["optout_max_side_effect"]


def _claims_optout(results: dict, th: dict, base: str = "merged") -> List[dict]:
    """Opting an owner's expert out restores the public model on its domain, and leaves the other
    domains nearly unchanged; "not run" if any owner's setting is missing."""
    optout = "optout"
    nums2, parts2, ok2, nums3, parts3, ok3, missing = {}, [], True, {}, [], True, False
    for d in results["owner_domains"]:
        p, m, o = loss_of(results, "public", d), loss_of(results, base, d), loss_of(results, f"{optout}:{d}", d)
        if None in (p, m, o):
            missing = True
            continue
        nums2[d], part2, good2 = _optout_gain_lost(d, p, m, o, th)
        parts2.append(part2)
        ok2 &= good2
        nums3[d], part3, good3 = _optout_side_effects(results, d, o - m, base, optout, th)
        if part3 is not None:
            parts3.append(part3)
        ok3 &= good3
    return [
        _claim("optout_restores_public",
               f"Opting an owner's expert out brings its domain back near the public model "
               f"(>= {100 * th['optout_min_gain_lost']:.0f}% of the gain on it is given back).",
               _verdict(missing, nums2, ok2), "; ".join(parts2), nums2),
        _claim("optout_leaves_others",
               f"Opting an owner's expert out leaves the other domains nearly unchanged (each changes by "
               f"<= {100 * th['optout_max_side_effect']:.0f}% of the change on the opted-out domain).",
               _verdict(missing, nums3, ok3), "; ".join(parts3), nums3),
    ]


def _btm_reference(results: dict) -> Optional[str]:
    """The BTM row the paper compares against: ``btm-top2`` (top-2 members weighted on a fixed
    prefix); in older results the best of the other BTM rows except the owners' 2-expert one."""
    if owner_avg(results, "btm-top2") is not None:
        return "btm-top2"
    kinds = results.get("configs", {})
    old = [c for c in results.get("losses", {}) if kinds.get(c, {}).get("kind") == "btm"
           and c != "btm-owners-top2" and owner_avg(results, c) is not None]
    return min(old, key=lambda c: owner_avg(results, c)) if old else None


def _claims_equal_flops(results: dict, base: str) -> List[dict]:
    """The final model beats the BTM output ensemble and the joint MoE (equal training FLOPs) on
    the mean owner-domain loss."""
    m_avg, out = owner_avg(results, base), []
    for suffix, ref, what in (("beats_btm", _btm_reference(results), "the BTM output ensemble (top-2 members)"),
                              ("beats_moe", "moe" if owner_avg(results, "moe") is not None else None,
                               "a standard MoE trained jointly on all data")):
        claim = f"{_who(base)} beats {what} of equal training FLOPs on owner domains."
        if m_avg is None or ref is None:
            out.append(_claim(_cid(base, suffix), claim, "not run", "", {}))
            continue
        r = owner_avg(results, ref)
        out.append(_claim(_cid(base, suffix), claim, "supported" if m_avg < r else "refuted",
                          f"mean owner-domain loss: {base} {m_avg:.3f} vs {ref} {r:.3f}", {base: m_avg, ref: r}))
    return out


def _claim_keeps_public(results: dict, base: str, th: dict) -> dict:
    """On public text the final model stays within ``th["public_max_loss_increase"]`` of the public model."""
    pd, lim = results["public_domain"], th["public_max_loss_increase"]
    p, m = loss_of(results, "public", pd), loss_of(results, base, pd)
    claim = f"{_who(base)} is within {lim:.2f} nats/token of the public model on public text ({pd})."
    if p is None or m is None:
        return _claim(_cid(base, "keeps_public"), claim, "not run", "", {})
    return _claim(_cid(base, "keeps_public"), claim, "supported" if m - p <= lim else "refuted",
                  f"{pd}: public {p:.3f}, {base} {m:.3f} ({m - p:+.3f})", {"public": p, base: m, "difference": m - p})


def _claim_near_oracle(results: dict, base: str, th: dict) -> dict:
    """The final model's mean owner-domain loss is within ``th["oracle_max_gap"]`` of oracle routing."""
    lim = th["oracle_max_gap"]
    m, o = owner_avg(results, base), owner_avg(results, "oracle")
    claim = (f"{_who(base)} routes nearly as well as oracle routing (each owner domain sent to {{public, "
             f"its own expert}}): mean owner-domain loss within {lim:.2f} nats/token.")
    if m is None or o is None:
        return _claim(_cid(base, "near_oracle"), claim, "not run", "", {})
    return _claim(_cid(base, "near_oracle"), claim, "supported" if m - o <= lim else "refuted",
                  f"mean owner-domain loss: {base} {m:.3f}, oracle {o:.3f} (routing costs {m - o:+.3f})",
                  {base: m, "oracle": o, "gap": m - o})


def _claim_routes_own(results: dict, base: str) -> dict:
    """On each owner domain, its own expert has the highest average routing probability among the
    owner experts (the public expert excluded) in every layer (from ``results["routing"][base]``)."""
    claim = f"{_who(base)} sends each owner domain mostly to its own expert (the most-weighted owner expert in every layer)."
    tables = (results.get("routing") or {}).get(base) or {}
    nums, parts, ok, missing = {}, [], True, False
    for d in results["owner_domains"]:
        t = tables.get(d)
        if not t or d not in t.get("experts", []) or not t.get("weight"):
            missing = True
            continue
        names, own = t["experts"], t["experts"].index(d)
        others = [i for i, n in enumerate(names) if i not in (0, own)]
        bad, rows = [], []
        for layer, w in enumerate(t["weight"]):
            best = max(others, key=lambda i: w[i]) if others else None
            rows.append({"own": w[own], "best_other": None if best is None else names[best],
                         "best_other_weight": None if best is None else w[best]})
            if best is not None and w[best] >= w[own]:
                bad.append(f"layer {layer}: {names[best]} {w[best]:.2f} >= {d} {w[own]:.2f}")
        nums[d] = rows
        ok &= not bad
        parts.append(f"{d}: own expert first in {len(rows) - len(bad)}/{len(rows)} layers"
                     + (f" ({'; '.join(bad)})" if bad else ""))
    return _claim(_cid(base, "routes_own"), claim, _verdict(missing, nums, ok), "; ".join(parts), nums)


def _claims_topk(results: dict) -> List[dict]:
    """(Only when at least two ``topk:<k>`` settings ran) the largest k has a lower mean
    owner-domain loss than the smallest."""
    ks = sorted(int(c.split(":")[1]) for c in results.get("losses", {}) if c.startswith("topk:"))
    if len(ks) < 2:
        return []
    avg = {k: owner_avg(results, f"topk:{k}") for k in ks}
    return [_claim("topk_helps", "Quality rises with the number of active experts (top-k).",
                   "supported" if avg[ks[-1]] < avg[ks[0]] else "refuted",
                   "mean owner-domain loss by k: " + ", ".join(f"k={k}: {avg[k]:.3f}" for k in ks),
                   {str(k): avg[k] for k in ks})]


def _pooled(rows: List[dict]) -> tuple:
    return sum(r["n_extracted"] for r in rows), sum(r["n_docs"] for r in rows)


def _control_text(control: dict) -> tuple:
    """(text, passed) of the audit's positive control (None when it did not run)."""
    mem, uns = control.get("memorised"), control.get("unseen")
    if mem is None:
        return "no positive control ran", None
    ok = mem["n_extracted"] * 2 > mem["n_docs"] and (uns is None or uns["n_extracted"] == 0)
    text = (f"positive control: a tiny model that memorised {mem['n_docs']} of these documents reproduces "
            f"{mem['n_extracted']}/{mem['n_docs']}" + ("" if uns is None else
                                                       f", and {uns['n_extracted']}/{uns['n_docs']} it never saw"))
    return text, ok


def _claims_extraction(results: dict) -> List[dict]:
    """(Only when the audit covers the merged and a dense model) the merged model reproduces a
    smaller share of the audited training documents than the dense model trained on the owner's
    data. "inconclusive" when the positive control failed or the two differ by fewer than 2
    documents; the text states the resolution (1 document) against the paper's rates."""
    audit = results.get("audit") or []
    by, control = {}, {}
    for a in audit:
        if a.get("control"):
            control[a["control"]] = a
        else:
            by.setdefault(a["model"], []).append(a)
    if "merged" not in by or "dense" not in by:
        return []
    (km, nm), (kd, nd) = _pooled(by["merged"]), _pooled(by["dense"])
    kp, np_ = _pooled(by["public"]) if "public" in by else (None, None)
    sm, sd = km / max(1, nm), kd / max(1, nd)
    n = max(1, min(nm, nd))
    need = math.ceil(2 / (PAPER_EXTRACTION["dense"] - PAPER_EXTRACTION["flexolmo"]))
    ctext, cok = _control_text(control)
    text = ("extracted: " + (f"public {kp}/{np_}, " if kp is not None else "")
            + f"dense-on-owner {kd}/{nd} ({100 * sd:.1f}%), merged {km}/{nm} ({100 * sm:.1f}%); "
            f"resolution 1/{n} = {100 / n:.1f}% vs the paper's public {100 * PAPER_EXTRACTION['public']:.1f}%, "
            f"dense {100 * PAPER_EXTRACTION['dense']:.1f}%, FlexOlmo {100 * PAPER_EXTRACTION['flexolmo']:.1f}%"
            + (f" (resolving the paper's dense-vs-FlexOlmo gap by 2 documents needs >= {need} per model)"
               if n < need else "") + f"; {ctext}")
    if cok is False:
        verdict, why = "inconclusive", "the audit failed its positive control"
    elif abs(sd - sm) * n < 2:
        verdict, why = "inconclusive", "merged and dense differ by fewer than 2 documents"
    else:
        verdict, why = ("supported" if sm < sd else "refuted"), ""
    return [_claim("extraction", "The merged model reproduces fewer of an owner's training documents than a dense model "
                   "trained on that owner's data.", verdict, (f"{why}: " if why else "") + text,
                   {"public": None if kp is None else kp / max(1, np_), "dense": sd, "merged": sm, "n_docs": n,
                    "resolution": 1 / n, "control_passed": cok, "paper": dict(PAPER_EXTRACTION)})]


def _claim_federated_helps(claim: str, t: Optional[float], u: Optional[float], fed: dict) -> List[dict]:
    """"Router tuning helps" for federated tuning: held-out owner mean, tuned vs untuned, with the
    owners' validation numbers that chose the round."""
    if t is None or u is None:
        return [_claim("tuning_helps", claim, "not run", "", {})]
    val = (f"; federated tuning ({fed.get('optimizer') or 'FedAvg'}, {fed.get('rounds')} rounds x "
           f"{fed.get('local_steps')} local steps on each party's "
           f"own data): owners' validation mean {fed['start_owner_mean']:.4f} -> {fed['best_owner_mean']:.4f} "
           f"(round {fed['round']})")
    nums = {"tuned_owner_avg": t, "untuned_owner_avg": u, "val_start": fed["start_owner_mean"],
            "val_best": fed["best_owner_mean"], "round": fed["round"]}
    if not fed.get("round"):
        return [_claim("tuning_helps", claim, "refuted",
                       f"no round improved the owners' validation, so the untuned router was kept (no harm, no gain){val}",
                       nums)]
    return [_claim("tuning_helps", claim, "supported" if t < u else "refuted",
                   f"owner-domain mean {u:.4f} untuned -> {t:.4f} tuned ({t - u:+.4f} nats/token){val}", nums)]


def _claim_tuning_helps(results: dict) -> List[dict]:
    """Router tuning helps: the tuned merged model's mean owner-domain held-out loss is below the
    untuned merge's. Held-out test text decides, not the tuning's own validation (whose before /
    after is in the text). Absent when the run did not tune the router."""
    if "merged-untuned" not in results.get("losses", {}):
        return []
    claim = "Router tuning helps: the tuned router lowers the owners' held-out loss."
    t, u = owner_avg(results, "merged"), owner_avg(results, "merged-untuned")
    sel = results.get("router_tuning") or {}
    if sel.get("method") == "federated":
        return _claim_federated_helps(claim, t, u, sel)
    has_val = "start_val_loss" in sel
    val = (f"; tuning validation (held-out proxies, top-k {sel.get('eval_top_k')}) {sel['start_val_loss']:.4f} -> "
           f"{sel['best_val_loss']:.4f}, kept {sel['kept']}" if has_val else "")
    if t is None or u is None:
        return [_claim("tuning_helps", claim, "not run", "", {})]
    nums = {"tuned_owner_avg": t, "untuned_owner_avg": u,
            **({"val_start": sel["start_val_loss"], "val_best": sel["best_val_loss"], "best_step": sel["best_step"]}
               if has_val else {})}
    oc = sel.get("owner_check") or {}
    if oc:
        nums.update(owners_untuned=oc.get("mean_untuned"), owners_tuned=oc.get("mean_tuned"))
        val += (f"; owners' check on their own validation data {oc['mean_untuned']:.4f} -> {oc['mean_tuned']:.4f}"
                if "mean_untuned" in oc else "")
    if oc and not oc.get("keep_tuned", True):
        return [_claim("tuning_helps", claim, "refuted",
                       f"the owners' check rejected the tuned router, so the untuned one is used (no harm, no gain){val}",
                       nums)]
    if t == u and has_val and sel.get("best_step") == 0:
        return [_claim("tuning_helps", claim, "refuted",
                       f"no tuning step improved validation, so the untuned router was kept (no harm, no gain){val}", nums)]
    return [_claim("tuning_helps", claim, "supported" if t < u else "refuted",
                   f"owner-domain mean {u:.4f} untuned -> {t:.4f} tuned ({t - u:+.4f} nats/token){val}", nums)]


def compute_claims(results: dict, thresholds: Optional[dict] = None) -> List[dict]:
    """The paper's claims, each judged from ``results`` (see the module docstring).

    ``thresholds`` overrides entries of :data:`DEFAULT_THRESHOLDS`. The ``topk_helps`` and
    ``extraction`` claims are present only when their settings ran; the ``untuned_*`` claims only
    when the run has a merge before router tuning.
    """
    th = dict(DEFAULT_THRESHOLDS, **(thresholds or {}))
    routing = lambda base: [_claim_keeps_public(results, base, th), _claim_near_oracle(results, base, th),  # noqa: E731
                            _claim_routes_own(results, base)]
    out = ([_claim_beats_public(results, "merged")] + _claims_optout(results, th) + _claims_equal_flops(results, "merged")
           + routing("merged") + _claims_topk(results))
    if "merged-untuned" in results.get("losses", {}):
        out += routing("merged-untuned")
    return out + _claim_tuning_helps(results) + _claims_extraction(results)
