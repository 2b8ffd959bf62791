"""Tests for the demo's claims and report (issue 15 items 5-7): claims computed from synthetic
results dicts (public text, oracle gap, own-expert routing, top-2 BTM, extraction with its
resolution and positive control), missing figures, the routing table and the plots."""
from __future__ import annotations

import copy
import json
import math
import os

import pytest

from flexmoe_training.demo import claims as C
from flexmoe_training.demo import report

OWNERS = ["code", "man", "licenses"]
DOMS = ["readmes"] + OWNERS
NAMES = ["public"] + OWNERS


def _routing(own_weight: float, layers: int = 2) -> dict:
    """Routing tables where each owner domain gives its own expert ``own_weight`` and the other
    owners share the rest after the public expert's 0.4."""
    out = {}
    for d in DOMS:
        w = []
        for _ in range(layers):
            if d == "readmes":
                row = [0.7, 0.1, 0.1, 0.1]
            else:
                rest = (0.6 - own_weight) / 2
                row = [0.4] + [own_weight if n == d else rest for n in OWNERS]
            w.append(row)
        out[d] = {"experts": NAMES, "tokens": 100, "weight": w, "top1": [[1.0 if i == 0 else 0.0 for i in range(4)]
                                                                       for _ in w]}
    return out


def _audit(dense=(3, 3, 3), merged=(1, 1, 1), n=10, control=(8, 0)):
    rows = [{"model": m, "domain": o, "n_docs": n, "n_extracted": k, "mean_similarity": 0.3, "prefix_len": 32,
             "gen_len": 256, "threshold": 0.9, "control": None}
            for m, ks in (("public", (0, 0, 0)), ("dense", dense), ("merged", merged)) for o, k in zip(OWNERS, ks)]
    if control:
        for kind, k in zip(("memorised", "unseen"), control):
            rows.append({"model": f"control ({kind})", "domain": "code", "n_docs": 8, "n_extracted": k,
                         "mean_similarity": 0.9, "prefix_len": 32, "gen_len": 256, "threshold": 0.9, "control": kind,
                         "details": {"steps": 50, "final_loss": 0.008, "seconds": 2.0, "trained_on": 8}})
    return rows


def _results(public_text=2.03, oracle=(2.0, 1.45, 1.55, 1.65), own_weight=0.3):
    public = dict(zip(DOMS, (2.0, 2.4, 2.5, 2.6)))
    merged = dict(zip(DOMS, (public_text, 1.5, 1.6, 1.7)))
    L = {"public": public, "merged": merged, "merged-untuned": {d: v + 0.2 for d, v in merged.items()},
         "oracle": dict(zip(DOMS, oracle))}
    for o in OWNERS:
        L[f"owner:{o}"] = {d: public[d] - (0.5 if d == o else -0.1) for d in DOMS}
        row = {d: merged[d] + 0.01 for d in DOMS}
        row[o] = public[o]
        L[f"optout:{o}"] = row
    for k in (1, 2, 3, 4):
        L[f"topk:{k}"] = {d: merged[d] + 0.1 * (4 - k) for d in DOMS}
    L["btm-top2"] = {d: public[d] - 0.2 for d in DOMS}
    L["btm-owners-top2"] = {d: public[d] - 0.6 for d in DOMS}
    L["moe"] = {d: public[d] - 0.1 for d in DOMS}
    kinds = {"public": "public", "merged": "merged", "merged-untuned": "untuned", "oracle": "oracle",
             "btm-top2": "btm", "btm-owners-top2": "btm", "moe": "moe"}
    configs = {c: {"kind": kinds.get(c, c.split(":")[0]), "label": f"row {c}", "flops_per_token": 2.5e6}
               for c in L}
    return {
        "public_domain": "readmes", "owner_domains": OWNERS, "eval_prefix": 32,
        "losses": {c: {d: {"loss": v, "ppl": math.exp(v), "tokens": 96} for d, v in r.items()} for c, r in L.items()},
        "configs": configs,
        "routing": {"merged": _routing(own_weight), "merged-untuned": _routing(0.15),
                    **{f"owner:{o}": {d: {"experts": ["public", o], "weight": [[0.45, 0.55]], "top1": [[0.4, 0.6]]}
                                      for d in DOMS} for o in OWNERS}},
        "audit": _audit(),
        "router": {"embedder": "minilm", "bias": {"code": [-0.5, -0.4]}, "tuning": {"steps": 100, "lr": 0.002}},
    }


def _by_id(res):
    return {c["id"]: c for c in C.compute_claims(res)}


