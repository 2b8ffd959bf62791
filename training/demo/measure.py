"""The demo's measurements on the finished checkpoints: held-out loss of every model and setting
(:func:`evaluate_all`), routing tables, and the training-data extraction audit with its positive
control (:func:`audit_all`).

Rows (config names, kinds in brackets): ``public`` [public]; ``owner:<d>`` [owner, the 2-expert
model of owner d]; ``dense:<d>`` [dense, BTM member d]; ``merged`` [merged, all experts at the
run's top-k; router-tuned when the run tuned the router]; ``merged-untuned`` [untuned, the merge
before router tuning, when there is one]; ``oracle`` [oracle, each owner domain restricted to
{public, its own expert} at top-2, the public domain to the public expert]; ``optout:<d>``
[optout]; ``topk:<k>`` [topk]; ``btm-top2`` [btm, the public model and the dense
members, the 2 most likely on a 32-token prefix]; ``btm-owners-top2`` [btm, the same over the
owners' 2-expert models and the public model]; ``moe`` [moe, the joint MoE]. Every row's config
records its inference FLOPs per token (forward only, :func:`~flexmoe_training.flops.flops_per_token`
``convention="inference"``).

Legend: W windows, S window length, P scoring prefix, E experts, K top-k, L layers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["audit_all", "evaluate_all", "load_model", "inference_flops"]


def _read_json(path: str) -> dict:
    """The JSON object in ``path``; {} when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load_model(path: str, settings):
    """A checkpoint for evaluation on the demo's device (fp32 on CPU, ``settings.dtype`` on GPU), in eval mode."""
    import torch
    from flexmoe_kernels.models import FlexOlmoForCausalLM

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype]
    if device == "cpu":
        dtype = torch.float32
    m = FlexOlmoForCausalLM.from_pretrained(path, dtype=dtype, device=device)
    m.eval()
    return m


def inference_flops(model_config, seq_len: int) -> float:
    """Forward FLOPs per token of a model at its current top-k (the one formula, training/flops.py)."""
    from ..flops import flops_per_token

    return flops_per_token(model_config, int(seq_len), convention="inference")


def _test_windows(settings, corpus_dir, domains, tok):
    from .corpora import read_documents
    from .evaluate import make_windows

    out = {}
    for d in domains:
        docs = read_documents(os.path.join(corpus_dir, d, "test.jsonl"))
        out[d] = make_windows([tok.encode(x.text) for x in docs], settings.seq_len, settings.eval_tokens,
                              tok.eos_token_id)
    return out


class _Scores:
    """Held-out losses of every model / setting evaluated so far, on the same windows and the same
    scored token range (tokens P .. S-1 of each window) per domain."""

    def __init__(self, windows: Dict[str, "torch.Tensor"], prefix_len: int, seq_len: int, log) -> None:
        self.windows, self.prefix_len, self.seq_len, self.log = windows, prefix_len, seq_len, log
        self.domains = list(windows)
        self.losses: Dict[str, Dict[str, dict]] = {}
        self.configs: Dict[str, dict] = {}
        self.routing: Dict[str, Dict[str, dict]] = {}
        self.lp_cache: Dict[str, Dict[str, "torch.Tensor"]] = {}

    def _log_row(self, label: str, row: dict, t: Optional[float] = None) -> None:
        self.log(f"   {label:34s} " + "  ".join(f"{d} {r['loss']:.3f}" for d, r in row.items())
                 + ("" if t is None else f"  ({time.time() - t:.1f} s)"))

    def run(self, name, model, kind, label, allowed=None, keep=False, routing=False, top_k=None) -> None:
        """Score ``model`` on every domain.

        ``allowed``: None (all experts), a list of expert names for every domain, or a dict
        ``{domain: names}``; ``top_k`` a dict ``{domain: k}`` to set per domain (the model's
        current top-k otherwise). ``keep`` keeps the (W, S-1) log-probs (BTM members);
        ``routing`` records the routing table per domain. The config's ``flops_per_token`` is
        the largest over the domains' top-k.
        """
        from .evaluate import scored, summarise, target_logprobs
        from .inference import RoutingStats

        t = time.time()
        row, lps, flops = {}, {}, 0.0
        for d in self.domains:
            if top_k is not None:
                model.set_top_k(top_k[d])
            a = allowed.get(d) if isinstance(allowed, dict) else allowed
            stats = RoutingStats(model.expert_names) if routing else None
            lp = target_logprobs(model, self.windows[d], allowed_experts=a, routing=stats)
            row[d] = summarise(scored(lp, self.prefix_len))
            flops = max(flops, inference_flops(model.config, self.seq_len))
            if keep:
                lps[d] = lp
            if stats is not None:
                self.routing.setdefault(name, {})[d] = stats.table()
        self.losses[name] = row
        self.configs[name] = {"kind": kind, "label": label, "allowed": allowed, "flops_per_token": flops}
        if keep:
            self.lp_cache[name] = lps
        self._log_row(label, row, t)

    def btm(self, name: str, label: str, members: Sequence[str], top: int = 2) -> None:
        """BTM output ensemble of the kept rows ``members``: per window the ``top`` members most
        likely on its first P tokens, weights fixed from those (:func:`evaluate.prefix_ensemble_logprobs`).
        Records per domain each member's share of windows that chose it, and FLOPs per token
        as the ``top`` most expensive members' (the prefix runs every member, once per window)."""
        import torch

        from .evaluate import prefix_ensemble_logprobs, summarise

        row, chosen = {}, {}
        for d in self.domains:
            mix, w_MW = prefix_ensemble_logprobs(torch.stack([self.lp_cache[m][d] for m in members]),
                                                 self.prefix_len, top)
            row[d] = summarise(mix)
            chosen[d] = {m: round(float((w_MW[i] > 0).float().mean()), 4) for i, m in enumerate(members)}
        self.losses[name] = row
        fl = sorted((self.configs[m]["flops_per_token"] for m in members), reverse=True)
        self.configs[name] = {"kind": "btm", "label": label, "members": list(members), "top": top,
                              "prefix_len": self.prefix_len, "flops_per_token": sum(fl[:top]),
                              "windows_choosing_member": chosen}
        self._log_row(label, row)


