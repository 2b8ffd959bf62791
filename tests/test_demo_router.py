"""Tests of the demo's router pieces: the broad public corpus's file split, owner-side proxy
selection (only public ids leave the owner), the tuning data, the fixed MiniLM projection and the
negative bias's start value."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from test_demo import _fake_source, _paragraph_texts, _subprocess_env, SMALL  # noqa: F401  (sets up the import)

from flexmoe_training.demo import corpora, proxy  # noqa: E402


def _code_texts(seed: int, n: int) -> list:
    """Python-looking texts (a different byte distribution from the word paragraphs)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lines = []
        for _ in range(30):
            name = "".join(rng.choice("abcdefgh_") for _ in range(rng.randint(3, 9)))
            lines.append(f"    def {name}(self, x{rng.randint(0, 9)}):\n        return self.{name}_[{rng.randint(0, 99)}] + x")
        out.append("\n".join(lines))
    return out


def _jsonl(path, docs) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in docs:
            f.write(json.dumps({"id": i, "origin": "x", "text": t}) + "\n")


# ============================================================================ proxies
def test_proxy_file_holds_only_public_ids(tmp_path):
    """The owner's process publishes public document ids only (no owner id, no owner text), and the
    classifier finds the public documents that look like the owner's data."""
    seed = random.randrange(1 << 30)
    owner = [(f"owner{i:03d}", t) for i, t in enumerate(_code_texts(seed, 12))]
    like = [(f"pubcode{i:03d}", t) for i, t in enumerate(_code_texts(seed + 1, 6))]
    prose = [(f"pubprose{i:03d}", t) for i, t in enumerate(_paragraph_texts(seed + 2, 30))]
    _jsonl(tmp_path / "owner.jsonl", owner)
    _jsonl(tmp_path / "public.jsonl", random.Random(seed).sample(like + prose, len(like + prose)))
    out = tmp_path / "pub" / "owner.ids"
    r = subprocess.run([sys.executable, "-m", "flexmoe_training.demo.proxy", "--owner", str(tmp_path / "owner.jsonl"),
                        "--public", str(tmp_path / "public.jsonl"), "--out", str(out), "--num-docs", "6"],
                       env=_subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    raw = out.read_text()
    ids = proxy.read_proxy_ids(str(out))
    public_ids = {i for i, _ in like + prose}
    assert raw == "".join(i + "\n" for i in ids) and len(ids) == 6 == len(set(ids))
    assert set(ids) <= public_ids  # only public ids, one a line, nothing else
    assert not any(i in raw for i, _ in owner)
    assert not any(line in raw for _, t in owner for line in t.splitlines() if len(line) > 20)
    assert set(ids) == {i for i, _ in like}  # the owner-like public documents, all of them


def test_fit_logistic_separates_and_checks_input():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    X = torch.randn(40, 8, generator=g).numpy()
    y = (X[:, 0] + 0.1 * X[:, 1] > 0).astype("float32")
    w, b = proxy.fit_logistic(X, y, l2=1e-4, steps=500, lr=1.0)
    assert (((X @ w + b) > 0) == (y == 1)).mean() >= 0.95
    with pytest.raises(ValueError, match="both classes"):
        proxy.fit_logistic(X, y * 0)


def test_tuning_documents_union_plus_sample(tmp_path):
    docs = [(f"p{i:02d}", f"public document {i} " * 20) for i in range(20)]
    _jsonl(tmp_path / "public.jsonl", docs)
    (tmp_path / "a.ids").write_text("p01\np02\n")
    (tmp_path / "b.ids").write_text("p02\np03\n")
    out = proxy.tuning_documents(str(tmp_path / "public.jsonl"), [str(tmp_path / "a.ids"), str(tmp_path / "b.ids")], 4)
    ids = [d.id for d in out]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 3 + 4 and {"p01", "p02", "p03"} <= set(ids)
    assert out == proxy.tuning_documents(str(tmp_path / "public.jsonl"),
                                         [str(tmp_path / "a.ids"), str(tmp_path / "b.ids")], 4)  # seeded
    (tmp_path / "bad.ids").write_text("p01\nsecret-owner-doc\n")
    with pytest.raises(ValueError, match="bad.ids"):
        proxy.tuning_documents(str(tmp_path / "public.jsonl"), [str(tmp_path / "bad.ids")], 0)


def test_tuning_split_holds_out_part_of_every_owners_proxies(tmp_path):
    docs = [(f"p{i:02d}", f"public document {i} " * 20) for i in range(30)]
    _jsonl(tmp_path / "public.jsonl", docs)
    (tmp_path / "a.ids").write_text("".join(f"p{i:02d}\n" for i in range(0, 8)))
    (tmp_path / "b.ids").write_text("".join(f"p{i:02d}\n" for i in range(6, 14)))
    (tmp_path / "c.ids").write_text("p20\n")                      # a single proxy stays in training
    files = [str(tmp_path / f"{n}.ids") for n in "abc"]
    train, val = proxy.tuning_split(str(tmp_path / "public.jsonl"), files, 8, seed=3, val_fraction=0.25)
    t, v = {d.id for d in train}, {d.id for d in val}
    assert not t & v
    assert t | v == {d.id for d in proxy.tuning_documents(str(tmp_path / "public.jsonl"), files, 8, seed=3)}
    for lo, hi in ((0, 8), (6, 14)):                                 # every owner is in both parts
        ids = {f"p{i:02d}" for i in range(lo, hi)}
        assert ids & v and ids & t
    assert "p20" in t and [d.id for d in val] == sorted(v)
    assert (train, val) == proxy.tuning_split(str(tmp_path / "public.jsonl"), files, 8, seed=3, val_fraction=0.25)
    with pytest.raises(ValueError, match="val_fraction"):
        proxy.tuning_split(str(tmp_path / "public.jsonl"), files, 8, val_fraction=1.0)


# ============================================================================ corpora: public / owner file split
def test_shared_sources_split_by_file_between_public_and_owner(tmp_path, monkeypatch):
    """A shared source's public part goes only to the web corpus, the rest only to owners; the web
    corpus has every kind of WEB_MIX and its composition is recorded."""
    texts = {n: _paragraph_texts(random.randrange(1 << 30), 60) for n in ("pr", "sh", "o1", "o2")}

    def shared(name):
        s = _fake_source(name, texts[name])
        return corpora.Source(name, s.description, s.find, shared=True)

    monkeypatch.setattr(corpora, "SOURCES", {"web": corpora.SOURCES["web"], "pr": _fake_source("pr", texts["pr"]),
                                             "sh": shared("sh"), "o1": _fake_source("o1", texts["o1"])})
    monkeypatch.setattr(corpora, "WEB_MIX", [("shared kind", "sh", 0.3), ("prose", "pr", 1.0)])
    spec = corpora.CorpusSpec(num_owners=2, owners=["sh", "o1"], **dict(SMALL, min_train_bytes=1000))
    d = corpora.build_corpora(str(tmp_path), spec, log=lambda s: None)
    man = corpora.load_manifest(d)
    assert man["public"] == "web" and man["owners"] == ["sh", "o1"]
    comp = man["domains"]["web"]["composition"]
    assert comp["shared kind"]["train_docs"] > 0 and comp["prose"]["train_docs"] > 0
    web = corpora.read_documents(os.path.join(d, "web", "train.jsonl"))
    pool = corpora.read_documents(corpora.proxy_pool(d, "web"))
    assert corpora.proxy_pool(d, "web").endswith("pool.jsonl") and pool
    assert not ({x.id for x in web} & {x.id for x in pool})  # the public model never trains on the pool
    assert sum(c["train_docs"] for c in comp.values()) == len(web)
    assert sum(c["pool_docs"] for c in comp.values()) == len(pool) == man["domains"]["web"]["pool_docs"]
    assert {x.kind for x in web} == {"shared kind", "prose"}
    for x in web + pool:
        assert x.kind != "shared kind" or corpora.public_part(x.origin)
    owner = corpora.read_documents(os.path.join(d, "sh", "train.jsonl"))
    assert owner and not any(corpora.public_part(x.origin) for x in owner)


# ============================================================================ router init and bias
def test_minilm_projection_fixed_and_orthogonal():
    from flexmoe_training.router_init import minilm_projection

    for D in (64, 384, 512):
        P = minilm_projection(D)
        assert P.shape == (D, 384) and torch.equal(P, minilm_projection(D))  # the same for every owner
        gram = P @ P.T if D <= 384 else P.T @ P
        torch.testing.assert_close(gram, torch.eye(min(D, 384)), atol=1e-5, rtol=0)
    v = torch.randn(2, 384, generator=torch.Generator().manual_seed(random.randrange(1 << 30)))
    P = minilm_projection(512)  # an isometry: inner products kept
    torch.testing.assert_close(P @ v[0] @ (P @ v[1]), v[0] @ v[1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="hidden_size"):
        minilm_projection(0)


def test_coupled_model_bias_starts_below_zero():
    from flexmoe_kernels.models import FlexOlmoConfig
    from flexmoe_training.modeling import coupled_source

    cfg = FlexOlmoConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=1, num_experts_per_tok=1)
    sd = {f"model.layers.{i}.mlp.gate.weight": torch.randn(1, 8) for i in range(2)}
    b = -random.uniform(0.1, 2.0)
    _, out = coupled_source(cfg, sd, "owner", bias_init=b)
    for i in range(2):
        torch.testing.assert_close(out[f"model.layers.{i}.mlp.gate.expert_bias"], torch.tensor([0.0, b]))
