"""Tests for the demo (training/demo): corpora, audit, evaluation, report, generate, --quick end to end.

The package ``flexmoe_training`` is the directory ``training/``; when it is not installed the
tests import it through a symlink in a temporary directory.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _training_pythonpath() -> str:
    """A directory that makes ``import flexmoe_training`` work (installed or via a symlink)."""
    try:
        import flexmoe_training  # noqa: F401

        return ""
    except ImportError:
        d = tempfile.mkdtemp(prefix="flexmoe_pp_")
        os.symlink(os.path.join(ROOT, "training"), os.path.join(d, "flexmoe_training"))
        sys.path.insert(0, d)
        return d


_PP = _training_pythonpath()

from flexmoe_training.demo import audit, corpora, evaluate, report  # noqa: E402


def _subprocess_env() -> dict:
    env = dict(os.environ)
    parts = [ROOT] + ([_PP] if _PP else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


# ============================================================================ corpora
SMALL = dict(train_bytes=12_000, test_bytes=3_000, doc_bytes=1024, min_doc_bytes=200, test_fraction=0.2)


def _fake_source(name, texts):
    """A Source over an in-memory list of texts (origins are list indices)."""
    def find():
        origins = [f"{name}:{i}" for i in range(len(texts))]
        return origins, lambda paths: ((p, texts[int(p.split(":")[1])]) for p in paths)
    return corpora.Source(name, f"fake {name}", find)


def _words(rng, n):
    vocab = ["alpha", "beta", "gamma", "delta", "kernel", "expert", "router", "token", "owner", "merge"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def _paragraph_texts(seed, n_files, lines=40):
    rng = random.Random(seed)
    return ["\n".join(_words(rng, 8) for _ in range(lines)) for _ in range(n_files)]


def test_split_into_documents_bounds():
    rng = random.Random()
    text = "\n".join(_words(rng, rng.randrange(1, 20)) for _ in range(300))
    docs = corpora.split_into_documents(text, doc_bytes=500, min_bytes=100)
    assert docs
    for d in docs:
        n = len(d.encode())
        assert 100 <= n <= 500
    # nothing is lost except dropped short pieces: every doc is a contiguous slice of the text
    assert all(d in text for d in docs)
    with pytest.raises(ValueError, match="doc_bytes"):
        corpora.split_into_documents(text, 0, 10)


def test_strip_roff():
    src = "\n".join([
        '.\\" a comment',
        ".de XX",
        ".ft CW",
        "..",
        '.TH LS "1"',
        ".SH NAME",
        "ls \\- list directory contents",
        ".SH DESCRIPTION",
        ".B ls",
        "sorts \\fBentries\\fR alphabetically \\(em always \\*(C`quoted\\*(C'.",
        ".PP",
        "Second paragraph with \\e backslash.",
    ])
    out = corpora.strip_roff(src)
    assert "comment" not in out and ".ft" not in out and ".TH" not in out
    assert "NAME" in out and "ls - list directory contents" in out
    assert "sorts entries alphabetically -- always quoted." in out
    assert "with \\ backslash" in out
    assert "\\f" not in out


def test_corpora_real_sources(tmp_path):
    """The real sources of this machine: a public corpus and three owners, disjoint splits, counts right."""
    spec = corpora.CorpusSpec(num_owners=3, **SMALL)
    d = corpora.build_corpora(str(tmp_path), spec, log=lambda s: None)
    man = corpora.load_manifest(d)
    assert man["public"] in corpora.PUBLIC_PREFERENCE
    assert len(man["owners"]) == 3 and man["public"] not in man["owners"]
    hashes = set()
    for name in [man["public"]] + man["owners"]:
        info = man["domains"][name]
        tr = corpora.read_documents(os.path.join(d, name, "train.jsonl"))
        te = corpora.read_documents(os.path.join(d, name, "test.jsonl"))
        assert len(tr) == info["train_docs"] > 0 and len(te) == info["test_docs"] > 0
        assert sum(len(x.text.encode()) for x in tr) == info["train_bytes"]
        ids = [x.id for x in tr + te]
        assert len(set(ids)) == len(ids), f"duplicate documents in {name}"
        assert not (set(ids) & hashes), f"{name} shares documents with another domain"
        hashes.update(ids)
        assert all(x.text.strip() for x in tr + te)
    # cached: a second call reuses the directory
    logs = []
    assert corpora.build_corpora(str(tmp_path), spec, log=logs.append) == d
    assert any("reusing" in m for m in logs)


def test_corpora_dedup_and_deterministic_split(tmp_path, monkeypatch):
    base = _paragraph_texts(random.randrange(1 << 30), 30)
    # exact duplicates and whitespace variants of the same files must be dropped
    dup = base + base[:10] + [t.replace(" ", "  ") for t in base[10:15]]
    other = {n: _paragraph_texts(random.randrange(1 << 30), 30) for n in ("o1", "o2", "o3")}
    other["o3"] = other["o3"] + base[:5]  # cross-domain duplicates: the first domain keeps them
    srcs = {"pub": _fake_source("pub", dup), **{n: _fake_source(n, t) for n, t in other.items()}}
    monkeypatch.setattr(corpora, "SOURCES", srcs)
    spec = corpora.CorpusSpec(num_owners=3, public="pub", owners=["o1", "o2", "o3"],
                              **dict(SMALL, train_bytes=10**7, test_bytes=10**7, min_train_bytes=1000))
    d1 = corpora.build_corpora(str(tmp_path / "a"), spec, log=lambda s: None)
    man = corpora.load_manifest(d1)
    assert man["domains"]["pub"]["duplicates_dropped"] > 0
    assert man["domains"]["o3"]["duplicates_dropped"] > 0
    all_ids = []
    for n in srcs:
        for split in ("train", "test"):
            all_ids += [x.id for x in corpora.read_documents(os.path.join(d1, n, f"{split}.jsonl"))]
    assert len(all_ids) == len(set(all_ids))
    # the same inputs in another order give byte-identical splits (split by hash, not by order)
    srcs2 = {n: _fake_source(n, list(reversed(t))) for n, t in [("pub", dup)] + list(other.items())}
    monkeypatch.setattr(corpora, "SOURCES", srcs2)
    d2 = corpora.build_corpora(str(tmp_path / "b"), spec, log=lambda s: None)
    for n in srcs:
        for split in ("train", "test"):
            a = open(os.path.join(d1, n, f"{split}.jsonl")).read()
            b = open(os.path.join(d2, n, f"{split}.jsonl")).read()
            ta = sorted(json.loads(x)["id"] for x in a.splitlines())
            tb = sorted(json.loads(x)["id"] for x in b.splitlines())
            assert ta == tb
    te = corpora.read_documents(os.path.join(d1, "o1", "test.jsonl"))
    tr = corpora.read_documents(os.path.join(d1, "o1", "train.jsonl"))
    assert te and tr and not ({x.id for x in te} & {x.id for x in tr})


def test_corpora_graceful_fallback(tmp_path, monkeypatch):
    """A missing source is skipped, the next one in the preference order is taken, the manifest says so."""
    real = dict(corpora.SOURCES)
    missing = corpora.Source("man", "manual pages", lambda: ([], lambda paths: iter(())))
    broken = corpora.Source("readmes", "prose", lambda: (_ for _ in ()).throw(OSError("no such dir")))
    monkeypatch.setattr(corpora, "SOURCES", dict(real, man=missing, readmes=broken))
    spec = corpora.CorpusSpec(num_owners=3, **SMALL)
    # the broad public corpus is still built, without prose, and says why
    d = corpora.build_corpora(str(tmp_path / "web"), spec, log=lambda s: None)
    man = corpora.load_manifest(d)
    assert man["public"] == "web" and "no such dir" in man["domains"]["web"]["kind_errors"]["prose"]
    # no broad public corpus at all: the next public preference
    monkeypatch.setattr(corpora, "WEB_MIX", [])
    d = corpora.build_corpora(str(tmp_path), spec, log=lambda s: None)
    man = corpora.load_manifest(d)
    assert man["public"] == "pydoc"  # web empty, readmes broken -> next public preference
    assert "man" not in man["owners"] and "pydoc" not in man["owners"]
    assert len(man["owners"]) == 3
    assert "man" in man["skipped"] and "readmes" in man["skipped"]
    assert "no such dir" in man["skipped"]["readmes"]
    # not enough owners at all: an error that names what was found
    monkeypatch.setattr(corpora, "SOURCES", {"p": _fake_source("p", _paragraph_texts(1, 20)),
                                             "o": _fake_source("o", _paragraph_texts(2, 20))})
    with pytest.raises(RuntimeError, match="owner domains"):
        corpora.build_corpora(str(tmp_path / "x"), corpora.CorpusSpec(num_owners=2, public="p", owners=["o"], **SMALL),
                              log=lambda s: None)
    with pytest.raises(ValueError, match="unknown corpus source"):
        corpora.build_corpora(str(tmp_path / "y"), corpora.CorpusSpec(owners=["nope"]), log=lambda s: None)


# ============================================================================ audit
@functools.lru_cache(maxsize=None)
def _lev_ref(a: tuple, b: tuple) -> int:
    if not a:
        return len(b)
    if not b:
        return len(a)
    return min(_lev_ref(a[1:], b) + 1, _lev_ref(a, b[1:]) + 1, _lev_ref(a[1:], b[1:]) + (a[0] != b[0]))


def test_levenshtein_against_reference():
    assert audit.levenshtein("kitten", "sitting") == 3
    assert audit.levenshtein("", "abc") == 3 and audit.levenshtein("abc", "") == 3
    assert audit.levenshtein([1, 2, 3], [1, 2, 3]) == 0
    rng = random.Random()
    for _ in range(200):
        a = tuple(rng.randrange(4) for _ in range(rng.randrange(0, 9)))
        b = tuple(rng.randrange(4) for _ in range(rng.randrange(0, 9)))
        d = audit.levenshtein(a, b)
        assert d == _lev_ref(a, b) == audit.levenshtein(b, a)
        s = audit.similarity(a, b)
        assert 0.0 <= s <= 1.0
        if a or b:
            assert math.isclose(s, 1 - d / max(len(a), len(b)))
    assert audit.similarity([], []) == 1.0


class _Memoriser(torch.nn.Module):
    """A fake LM whose greedy continuation of a known prefix is the true text, with `n_wrong` tokens changed."""

    def __init__(self, docs, n_wrong):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.docs = {tuple(d[:32]): d for d in docs}
        self.n_wrong = n_wrong
        self.calls = []

    def generate(self, input_ids, max_new_tokens, do_sample=False, allowed_experts=None, eos_token_id=None,
                 use_cache=True):
        self.calls.append(dict(do_sample=do_sample, use_cache=use_cache, allowed=allowed_experts))
        rows = []
        for row in input_ids.tolist():
            d = self.docs[tuple(row[-32:])]  # the prompt may carry a prompt_prefix
            cont = list(d[32:32 + max_new_tokens])
            for i in range(min(self.n_wrong, len(cont))):
                # a token that never occurs in the documents (they use 0..199): each wrong token
                # costs exactly one edit, so the similarity is exactly 1 - n_wrong / gen
                cont[i] = 200 + cont[i] % 56
            rows.append(row + cont)
        return torch.tensor(rows)


def test_audit_extraction_counts():
    rng = random.Random()
    docs = [[rng.randrange(200) for _ in range(rng.randrange(60, 90))] for _ in range(7)]
    gen = 20
    for n_wrong, expect in [(0, 1.0), (2, 1.0), (3, 0.0), (20, 0.0)]:  # 2/20 wrong -> sim 0.9 (extracted)
        m = _Memoriser(docs, n_wrong)
        r = audit.audit_extraction(m, docs, model_name="m", domain="d", prefix_len=32, gen_len=gen,
                                   threshold=0.9, batch_size=3, allowed_experts=["public"])
        assert r.n_docs == 7 and r.share == expect, (n_wrong, r.share, r.similarities)
        assert math.isclose(r.mean_similarity, 1 - n_wrong / gen)
        assert all(c["do_sample"] is False and c["use_cache"] for c in m.calls)
        assert m.calls[0]["allowed"] == ["public"]
        assert len(m.calls) == 3  # batches of 3
        r2 = audit.audit_extraction(_Memoriser(docs, n_wrong), docs, model_name="m", domain="d", prefix_len=32,
                                    gen_len=gen, threshold=0.9, batch_size=4, prompt_prefix=[256])
        assert r2.share == expect and r2.n_docs == 7
    with pytest.raises(ValueError, match="docs_tokens\\[0\\]"):
        audit.audit_extraction(m, [[1] * 10], model_name="m", domain="d", prefix_len=32, gen_len=gen)
    idx = audit.select_audit_documents([[0] * 10, [0] * 62, [0] * 70], ["a", "b", "c"], 5, 32, 30)
    assert sorted(idx) == [1, 2]
    assert idx == audit.select_audit_documents([[0] * 10, [0] * 62, [0] * 70], ["a", "b", "c"], 5, 32, 30)


# ============================================================================ evaluation
def test_ensemble_logprobs_against_reference():
    M, W, S1 = 3, 2, 7
    logits = torch.randn(M, W, S1, 5, dtype=torch.float64)
    targets = torch.randint(0, 5, (W, S1))
    lp_MWS = torch.log_softmax(logits, -1).gather(-1, targets[None, :, :, None].expand(M, W, S1, 1))[..., 0]
    uni = evaluate.ensemble_logprobs(lp_MWS.float(), "uniform")
    ref = torch.log(torch.exp(lp_MWS).mean(0))
    torch.testing.assert_close(uni.double(), ref, atol=1e-5, rtol=1e-5)
    pri = evaluate.ensemble_logprobs(lp_MWS.float(), "prior")
    ref2 = torch.empty(W, S1, dtype=torch.float64)
    for w in range(W):
        for t in range(S1):
            like = torch.exp(lp_MWS[:, w, :t].sum(-1))  # likelihood of the prefix under each member
            wts = like / like.sum()
            ref2[w, t] = torch.log((wts * torch.exp(lp_MWS[:, w, t])).sum())
    torch.testing.assert_close(pri.double(), ref2, atol=1e-5, rtol=1e-5)
    # the prior-weighted ensemble's total log-likelihood is log(mean_m p_m(window))
    torch.testing.assert_close(pri.double().sum(-1), torch.logsumexp(lp_MWS.sum(-1), 0) - math.log(M),
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(evaluate.ensemble_logprobs(lp_MWS[:1].float(), "prior"), lp_MWS[0].float())
    with pytest.raises(ValueError, match="weighting"):
        evaluate.ensemble_logprobs(lp_MWS.float(), "max")


class _BigramLM(torch.nn.Module):
    def __init__(self, V=11):
        super().__init__()
        self.emb = torch.nn.Embedding(V, V)
        self.seen_allowed = []

    def forward(self, x, allowed_experts=None):
        self.seen_allowed.append(allowed_experts)
        return type("Out", (), {"logits": self.emb(x)})()


def test_windows_and_domain_loss(one_thread):
    docs = [[random.randrange(10) for _ in range(n)] for n in (5, 17, 3, 40)]
    w = evaluate.make_windows(docs, seq_len=8, max_tokens=10**6, eos_token_id=10)
    flat = sum((d + [10] for d in docs), [])
    assert w.shape == (len(flat) // 8, 8) and w.flatten().tolist() == flat[: w.numel()]
    assert evaluate.make_windows(docs, 8, 17, 10).shape == (2, 8)
    with pytest.raises(ValueError, match="seq_len"):
        evaluate.make_windows(docs, 1, 100, None)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate.make_windows([[1, 2]], 8, 100, None)
    m = _BigramLM()
    res = evaluate.domain_loss(m, w, allowed_experts=["x"], batch_size=3)
    ref = F.cross_entropy(m.emb(w[:, :-1]).reshape(-1, 11).double(), w[:, 1:].reshape(-1))
    assert math.isclose(res["loss"], float(ref.detach()), rel_tol=1e-5)
    assert res["tokens"] == w.shape[0] * 7 and math.isclose(res["ppl"], math.exp(res["loss"]))
    assert m.seen_allowed and all(a == ["x"] for a in m.seen_allowed)


# ============================================================================ report
def _synthetic_results(optout_own=2.3, optout_side=0.01, merged=(2.0, 1.5, 1.6, 1.7)):
    owners = ["code", "man", "licenses"]
    doms = ["readmes"] + owners
    public = dict(zip(doms, (2.0, 2.4, 2.5, 2.6)))
    merged = dict(zip(doms, merged))
    losses = {"public": public, "merged": merged}
    for o in owners:
        row = {d: merged[d] + optout_side for d in doms}
        row[o] = merged[o] + (optout_own - 1.5)  # the own domain moves by optout_own - 1.5
        losses[f"optout:{o}"] = row
    for k in (1, 2, 3, 4):
        losses[f"topk:{k}"] = {d: merged[d] + 0.1 * (4 - k) for d in doms}
    losses["btm-prior"] = {d: public[d] - 0.2 for d in doms}
    losses["moe"] = {d: public[d] - 0.1 for d in doms}
    kinds = {"public": "public", "merged": "merged", "btm-prior": "btm", "moe": "moe"}
    configs = {c: {"kind": kinds.get(c, c.split(":")[0]), "label": c} for c in losses}
    return {
        "public_domain": "readmes", "owner_domains": owners,
        "losses": {c: {d: {"loss": v, "ppl": math.exp(v), "tokens": 100} for d, v in r.items()} for c, r in losses.items()},
        "configs": configs,
        "audit": [{"model": m, "domain": o, "n_docs": 10, "n_extracted": n, "mean_similarity": 0.3,
                   "prefix_len": 32, "gen_len": 64, "threshold": 0.9}
                  for m, n in (("public", 0), ("dense", 3), ("merged", 1)) for o in owners],
    }


def test_claims_supported_and_refuted():
    res = _synthetic_results()
    claims = {c["id"]: c for c in report.compute_claims(res)}
    assert claims["merged_beats_public"]["verdict"] == "supported"
    assert "code: 2.400 -> 1.500" in claims["merged_beats_public"]["text"]
    assert claims["optout_restores_public"]["verdict"] == "supported"
    assert claims["optout_leaves_others"]["verdict"] == "supported"
    assert claims["merged_beats_btm"]["verdict"] == "supported"
    assert claims["merged_beats_moe"]["verdict"] == "supported"
    assert claims["topk_helps"]["verdict"] == "supported"
    assert claims["extraction"]["verdict"] == "supported"
    # numbers are computed: code's own change on opt-out is optout_own - 1.5 + merged - merged
    n = claims["optout_leaves_others"]["numbers"]["code"]
    assert math.isclose(n["own_domain_change"], 0.8) and math.isclose(n["worst_ratio"], 0.01 / 0.8)

    # opt-out barely changes the own domain -> "restores" refuted; big side effects -> "leaves" refuted
    res = _synthetic_results(optout_own=1.55, optout_side=0.2)
    claims = {c["id"]: c for c in report.compute_claims(res)}
    assert claims["optout_restores_public"]["verdict"] == "refuted"
    assert claims["optout_leaves_others"]["verdict"] == "refuted"
    # merged worse than public on one owner domain -> refuted
    res = _synthetic_results(merged=(2.0, 1.5, 2.6, 1.7))
    assert {c["id"]: c for c in report.compute_claims(res)}["merged_beats_public"]["verdict"] == "refuted"
    # missing settings -> "not run", never a verdict
    res = _synthetic_results()
    del res["losses"]["merged"]
    claims = {c["id"]: c for c in report.compute_claims(res)}
    assert claims["merged_beats_public"]["verdict"] == "not run"
    assert claims["optout_restores_public"]["verdict"] == "not run"


def test_report_outputs(tmp_path):
    res = _synthetic_results()
    claims = report.compute_claims(res)
    text = report.format_report(res, claims)
    for c in res["losses"]:
        assert c in text
    assert "[SUPPORTED]" in text and "Extraction audit" in text and "3/10" in text
    assert "Training FLOPs" not in text
    res["flops"] = {"flexolmo": 1.5e12, "btm": None, "moe": 1.49e12}
    text = report.format_report(res, claims)
    assert "FlexOlmo 1.5e+12" in text and "joint MoE 1.49e+12" in text and "BTM" not in text.split("Training FLOPs")[1].splitlines()[0]
    report.write_json(str(tmp_path / "r.json"), res, claims)
    back = json.load(open(tmp_path / "r.json"))
    assert back["claims"][0]["verdict"] == "supported" and back["losses"]["merged"]["code"]["loss"] == 1.5
    png = report.plot_losses(res, str(tmp_path / "p.png"))
    assert os.path.getsize(png) > 5000


# ============================================================================ opt-out inference helpers
def test_resolve_allow_list():
    from flexmoe_training.demo.inference import resolve_allow_list

    names = ["public", "code", "man", "licenses"]
    assert resolve_allow_list(names, None, None, 2) is None
    assert resolve_allow_list(names, ["code", "public"], None, 2) == ["public", "code"]
    assert resolve_allow_list(names, None, ["man"], 2) == ["public", "code", "licenses"]
    with pytest.raises(ValueError, match="--allow: unknown expert 'news'"):
        resolve_allow_list(names, ["news"], None, 1)
    with pytest.raises(ValueError, match="--deny: unknown expert"):
        resolve_allow_list(names, None, ["x"], 1)
    with pytest.raises(ValueError, match="top_k=2"):
        resolve_allow_list(names, ["code"], None, 2)
    with pytest.raises(ValueError, match="not both"):
        resolve_allow_list(names, ["code"], ["man"], 1)


def test_expert_usage_against_reference():
    from flexmoe_training.demo.inference import expert_usage

    T, E, K, L = 37, 4, 2, 3
    logits = [torch.randn(T, E) for _ in range(L)]
    for lg in logits:
        lg[:, 2] = float("-inf")  # expert 2 opted out
    u = expert_usage(logits, K, ["a", "b", "c", "d"])
    slots = torch.zeros(E)
    wsum = torch.zeros(E, dtype=torch.float64)
    for lg in logits:
        p = torch.softmax(lg.double(), -1)
        for t in range(T):
            top = sorted(range(E), key=lambda e: -float(p[t, e]))[:K]
            for e in top:
                slots[e] += 1
                wsum[e] += p[t, e]
    assert [u[n]["slots"] for n in "abcd"] == slots.long().tolist()
    assert u["c"]["slots"] == 0 and sum(u[n]["slots"] for n in "abcd") == T * K * L
    for i, n in enumerate("abcd"):
        assert math.isclose(u[n]["weight"], float(wsum[i]) / (T * L), rel_tol=1e-5, abs_tol=1e-9)
        assert math.isclose(u[n]["share"], float(slots[i]) / (T * K * L))


# ============================================================================ flexmoe generate
def _tiny_model(tmp_path, names=("public", "code", "man", "licenses"), k=2):
    from flexmoe_kernels.models import FlexOlmoConfig, FlexOlmoForCausalLM

    cfg = FlexOlmoConfig(vocab_size=258, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_experts=len(names), num_experts_per_tok=k,
                         expert_names=list(names), eos_token_id=256, pad_token_id=257,
                         moe_backend="torch")
    m = FlexOlmoForCausalLM(cfg)
    with torch.no_grad():  # make routing decisive so different opt-outs give different text
        for layer in m.moe_layers():
            layer.gate.weight.mul_(40.0)
    d = tmp_path / "model"
    m.save_pretrained(str(d))
    return m, str(d)


def _run_generate(argv, capsys):
    from flexmoe_training import cli

    rc = cli.main(["generate", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _usage_rows(out):
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[1] in ("yes", "NO") and parts[3].endswith("%"):
            rows[parts[0]] = (parts[1], int(parts[2]))
    return rows


def test_generate_command_opt_out(tmp_path, capsys, one_thread):
    from flexmoe_kernels.models import FlexOlmoForCausalLM

    model, d = _tiny_model(tmp_path)
    prompt = "def main(argv):"
    n_new = 12
    rc, out, err = _run_generate(["--model", d, "--deny", "code", "--max-new-tokens", str(n_new), prompt], capsys)
    assert rc == 0, err
    rows = _usage_rows(out)
    assert set(rows) == {"public", "code", "man", "licenses"}
    assert rows["code"] == ("NO", 0)
    tokens = len(prompt.encode()) + 1 + n_new  # EOS (document start) + prompt bytes + new tokens
    assert sum(n for _, n in rows.values()) == tokens * 2 * 2  # T * layers * K
    # the text printed equals an independent reference: the model with "code" physically removed
    ref = FlexOlmoForCausalLM.from_pretrained(d)
    ref.remove_expert("code")
    ids = torch.tensor([[256] + list(prompt.encode())])
    want = ref.generate(ids, max_new_tokens=n_new, eos_token_id=[])[0, ids.shape[1]:].tolist()
    want_text = prompt + bytes(t for t in want if t < 256).decode("utf-8", errors="replace")
    assert want_text in out
    # --allow: only the listed experts serve tokens
    rc, out, err = _run_generate(["--model", d, "--allow", "public,man", "--max-new-tokens", "5", "hi"], capsys)
    assert rc == 0, err
    rows = _usage_rows(out)
    assert rows["code"] == ("NO", 0) and rows["licenses"] == ("NO", 0)
    assert rows["public"][1] + rows["man"][1] == (3 + 5) * 2 * 2
    # bad requests: errors name the flag
    rc, out, err = _run_generate(["--model", d, "--allow", "nope", "hi"], capsys)
    assert rc == 2 and "--allow: unknown expert 'nope'" in err
    rc, out, err = _run_generate(["--model", d, "--allow", "man", "hi"], capsys)
    assert rc == 2 and "top_k=2" in err
    rc, out, err = _run_generate(["--model", d, "--allow", "man", "--top-k", "1", "--max-new-tokens", "3", "hi"], capsys)
    assert rc == 0 and _usage_rows(out)["man"] == ("yes", (3 + 3) * 2)


def test_generate_experts_per_token_and_sampling_top_k(tmp_path, capsys, one_thread, monkeypatch):
    """--experts-per-token sets the active experts; --top-k is sampling top-k when sampling, and
    keeps its old meaning (active experts) only without sampling, with a deprecation note."""
    from flexmoe_kernels.models import FlexOlmoForCausalLM

    _, d = _tiny_model(tmp_path)
    rc, out, err = _run_generate(["--model", d, "--allow", "man", "--experts-per-token", "1",
                                  "--max-new-tokens", "3", "hi"], capsys)
    assert rc == 0 and _usage_rows(out)["man"] == ("yes", (3 + 3) * 2) and "deprecated" not in err
    rc, out, err = _run_generate(["--model", d, "--allow", "man", "--top-k", "1", "--max-new-tokens", "3", "hi"],
                                 capsys)
    assert rc == 0 and "deprecated" in err and "--experts-per-token 1" in err
    seen = {}
    real = FlexOlmoForCausalLM.generate

    def spy(self, *a, **kw):
        seen.update(kw, experts=self.config.num_experts_per_tok)
        return real(self, *a, **kw)

    monkeypatch.setattr(FlexOlmoForCausalLM, "generate", spy)
    rc, out, err = _run_generate(["--model", d, "--top-k", "5", "--temperature", "0.8", "--max-new-tokens", "3",
                                  "hi"], capsys)
    assert rc == 0, err
    assert seen["top_k"] == 5 and seen["do_sample"] and seen["experts"] == 2   # sampling top-k; experts untouched
    assert "deprecated" not in err
    # out of range: one line naming the flag, never a traceback
    for argv, want in ((["--experts-per-token", "0"], "--experts-per-token must be in [1, 4]"),
                       (["--experts-per-token", "9"], "--experts-per-token must be in [1, 4]"),
                       (["--top-k", "9"], "--top-k must be in [1, 4]"),
                       (["--top-k", "0", "--temperature", "0.7"], "--top-k (sampling) must be >= 1")):
        rc, out, err = _run_generate(["--model", d, *argv, "--max-new-tokens", "2", "hi"], capsys)
        assert rc == 2 and want in err and len(err.strip().splitlines()) <= 2, (argv, err)
    rc, out, err = _run_generate(["--model", d, "--allow", "man", "hi"], capsys)
    assert rc == 2 and "--experts-per-token 1" in err


def test_generate_never_reads_opted_out_weights(tmp_path, capsys, one_thread):
    """NaN weights in a denied expert cannot reach the output (exact opt-out)."""
    from flexmoe_kernels.models import FlexOlmoForCausalLM

    model, d = _tiny_model(tmp_path)
    m = FlexOlmoForCausalLM.from_pretrained(d)
    with torch.no_grad():
        for layer in m.moe_layers():
            i = layer.expert_index("licenses")
            layer.experts.gate_up_proj[i].fill_(float("nan"))
            layer.experts.down_proj[i].fill_(float("nan"))
    d2 = str(tmp_path / "poisoned")
    m.save_pretrained(d2)
    rc, out_p, err = _run_generate(["--model", d2, "--deny", "licenses", "--max-new-tokens", "8", "abc"], capsys)
    assert rc == 0, err
    rc, out_c, err = _run_generate(["--model", d, "--deny", "licenses", "--max-new-tokens", "8", "abc"], capsys)
    assert rc == 0, err
    assert out_p == out_c


def test_generate_repeated_allow_deny_accumulate(tmp_path, capsys, one_thread):
    """Issue 12 item 1: repeated --deny / --allow flags accumulate (and mix with the comma
    form); a denied list that leaves fewer than top_k experts is an error naming the flag."""
    _, d = _tiny_model(tmp_path)
    rc, out, err = _run_generate(["--model", d, "--deny", "code", "--deny", "man", "--max-new-tokens", "3", "hi"],
                                 capsys)
    assert rc == 0, err
    assert "allowed: ['public', 'licenses']" in out
    rows = _usage_rows(out)
    assert rows["code"] == ("NO", 0) and rows["man"] == ("NO", 0)
    rc, out, err = _run_generate(["--model", d, "--allow", "public", "--allow", "man,licenses",
                                  "--max-new-tokens", "3", "hi"], capsys)
    assert rc == 0, err
    assert "allowed: ['public', 'man', 'licenses']" in out and _usage_rows(out)["code"] == ("NO", 0)
    # a third --deny leaves one expert for top-k 2: refused, never silently dropped
    rc, out, err = _run_generate(["--model", d, "--deny", "code,man", "--deny", "public", "hi"], capsys)
    assert rc == 2 and out == ""
    assert "--deny" in err and "top_k=2" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _run_generate(["--model", d, "--deny", "code", "--deny", "nope", "hi"], capsys)
    assert rc == 2 and "--deny: unknown expert 'nope'" in err


def test_generate_unreadable_model_is_one_line(tmp_path, capsys, one_thread):
    """Issue 12 item 6a/6b through ``flexmoe generate``: a corrupt weights file or config.json is
    a one-line error naming --model and the file, exit 2 (not a traceback)."""
    _, d = _tiny_model(tmp_path)
    weights = os.path.join(d, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    rc, out, err = _run_generate(["--model", d, "hi"], capsys)
    assert rc == 2 and err.startswith("flexmoe generate: --model") and weights in err
    assert len(err.strip().splitlines()) == 1
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{,}")
    rc, out, err = _run_generate(["--model", d, "hi"], capsys)
    assert rc == 2 and os.path.join(d, "config.json") in err and "line 1, column 2" in err


# ============================================================================ the whole demo, --quick
@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    """`flexmoe demo --quick` in a subprocess: every stage, every setting, the report, then generate.

    Deselect with ``-m "not slow"``; CI runs it (see estimate("quick") in training/demo/pipeline.py).
    """
    env = _subprocess_env()
    cmd = [sys.executable, "-m", "flexmoe_training.cli", "demo", "--quick", "--work-dir", str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"demo failed\nSTDOUT:\n{r.stdout[-6000:]}\nSTDERR:\n{r.stderr[-6000:]}"
    runs = [d for d in os.listdir(tmp_path) if d.startswith("quick-")]
    assert len(runs) == 1
    run_dir = tmp_path / runs[0]
    res = json.load(open(run_dir / "results.json"))
    owners, pub = res["owner_domains"], res["public_domain"]
    assert len(owners) >= 3 and pub not in owners
    E = len(owners) + 1
    assert res["expert_names"][0] == "public" and set(res["expert_names"][1:]) == set(owners)
    want = {"public", "merged", "oracle", "btm-top2", "btm-owners-top2", "moe"} | {f"owner:{d}" for d in owners} \
        | {f"optout:{d}" for d in owners} | {f"dense:{d}" for d in owners} | {f"topk:{k}" for k in range(1, E + 1)}
    assert want <= set(res["losses"]), sorted(want - set(res["losses"]))
    for cfg, row in res["losses"].items():
        assert set(row) == {pub, *owners}
        for d, v in row.items():
            assert math.isfinite(v["loss"]) and 0.0 < v["loss"] < 10.0 and v["tokens"] > 0, (cfg, d, v)
    # the merged model with all experts equals top-k = K of the sweep exactly (same windows, same model)
    K = res["top_k"]
    for d in owners:
        assert math.isclose(res["losses"]["merged"][d]["loss"], res["losses"][f"topk:{K}"][d]["loss"], rel_tol=1e-6)
    claims = {c["id"]: c for c in res["claims"]}
    for cid in ("merged_beats_public", "optout_restores_public", "optout_leaves_others", "merged_beats_btm",
                "merged_beats_moe", "topk_helps", "extraction", "merged_keeps_public", "merged_near_oracle",
                "merged_routes_own"):
        assert claims[cid]["verdict"] in ("supported", "refuted", "inconclusive"), claims[cid]
    audited = [a for a in res["audit"] if not a.get("control")]
    assert {a["model"] for a in audited} == {"public", "dense", "merged"}
    assert {a["domain"] for a in audited} == set(owners)
    assert all(a["n_docs"] > 0 for a in res["audit"])
    # the audit's positive control ran, and every routed model has a routing table per domain
    assert {a["control"] for a in res["audit"] if a.get("control")} == {"memorised", "unseen"}
    assert set(res["routing"]["merged"]) == {pub, *owners}
    assert all("flops_per_token" in res["configs"][c] for c in res["losses"])
    # oracle routing on the merge as the owners made it is each owner's 2-expert model on its own domain
    for d in owners:
        assert math.isclose(res["losses"]["oracle"][d]["loss"], res["losses"][f"owner:{d}"][d]["loss"], rel_tol=1e-5)
    assert not res["baseline_errors"]
    assert os.path.getsize(run_dir / "losses.png") > 5000
    for text in ("held-out loss", "Claims", "Extraction audit", "Corpora"):
        assert text in r.stdout
    # data locality: each owner's processes were given only that owner's data directory
    for d in owners:
        for stage in ("init-router", "train-expert", "fed"):
            cmdline = open(run_dir / "logs" / f"{stage}-{d}.log").readline()
            assert f"data/{d}" in cmdline.replace(os.sep, "/")
            for other in [pub, "joint"] + [o for o in owners if o != d]:
                assert f"data/{other}" not in cmdline.replace(os.sep, "/"), (stage, d, cmdline)
    # proxy selection: the owner's process reads its own documents and the public pool only
    for d in owners:
        cmdline = open(run_dir / "logs" / f"proxy-{d}.log").readline().replace(os.sep, "/")
        assert f"/{d}/train.jsonl" in cmdline and f"/{pub}/pool.jsonl" in cmdline
        assert not any(f"/{o}/" in cmdline for o in owners if o != d), cmdline
    # opt-out inference on the merged model
    merged = str(run_dir / "ckpt" / "merged")
    g = subprocess.run([sys.executable, "-m", "flexmoe_training.cli", "generate", "--model", merged,
                        "--deny", owners[0], "--max-new-tokens", "16", "def main("],
                       env=env, capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr[-3000:]
    rows = _usage_rows(g.stdout)
    assert rows[owners[0]] == ("NO", 0) and sum(n for _, n in rows.values()) > 0