def _score_merged(scores: _Scores, ck, settings, owners: Sequence[str], K: int) -> List[str]:
    """The merged model (``ck("merged")``) at top-k ``K`` with its routing table, with each owner
    opted out and at every top-k; the merge before router tuning (``ck("merged-untuned")``, when the
    run tuned the router) at ``K`` with its routing table; and oracle routing. Returns the expert names.

    Oracle routing restricts each owner domain to {public, its own expert} at top-2 and the public
    domain to the public expert; on the merge as the owners made it (before router tuning), it is
    exactly each owner's 2-expert model on its own domain (same router rows and biases).
    """
    merged = load_model(ck("merged"), settings)
    names = list(merged.expert_names)
    untuned = os.path.isfile(os.path.join(ck("merged-untuned"), "run.json"))
    merged.set_top_k(K)
    how = ""
    if untuned:  # the router was tuned; the owners' check decided which router ckpt/merged holds
        rec = _read_json(os.path.join(os.path.dirname(os.path.dirname(ck("merged"))), "tuning.json"))
        kept = rec.get("keep_tuned", (rec.get("owner_check") or {}).get("keep_tuned", True))
        how = ", router-tuned" if kept else ", untuned router (the owners' validation rejected tuning)"
    scores.run("merged", merged, "merged", f"merged{how}, all {len(names)} experts (k={K})", routing=True)
    for d in owners:
        if d not in names:
            scores.log(f"   merged model has no expert named {d!r} (experts {names}); opt-out of {d} skipped")
            continue
        allowed = [n for n in names if n != d]
        k = min(K, len(allowed))
        merged.set_top_k(k)
        scores.run(f"optout:{d}", merged, "optout", f"merged without {d} (k={k})", allowed=allowed)
    for k in range(1, len(names) + 1):
        if k == K:  # the same numbers as the "merged" row, by construction
            scores.losses[f"topk:{k}"] = scores.losses["merged"]
            scores.configs[f"topk:{k}"] = dict(scores.configs["merged"], kind="topk", label=f"merged, top-k={k}")
            continue
        merged.set_top_k(k)
        scores.run(f"topk:{k}", merged, "topk", f"merged, top-k={k}")
    if untuned:
        merged = load_model(ck("merged-untuned"), settings)
        merged.set_top_k(K)
        scores.run("merged-untuned", merged, "untuned", f"merged before router tuning (k={K})", routing=True)
    own = {d: (["public", d] if d in names else list(names)) for d in owners}
    own[scores.domains[0]] = ["public"]  # the public domain: the public expert alone
    scores.run("oracle", merged, "oracle", "merged, oracle routing ({public, own}, k=2)", allowed=own,
               top_k={d: min(len(a), 2) for d, a in own.items()})
    return names


def evaluate_all(settings, run_dir: str, corpus_dir: str, manifest: dict, tok, K: int, log) -> dict:
    """Held-out loss per domain for every model / setting; returns the results dict for the report."""
    public_dom, owners = manifest["public"], manifest["owners"]
    domains = [public_dom] + owners
    windows = _test_windows(settings, corpus_dir, domains, tok)
    P = getattr(settings, "eval_prefix", 32)
    log("   held-out windows: " + ", ".join(f"{d} {w.shape[0]}x{w.shape[1]}" for d, w in windows.items())
        + f"; every row scored on tokens {P}..{settings.seq_len - 1} of each window")
    ck = lambda name: os.path.join(run_dir, "ckpt", name)  # noqa: E731
    have = lambda name: os.path.isfile(os.path.join(ck(name), "run.json"))  # noqa: E731
    scores = _Scores(windows, P, settings.seq_len, log)
    scores.run("public", load_model(ck("public"), settings), "public", "public model", keep=True)
    for d in owners:
        scores.run(f"owner:{d}", load_model(ck(f"expert-{d}"), settings), "owner", f"owner {d}: 2-expert model",
                   keep=True, routing=True)
    names = _score_merged(scores, ck, settings, owners, K)
    if all(have(f"dense-{d}") for d in owners):
        for d in owners:
            scores.run(f"dense:{d}", load_model(ck(f"dense-{d}"), settings), "dense",
                       f"dense continued on {d} (BTM member)", keep=True)
        scores.btm("btm-top2", f"BTM top-2 of public + dense members ({P}-token prefix)",
                   ["public"] + [f"dense:{d}" for d in owners])
    scores.btm("btm-owners-top2", f"BTM top-2 of public + owners' 2-expert models ({P}-token prefix)",
               ["public"] + [f"owner:{d}" for d in owners])
    if have("moe"):
        m = load_model(ck("moe"), settings)
        scores.run("moe", m, "moe", f"standard MoE, joint data (k={m.config.num_experts_per_tok})")
        del m
    return {
        "public_domain": public_dom,
        "owner_domains": owners,
        "expert_names": names,
        "top_k": K,
        "losses": scores.losses,
        "configs": scores.configs,
        "routing": scores.routing,
        "eval_prefix": P,
        "corpora": {"dir": corpus_dir, "domains": manifest["domains"], "skipped": manifest.get("skipped", {})},
        "settings": dataclasses.asdict(settings),
        "eval_windows": {d: list(w.shape) for d, w in windows.items()},
    }