def test_claims_from_numbers():
    cl = _by_id(_results())
    for cid in ("merged_beats_public", "optout_restores_public", "optout_leaves_others", "merged_beats_moe",
                "merged_keeps_public", "merged_near_oracle", "merged_routes_own", "topk_helps", "extraction"):
        assert cl[cid]["verdict"] == "supported", (cid, cl[cid])
    # BTM: the claim is against the top-2 BTM of dense members (1.5, 1.6, 1.7 vs 2.3 ..), not the owners' one
    assert cl["merged_beats_btm"]["verdict"] == "supported" and "btm-top2" in cl["merged_beats_btm"]["numbers"]
    # the merge before router tuning: its own routing claims
    assert cl["untuned_near_oracle"]["verdict"] == "refuted"  # 0.2 worse than merged, merged is 0.05 from oracle
    assert cl["untuned_routes_own"]["verdict"] == "refuted"  # 0.15 own vs 0.225 for the others
    assert math.isclose(cl["merged_near_oracle"]["numbers"]["gap"], 0.05, abs_tol=1e-9)
    assert "routing costs +0.050" in cl["merged_near_oracle"]["text"]
    assert math.isclose(cl["merged_keeps_public"]["numbers"]["difference"], 0.03, abs_tol=1e-9)


def test_claims_thresholds_flip_verdicts():
    cl = _by_id(_results(public_text=2.06, oracle=(2.0, 1.4, 1.5, 1.6), own_weight=0.1))
    assert cl["merged_keeps_public"]["verdict"] == "refuted" and "(+0.060)" in cl["merged_keeps_public"]["text"]
    assert cl["merged_near_oracle"]["verdict"] == "refuted"  # gap 0.1 > 0.05
    r = cl["merged_routes_own"]
    assert r["verdict"] == "refuted" and "own expert first in 0/2 layers" in r["text"]
    assert r["numbers"]["code"][0]["best_other"] == "man" and math.isclose(r["numbers"]["code"][0]["own"], 0.1)
    # a looser threshold changes the verdict: nothing is hard-coded
    cl = {c["id"]: c for c in C.compute_claims(_results(public_text=2.06), {"public_max_loss_increase": 0.1})}
    assert cl["merged_keeps_public"]["verdict"] == "supported"


def test_claims_missing_figures():
    res = _results()
    del res["losses"]["oracle"], res["routing"], res["losses"]["public"]["readmes"]
    del res["losses"]["merged-untuned"]
    cl = _by_id(res)
    assert cl["merged_near_oracle"]["verdict"] == "not run"
    assert cl["merged_routes_own"]["verdict"] == "not run"
    assert cl["merged_keeps_public"]["verdict"] == "not run"
    assert not any(c.startswith("untuned_") for c in cl)
    res["routing"] = {"merged": _routing(0.3)}
    del res["routing"]["merged"]["man"]
    assert _by_id(res)["merged_routes_own"]["verdict"] == "not run"  # one owner domain unmeasured
    res = _results()
    del res["losses"]["btm-top2"], res["losses"]["moe"]
    cl = _by_id(res)
    assert cl["merged_beats_btm"]["verdict"] == "not run" and cl["merged_beats_moe"]["verdict"] == "not run"
    res = _results()
    del res["audit"]
    assert "extraction" not in _by_id(res)
    minimal = {"public_domain": "readmes", "owner_domains": OWNERS, "losses": {}}
    assert {c["verdict"] for c in C.compute_claims(minimal)} == {"not run"}
    assert "Claims" in report.format_report(minimal)


def test_extraction_resolution_and_control():
    res = _results()
    res["audit"] = _audit(dense=(0, 0, 0), merged=(0, 0, 0), n=32)
    e = _by_id(res)["extraction"]
    assert e["verdict"] == "inconclusive" and "fewer than 2 documents" in e["text"]
    assert "resolution 1/96 = 1.0%" in e["text"] and "needs >= 223 per model" in e["text"]
    assert e["numbers"]["resolution"] == pytest.approx(1 / 96) and e["numbers"]["control_passed"] is True
    res["audit"] = _audit(dense=(1, 0, 0), merged=(0, 0, 0), n=32)
    assert _by_id(res)["extraction"]["verdict"] == "inconclusive"  # one document apart
    res["audit"] = _audit(dense=(1, 1, 0), merged=(0, 0, 0), n=32)
    assert _by_id(res)["extraction"]["verdict"] == "supported"
    res["audit"] = _audit(dense=(0, 0, 0), merged=(1, 1, 0), n=32)
    assert _by_id(res)["extraction"]["verdict"] == "refuted"
    # an audit that misses the positive control cannot judge anything
    res["audit"] = _audit(dense=(3, 3, 3), merged=(0, 0, 0), control=(2, 0))
    e = _by_id(res)["extraction"]
    assert e["verdict"] == "inconclusive" and "failed its positive control" in e["text"]
    res["audit"] = _audit(control=(8, 3))  # the control model "reproduces" documents it never saw
    assert _by_id(res)["extraction"]["verdict"] == "inconclusive"
    res["audit"] = _audit(control=None)
    e = _by_id(res)["extraction"]
    assert e["verdict"] == "supported" and "no positive control ran" in e["text"]


