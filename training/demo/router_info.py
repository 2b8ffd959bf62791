"""What the demo reports about its routers: ``results["router"]`` (see :func:`router_summary`).

Read from the run's files after training: the router-init files (``routers/<owner>.run.json``),
the owners' proxy files (``proxies/<owner>.ids``), the tuning data's ``meta.json`` and the
checkpoints' ``gate.expert_bias`` tensors (L layers, E experts).
"""
from __future__ import annotations

import collections
import json
import os
from typing import Dict, List, Optional

__all__ = ["expert_biases", "router_summary"]


def expert_biases(ckpt: str) -> Optional[Dict[str, List[float]]]:
    """``{expert name: [b of layer 0, ..., layer L-1]}`` as stored (the model applies ``min(b, 0)``);
    None when the checkpoint is missing or has no bias."""
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        return None
    from flexmoe_training.modeling import load_checkpoint

    cfg, sd = load_checkpoint(ckpt, "checkpoint")
    names = list(cfg.expert_names or [str(e) for e in range(cfg.num_experts)])
    keys = [f"model.layers.{i}.mlp.gate.expert_bias" for i in range(cfg.num_hidden_layers)]
    if not all(k in sd for k in keys):
        return None
    return {n: [round(float(sd[k][e]), 4) for k in keys] for e, n in enumerate(names)}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _proxies(run_dir: str, corpus_dir: str, public: str, owners: List[str]) -> dict:
    """Per owner: the public ids it published and their kinds of text (the public corpus's ``kind``)."""
    from .corpora import proxy_pool, read_documents
    from .proxy import read_proxy_ids

    kinds = {d.id: d.kind or public for d in read_documents(proxy_pool(corpus_dir, public))}
    out = {}
    for d in owners:
        path = os.path.join(run_dir, "proxies", f"{d}.ids")
        if not os.path.isfile(path):
            continue
        ids = read_proxy_ids(path)
        out[d] = {"num_docs": len(ids), "kinds": dict(collections.Counter(kinds.get(i, "?") for i in ids)),
                  "ids": ids}
    return out


def router_summary(settings, run_dir: str, corpus_dir: str, public: str, owners: List[str], embedder: str,
                   embedder_note: str, losses: dict) -> dict:
    """``results["router"]``: router init, negative bias, proxies and router tuning of this run.

    Keys: ``embedder`` ("minilm" / "hidden"), ``embedder_note`` (why it is not the setting, or ""),
    ``projection`` (how MiniLM vectors reached the model width), ``bias_init``, ``bias``
    (``{"owners": {owner: [b per layer] after the owner's training}, "merged_untuned" /
    "merged": {expert: [b per layer]}}`` as stored; applied as min(b, 0)), ``proxies`` (per owner:
    num_docs, kinds, ids), ``tuning`` (settings, docs and tokens of the tuning data, or None when
    off) and ``owner_avg_loss`` (mean owner-domain loss before / after tuning) and
    ``public_loss`` (the public domain's, before / after).
    """
    ck = lambda name: os.path.join(run_dir, "ckpt", name)  # noqa: E731
    inits = {d: _read_json(os.path.join(run_dir, "routers", f"{d}.run.json")) for d in owners}
    owner_bias = {}
    for d in owners:
        b = expert_biases(ck(f"expert-{d}"))
        if b is not None and d in b:
            owner_bias[d] = b[d]
    tuned = settings.router_tuning
    out = {
        "embedder": embedder,
        "embedder_note": embedder_note,
        "projection": sorted({i.get("projection", "none") for i in inits.values()} or {"none"}),
        "init_docs": {d: i.get("num_docs") for d, i in inits.items()},
        "bias_init": settings.bias_init,
        "bias": {"owners": owner_bias, "merged_untuned": expert_biases(ck("merged-untuned")) if tuned else None,
                 "merged": expert_biases(ck("merged"))},
        "proxies": _proxies(run_dir, corpus_dir, public, owners) if tuned else {},
        "tuning": None,
    }
    if tuned and settings.tune_method == "federated":
        fed = _read_json(os.path.join(run_dir, "tuning.json")).get("federated") or {}
        out["tuning"] = {"method": "federated", "optimizer": fed.get("optimizer"), "rounds": fed.get("rounds"),
                         "local_steps": fed.get("local_steps"), "lr": fed.get("lr"), "local_lr": fed.get("local_lr"),
                         "weight_decay": fed.get("weight_decay"), "parties": fed.get("parties"),
                         "kept_round": fed.get("round")}
    elif tuned:
        meta = _read_json(os.path.join(run_dir, "data", "tune", "meta.json"))
        run = _read_json(os.path.join(ck("merged-tuned"), "run.json"))
        out["tuning"] = {"method": "proxies", "steps": settings.tune_steps, "lr": settings.tune_lr,
                         "weight_decay": settings.tune_weight_decay,
                         "top_k_train": run.get("top_k_train"), "public_sample_docs": settings.tune_public_docs,
                         "docs": (meta.get("train_docs") or 0) + (meta.get("val_docs") or 0),
                         "train_tokens": meta.get("train_tokens")}
    if tuned:
        def avg(cfg):
            v = [losses.get(cfg, {}).get(d, {}).get("loss") for d in owners]
            return None if any(x is None for x in v) else sum(v) / len(v)

        out["owner_avg_loss"] = {"before_tuning": avg("merged-untuned"), "after_tuning": avg("merged")}
        out["public_loss"] = {k: losses.get(c, {}).get(public, {}).get("loss")
                              for k, c in (("public_model", "public"), ("before_tuning", "merged-untuned"),
                                           ("after_tuning", "merged"))}
    return out