def _audit_documents(settings, corpus_dir: str, owners: Sequence[str], tok) -> Dict[str, list]:
    """Each owner's audited training documents (token ids), chosen by :func:`audit.select_audit_documents`."""
    from .audit import select_audit_documents
    from .corpora import read_documents

    docs = {}
    for d in owners:
        tr = read_documents(os.path.join(corpus_dir, d, "train.jsonl"))
        toks = [tok.encode(x.text) for x in tr]
        idx = select_audit_documents(toks, [x.id for x in tr], settings.audit_docs, settings.audit_prefix,
                                     settings.audit_gen, seed=settings.seed)
        docs[d] = [toks[i] for i in idx]
    return docs


def _audit_json(r, tok) -> dict:
    """An :class:`audit.AuditResult` as JSON, its most similar continuation decoded."""
    j = r.to_json()
    if r.example:
        j["example"] = {"similarity": r.example["similarity"], "prefix": tok.decode(r.example["prefix"]),
                        "generated": tok.decode(r.example["generated"]), "truth": tok.decode(r.example["truth"])}
    return j


def _positive_control(settings, docs: Sequence[Sequence[int]], domain: str, tok, log) -> List[dict]:
    """The audit's positive control on ``docs`` (an owner's audited documents), see
    :func:`audit.positive_control`; [] when ``settings.audit_control_docs`` is 0."""
    from .audit import positive_control

    n = min(int(getattr(settings, "audit_control_docs", 6)), len(docs))
    if n < 1:
        return []
    t = time.time()
    res = positive_control(docs[:n], docs[n:2 * n], tok.vocab_size, eos_token_id=tok.eos_token_id, domain=domain,
                           prefix_len=settings.audit_prefix, gen_len=settings.audit_gen,
                           threshold=settings.audit_threshold, seed=settings.seed)
    out = [_audit_json(r, tok) for r in res]
    for r in res:
        log(f"   audit {r.model}: {r.n_extracted}/{r.n_docs} extracted, mean similarity {r.mean_similarity:.3f}")
    log(f"   positive control: {time.time() - t:.1f} s")
    return out


def audit_all(settings, run_dir: str, corpus_dir: str, owners: Sequence[str], tok, K: int, log) -> List[dict]:
    """Extraction audit of public, dense-on-owner and merged models on each owner's training
    documents, then the positive control (entries with a ``control`` key) on the first owner's."""
    from .audit import audit_extraction

    ck = lambda name: os.path.join(run_dir, "ckpt", name)  # noqa: E731
    docs = _audit_documents(settings, corpus_dir, owners, tok)
    out: List[dict] = []
    targets = [("public", lambda d: ck("public")), ("dense", lambda d: ck(f"dense-{d}")),
               ("merged", lambda d: ck("merged"))]
    for model_name, path_of in targets:
        cache = {}
        for d in owners:
            path = path_of(d)
            if not os.path.isfile(os.path.join(path, "run.json")):
                log(f"   audit: {path} missing, {model_name} skipped for {d}")
                continue
            if path not in cache:
                cache.clear()
                m = load_model(path, settings)
                if model_name == "merged":
                    m.set_top_k(K)
                cache[path] = m
            t = time.time()
            r = audit_extraction(cache[path], docs[d], model_name=model_name, domain=d,
                                 prefix_len=settings.audit_prefix, gen_len=settings.audit_gen,
                                 threshold=settings.audit_threshold, prompt_prefix=[tok.eos_token_id],
                                 batch_size=64 if cache[path].device.type == "cuda" else 16)
            out.append(_audit_json(r, tok))
            log(f"   audit {model_name:7s} on {d:10s}: {r.n_extracted}/{r.n_docs} extracted, "
                f"mean similarity {r.mean_similarity:.3f} ({time.time() - t:.1f} s)")
    if owners and docs.get(owners[0]):
        out += _positive_control(settings, docs[owners[0]], owners[0], tok, log)
    return out