def test_report_text_and_json(tmp_path):
    res = _results()
    cl = C.compute_claims(res)
    text = report.format_report(res, cl)
    assert "MFLOP/tok" in text and " 2.5" in text
    assert "every row scored on the same tokens: 32 .. end of each window" in text
    assert "Routing of row merged" in text and "Routing of row merged-untuned" in text
    assert "0.30 (  0%)*" in text  # code's own expert on code, marked
    assert "Owners' 2-expert models" in text and "code 0.55 on code, 0.55 on readmes" in text
    assert "Router:" in text and "embedder: minilm" in text and "tuning: {steps: 100, lr: 0.002}" in text
    assert "control (memorised)" in text and "trained on 8 of the audited code documents for 50 steps" in text
    assert "[INCONCLUSIVE]" not in text and "[REFUTED  ]" in text
    report.write_json(str(tmp_path / "r.json"), res, cl)
    back = json.load(open(tmp_path / "r.json"))
    assert back["routing"]["merged"]["code"]["weight"][0][1] == 0.3
    assert {c["id"] for c in back["claims"]} >= {"merged_near_oracle", "merged_routes_own", "merged_keeps_public"}
    # rows and blocks that are absent are simply not printed
    res2 = copy.deepcopy(res)
    for k in ("routing", "router", "audit", "eval_prefix"):
        del res2[k]
    for c in res2["configs"].values():
        del c["flops_per_token"]
    text2 = report.format_report(res2)
    assert "MFLOP/tok" not in text2 and "Routing of" not in text2 and "Router:" not in text2
    assert report.format_router({"router": "hidden-state init"}) == "Router: hidden-state init"


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    res = _results()
    png = report.plot_routing(res, str(tmp_path / "routing.png"))
    assert png and os.path.getsize(png) > 5000
    assert os.path.getsize(report.plot_losses(res, str(tmp_path / "losses.png"))) > 5000
    del res["routing"]
    assert report.plot_routing(res, str(tmp_path / "none.png")) is None


def test_claim_router_tuning_helps_from_held_out_owner_loss():
    """Judged on held-out test text (tuned vs untuned merge); the tuning's own validation is quoted."""
    res = _results()                               # untuned is 0.2 worse on every domain
    res["router_tuning"] = {"start_val_loss": 2.5, "best_val_loss": 2.3, "best_step": 40, "kept": "trained",
                            "eval_top_k": 3}
    c = _by_id(res)["tuning_helps"]
    assert c["verdict"] == "supported" and "-0.2000 nats/token" in c["text"] and "2.5000 -> 2.3000" in c["text"]
    res["losses"]["merged-untuned"] = {d: {"loss": v["loss"] - 0.1} for d, v in res["losses"]["merged"].items()}
    assert _by_id(res)["tuning_helps"]["verdict"] == "refuted"            # tuning made the owners worse
    # nothing improved validation: the untuned router was kept, so the two models are the same
    res["losses"]["merged-untuned"] = res["losses"]["merged"]
    res["router_tuning"] = {"start_val_loss": 2.5, "best_val_loss": 2.5, "best_step": 0,
                            "kept": "start (no step improved validation)", "eval_top_k": 3}
    c = _by_id(res)["tuning_helps"]
    assert c["verdict"] == "refuted" and "untuned router was kept" in c["text"]
    del res["losses"]["merged-untuned"]
    assert "tuning_helps" not in _by_id(res)


def test_claim_router_tuning_rejected_by_the_owners_check():
    res = _results()
    res["losses"]["merged-untuned"] = res["losses"]["merged"]          # ckpt/merged is the untuned router
    res["router_tuning"] = {"start_val_loss": 4.23, "best_val_loss": 3.95, "best_step": 100, "kept": "trained",
                            "eval_top_k": 3, "owner_check": {"keep_tuned": False, "mean_untuned": 3.6,
                                                             "mean_tuned": 3.9}}
    c = _by_id(res)["tuning_helps"]
    assert c["verdict"] == "refuted" and "owners' check rejected" in c["text"] and "3.6000 -> 3.9000" in c["text"]
    assert c["numbers"]["owners_tuned"] == 3.9
