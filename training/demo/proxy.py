"""Owner-side proxy selection (FlexOlmo's router-tuning data): which *public* documents look like my data.

Each data owner runs this alone, in its own process, with its own documents and the public corpus
(which everybody has). It trains a small classifier of "my documents" against "public documents"
and publishes only the ids of the public documents the classifier scores highest: a text file of
public document ids, one a line. No owner text, no owner document id and no score leaves the
owner; the ids name documents everybody already has. ``flexmoe tune-router`` then trains the
merged model's router on the union of every owner's proxies plus a public sample.

Classifier: logistic regression (L2-regularised, full-batch gradient descent, numpy) on hashed
byte n-gram features (n = 1..4, :data:`NUM_FEATURES` buckets, log(1 + count), L2-normalised per
document). Public documents are scored *out of fold*: the public corpus is split in two halves by
document id, and each half is scored by a classifier trained against the other half, so a public
document is never scored by a classifier that saw it as a negative.

Command line (what the demo runs per owner)::

    python -m flexmoe_training.demo.proxy --owner OWNER/train.jsonl --public PUBLIC/train.jsonl \\
        --out PROXY.ids --num-docs 24

Legend: N documents, H hashed features.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import List, Sequence

import numpy as np

__all__ = ["NUM_FEATURES", "features", "fit_logistic", "read_proxy_ids", "score_public", "select_proxies",
           "tuning_documents", "tuning_split", "main"]

NUM_FEATURES = 1 << 15
_NGRAMS = (1, 2, 3, 4)


def features(texts: Sequence[str], num_features: int = NUM_FEATURES) -> np.ndarray:
    """(N, H) float32: hashed byte n-gram counts (n = 1..4), log(1 + count), each row L2-normalised."""
    X = np.zeros((len(texts), num_features), dtype=np.float32)
    for i, t in enumerate(texts):
        b = np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        for n in _NGRAMS:
            if len(b) < n:
                continue
            h = np.zeros(len(b) - n + 1, dtype=np.int64)
            for j in range(n):  # a polynomial hash of the n bytes, seeded by n
                h = (h * 1_000_003 + b[j:len(b) - n + 1 + j] + 7919 * n) % 2_147_483_647
            X[i] += np.bincount(h % num_features, minlength=num_features).astype(np.float32)
    X = np.log1p(X)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 300, lr: float = 2.0) -> tuple:
    """(w (H,), b): logistic regression of ``y`` in {0, 1} on ``X`` (N, H), classes weighted equally."""
    if X.shape[0] != y.shape[0] or not ((y == 0).any() and (y == 1).any()):
        raise ValueError(f"X ({X.shape}) and y ({y.shape}) need matching rows and both classes")
    wt = np.where(y == 1, 0.5 / (y == 1).sum(), 0.5 / (y == 0).sum()).astype(np.float32)
    w = np.zeros(X.shape[1], dtype=np.float32)
    b = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(X @ w + b)))
        g = wt * (p - y)
        w -= lr * (X.T @ g + l2 * w)
        b -= lr * float(g.sum())
    return w, b


def score_public(owner_texts: Sequence[str], public_texts: Sequence[str], public_ids: Sequence[str]) -> np.ndarray:
    """(N_public,) out-of-fold classifier logits "owner-like" of every public document."""
    if not owner_texts or len(public_texts) < 2:
        raise ValueError("need owner documents and at least two public documents")
    Xo, Xp = features(owner_texts), features(public_texts)
    fold = np.array([int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) % 2 for i in public_ids])
    if fold.min() == fold.max():  # every id hashed into one half: split by position instead
        fold = np.arange(len(public_ids)) % 2
    scores = np.zeros(len(public_texts), dtype=np.float32)
    for f in (0, 1):
        neg = Xp[fold != f]
        X = np.concatenate([Xo, neg])
        y = np.concatenate([np.ones(len(Xo)), np.zeros(len(neg))]).astype(np.float32)
        w, b = fit_logistic(X, y)
        scores[fold == f] = Xp[fold == f] @ w + b
    return scores


def select_proxies(owner_texts: Sequence[str], public_texts: Sequence[str], public_ids: Sequence[str],
                   num_docs: int) -> List[str]:
    """The ids of the ``num_docs`` public documents scored most owner-like (best first)."""
    if num_docs <= 0:
        raise ValueError(f"num_docs must be positive, got {num_docs}")
    s = score_public(owner_texts, public_texts, public_ids)
    order = np.argsort(-s, kind="stable")[:num_docs]
    return [public_ids[i] for i in order]


def read_proxy_ids(path: str) -> List[str]:
    """The public document ids of a proxy file (one a line)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def tuning_documents(public_jsonl: str, proxy_files: Sequence[str], num_public: int, seed: int = 0) -> list:
    """The router-tuning data: the union of the proxies' public documents (each once) plus
    ``num_public`` other public documents drawn with ``seed``; sorted by id. ValueError naming the
    file when a proxy lists an id that is not in the public corpus."""
    train, val = tuning_split(public_jsonl, proxy_files, num_public, seed, val_fraction=0.0)
    return train


