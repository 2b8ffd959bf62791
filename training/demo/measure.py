"""The demo's measurements on the finished checkpoints: held-out loss of every model and setting
(:func:`evaluate_all`) and the training-data extraction audit (:func:`audit_all`)."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, List, Sequence

__all__ = ["audit_all", "evaluate_all", "load_model"]


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
    """Held-out losses of every model / setting evaluated so far, on the same windows per domain."""

    def __init__(self, windows: Dict[str, "torch.Tensor"], log) -> None:
        self.windows, self.log = windows, log
        self.domains = list(windows)
        self.losses: Dict[str, Dict[str, dict]] = {}
        self.configs: Dict[str, dict] = {}
        self.lp_cache: Dict[str, Dict[str, "torch.Tensor"]] = {}

    def run(self, name, model, kind, label, allowed=None, keep=False) -> None:
        """Score ``model`` (with ``allowed`` experts) on every domain; ``keep`` keeps the log-probs (BTM)."""
        from .evaluate import summarise, target_logprobs

        t = time.time()
        row, lps = {}, {}
        for d in self.domains:
            lp = target_logprobs(model, self.windows[d], allowed_experts=allowed)
            row[d] = summarise(lp)
            if keep:
                lps[d] = lp
        self.losses[name] = row
        self.configs[name] = {"kind": kind, "label": label, "allowed": allowed}
        if keep:
            self.lp_cache[name] = lps
        self.log(f"   {label:34s} " + "  ".join(f"{d} {row[d]['loss']:.3f}" for d in self.domains)
                 + f"  ({time.time() - t:.1f} s)")

    def btm(self, owners: Sequence[str]) -> None:
        """BTM ensembles of the public model and the dense-on-owner members (prior and uniform weights)."""
        import torch

        from .evaluate import ensemble_logprobs, summarise

        for w in ("prior", "uniform"):
            row = {}
            for d in self.domains:
                members = torch.stack([self.lp_cache["public"][d]] + [self.lp_cache[f"dense:{o}"][d] for o in owners])
                row[d] = summarise(ensemble_logprobs(members, w))
            self.losses[f"btm-{w}"] = row
            label = f"BTM ensemble ({'prefix-likelihood' if w == 'prior' else 'uniform'} weights)"
            self.configs[f"btm-{w}"] = {"kind": "btm", "label": label}
            self.log(f"   {label:34s} " + "  ".join(f"{d} {row[d]['loss']:.3f}" for d in self.domains))


def _score_merged(scores: _Scores, path: str, settings, owners: Sequence[str], K: int) -> List[str]:
    """The merged model at top-k ``K``, with each owner opted out, and at every top-k; returns its expert names."""
    merged = load_model(path, settings)
    names = list(merged.expert_names)
    merged.set_top_k(K)
    scores.run("merged", merged, "merged", f"merged, all {len(names)} experts (k={K})")
    for d in owners:
        if d not in names:
            scores.log(f"   merged model has no expert named {d!r} (experts {names}); opt-out of {d} skipped")
            continue
        allowed = [n for n in names if n != d]
        k = min(K, len(allowed))
        merged.set_top_k(k)
        scores.run(f"optout:{d}", merged, "optout", f"merged without {d} (k={k})", allowed=allowed)
    for k in range(1, len(names) + 1):
        merged.set_top_k(k)
        scores.run(f"topk:{k}", merged, "topk", f"merged, top-k={k}")
    return names


def evaluate_all(settings, run_dir: str, corpus_dir: str, manifest: dict, tok, K: int, log) -> dict:
    """Held-out loss per domain for every model / setting; returns the results dict for the report."""
    public_dom, owners = manifest["public"], manifest["owners"]
    domains = [public_dom] + owners
    windows = _test_windows(settings, corpus_dir, domains, tok)
    log("   held-out windows: " + ", ".join(f"{d} {w.shape[0]}x{w.shape[1]}" for d, w in windows.items()))
    ck = lambda name: os.path.join(run_dir, "ckpt", name)  # noqa: E731
    scores = _Scores(windows, log)
    scores.run("public", load_model(ck("public"), settings), "public", "public model", keep=True)
    for d in owners:
        scores.run(f"owner:{d}", load_model(ck(f"expert-{d}"), settings), "owner", f"owner {d}: 2-expert model")
    names = _score_merged(scores, ck("merged"), settings, owners, K)
    # baselines
    if all(os.path.isfile(os.path.join(ck(f"dense-{d}"), "run.json")) for d in owners):
        for d in owners:
            scores.run(f"dense:{d}", load_model(ck(f"dense-{d}"), settings), "dense",
                       f"dense continued on {d} (BTM member)", keep=True)
        scores.btm(owners)
    if os.path.isfile(os.path.join(ck("moe"), "run.json")):
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
        "corpora": {"dir": corpus_dir, "domains": manifest["domains"], "skipped": manifest.get("skipped", {})},
        "settings": dataclasses.asdict(settings),
        "eval_windows": {d: list(w.shape) for d, w in windows.items()},
    }


def audit_all(settings, run_dir: str, corpus_dir: str, owners: Sequence[str], tok, K: int, log) -> List[dict]:
    """Extraction audit of public, dense-on-owner and merged models on each owner's training documents."""
    from .audit import audit_extraction, select_audit_documents
    from .corpora import read_documents

    ck = lambda name: os.path.join(run_dir, "ckpt", name)  # noqa: E731
    docs = {}
    for d in owners:
        tr = read_documents(os.path.join(corpus_dir, d, "train.jsonl"))
        toks = [tok.encode(x.text) for x in tr]
        idx = select_audit_documents(toks, [x.id for x in tr], settings.audit_docs, settings.audit_prefix,
                                     settings.audit_gen, seed=settings.seed)
        docs[d] = [toks[i] for i in idx]
    out: List[dict] = []
    targets = [("public", lambda d: ck("public")), ("dense", lambda d: ck(f"dense-{d}")), ("merged", lambda d: ck("merged"))]
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
                                 threshold=settings.audit_threshold, prompt_prefix=[tok.eos_token_id])
            j = r.to_json()
            if r.example:
                j["example"] = {"similarity": r.example["similarity"],
                                "prefix": tok.decode(r.example["prefix"]),
                                "generated": tok.decode(r.example["generated"]),
                                "truth": tok.decode(r.example["truth"])}
            out.append(j)
            log(f"   audit {model_name:7s} on {d:10s}: {r.n_extracted}/{r.n_docs} extracted, "
                f"mean similarity {r.mean_similarity:.3f} ({time.time() - t:.1f} s)")
    return out