def tuning_split(public_jsonl: str, proxy_files: Sequence[str], num_public: int, seed: int = 0,
                 val_fraction: float = 0.25) -> tuple:
    """``(train, validation)`` documents of router tuning, disjoint, each sorted by id.

    Together they are :func:`tuning_documents`' set. ``val_fraction`` of each owner's proxies
    (at least one of an owner's proxies listing two or more, never all of them) and of the public
    sample go to validation, drawn with ``seed``: so every owner's choice is represented in the
    validation that decides whether the tuned router is kept (``tune-router --val-data``).
    """
    import random

    from .corpora import read_documents

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    public = {d.id: d for d in read_documents(public_jsonl)}
    groups = []
    for path in proxy_files:
        ids = list(dict.fromkeys(read_proxy_ids(path)))
        bad = [i for i in ids if i not in public]
        if bad:
            raise ValueError(f"proxy file {path!r} lists ids that are not public documents: {bad[:3]}")
        groups.append(ids)
    proxies = {i for g in groups for i in g}
    rest = sorted(set(public) - proxies)
    groups.append(random.Random(f"{seed}:tune").sample(rest, min(max(0, num_public), len(rest))))
    val = set()
    for n, ids in enumerate(groups):
        k = 0 if val_fraction == 0 or len(ids) < 2 else min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        val.update(random.Random(f"{seed}:val:{n}").sample(sorted(ids), k))
    chosen = {i for g in groups for i in g}
    return [public[i] for i in sorted(chosen - val)], [public[i] for i in sorted(val)]


def _read_jsonl(path: str) -> tuple:
    ids, texts = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                ids.append(d["id"])
                texts.append(d["text"])
    return ids, texts


def main(argv=None) -> int:
    """Command line: select an owner's proxies and write their public ids to ``--out``."""
    p = argparse.ArgumentParser(prog="python -m flexmoe_training.demo.proxy", description=__doc__.split("\n")[0])
    p.add_argument("--owner", required=True, help="the owner's documents (jsonl with 'id', 'text')")
    p.add_argument("--public", required=True, help="the public corpus's documents (jsonl with 'id', 'text')")
    p.add_argument("--out", required=True, help="file of selected public document ids, one a line")
    p.add_argument("--num-docs", type=int, required=True, help="public documents to select")
    a = p.parse_args(argv)
    from flexmoe_kernels.utils.fs import write_text_atomic

    _, owner_texts = _read_jsonl(a.owner)
    pub_ids, pub_texts = _read_jsonl(a.public)
    ids = select_proxies(owner_texts, pub_texts, pub_ids, min(a.num_docs, len(pub_ids)))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_text_atomic(a.out, "".join(i + "\n" for i in ids))
    print(f"proxy: {len(ids)} of {len(pub_ids)} public documents selected from a classifier of "
          f"{len(owner_texts)} owner documents against the public corpus -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
