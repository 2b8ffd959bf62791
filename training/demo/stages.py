"""The stages of ``flexmoe demo``, one function each, in the order :func:`pipeline.run_demo` calls them.

Each takes the :class:`~flexmoe_training.demo.pipeline.DemoContext`; a stage whose outputs exist
is skipped (``--fresh`` removes the run directory first). Training stages run the ``flexmoe``
commands as child processes (:mod:`.runner`); an owner's process gets only that owner's data.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Sequence

from flexmoe_kernels.utils.fs import atomic_directory, write_text_atomic

from .runner import StageError, cli_options, done, opt, parallel, read_run, run_cli, run_module

__all__ = ["audit", "evaluate", "flops_summary", "merge_and_baselines", "owners", "prepare", "report",
           "router_summary", "train_public"]


# ----------------------------------------------------------------------------- helpers
def _write_text_dir(text_dir: str, docs) -> None:
    """One ``.txt`` file per ``(name, text)`` document (the input format of ``flexmoe prepare-data``)."""
    with atomic_directory(text_dir, fsync=False) as tmp:  # scratch input, removed after prepare-data
        for name, text in docs:
            with open(os.path.join(tmp, f"{name}.txt"), "w", encoding="utf-8") as f:
                f.write(text)


def _data_summary(data_dir: str) -> str:
    with open(os.path.join(data_dir, "meta.json")) as f:
        m = json.load(f)
    return f"{m.get('train_docs')} docs, {m.get('train_tokens')} tokens (+{m.get('val_tokens')} validation)"


def flops_summary(run_dir: str, owners: Sequence[str]) -> dict:
    """Training FLOPs of each recipe, from the ``total_flops`` the training runs recorded."""
    ck = lambda name: os.path.join(run_dir, "ckpt", name)  # noqa: E731
    f = lambda name: float(read_run(ck(name)).get("total_flops") or 0.0)  # noqa: E731
    steps = lambda name: read_run(ck(name)).get("steps")  # noqa: E731
    have = lambda name: f(name) > 0  # noqa: E731
    return {
        "flexolmo": f("public") + sum(f(f"expert-{d}") for d in owners),
        "btm": (f("public") + sum(f(f"dense-{d}") for d in owners)) if all(have(f"dense-{d}") for d in owners) else None,
        "moe": f("moe") if have("moe") else None,
        "runs": {name: {"total_flops": f(name), "steps": steps(name)}
                 for name in ["public", "moe"] + [f"expert-{d}" for d in owners] + [f"dense-{d}" for d in owners]},
    }


def _train_flags(ctx, opts: set, steps: Optional[int], lr: Optional[float] = None) -> List[str]:
    """The shared training flags; ``steps`` None when the command derives them (FLOPs matching);
    ``lr`` None: ``settings.lr``."""
    s = ctx.settings
    dtype_flag = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}.get(s.dtype, "auto")
    warm = max(1, (steps or s.expert_steps) // 10)
    flags = opt(opts, steps=steps, warmup_steps=warm, seq_len=s.seq_len, micro_batch_size=s.batch_size, lr=lr or s.lr,
                seed=s.seed, dtype=dtype_flag, device=s.device, moe_backend=s.moe_backend,
                log_every=max(1, (steps or 100) // 40))
    return flags + (["--no-progress"] if "--no-progress" in opts and not ctx.echo_children else [])


def _raise_errors(errors: Dict[str, str]) -> None:
    if errors:
        raise StageError("; ".join(f"{k}: {v}" for k, v in errors.items()))


# ----------------------------------------------------------------------------- 1.-2. corpora and data
def _prepare_docs(ctx, name: str, docs, out: str) -> None:
    """Tokenise ``(name, text)`` documents into the data directory ``out`` (``flexmoe prepare-data``)."""
    text_dir = os.path.join(ctx.run_dir, "text", name)
    _write_text_dir(text_dir, docs)
    opts = cli_options("prepare-data")
    run_cli(["prepare-data", "--input", text_dir, "--out", out, *opt(opts, overwrite=True, tokenizer=ctx.tokenizer_file or None)]
            + (["--no-progress"] if "--no-progress" in opts else []), ctx.logfile(f"prepare-{name}"), False, ctx.env)
    shutil.rmtree(text_dir, ignore_errors=True)
    ctx.log(f"   prepared {name}: " + _data_summary(out))


def _prepare_domain(ctx, d: str) -> None:
    from .corpora import read_documents

    docs = read_documents(os.path.join(ctx.corpus_dir, d, "train.jsonl"))
    _prepare_docs(ctx, d, [(f"{d}-{doc.id}", doc.text) for doc in docs], ctx.data[d])


def _write_model_config(ctx) -> None:
    """The model's architecture; vocabulary and special tokens come from the data directories."""
    s = ctx.settings
    model_cfg = {
        "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
        "max_position_embeddings": max(s.seq_len, 1 + s.audit_prefix + s.audit_gen) * 2,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "initializer_range": 0.02,
    }
    ctx.cfg_path = os.path.join(ctx.run_dir, "model_config.json")
    with open(ctx.cfg_path, "w") as f:
        json.dump(model_cfg, f, indent=1)


def _bpe_tokenizer(ctx) -> str:
    """The run's byte-level BPE tokenizer (``settings.bpe_vocab`` ids), trained on the public
    corpus's training documents only (so owners share nothing to get it); built once."""
    from .corpora import read_documents
    from .tokenizer import train_bpe

    path = os.path.join(ctx.run_dir, "tokenizer", "bpe.json")
    if not os.path.isfile(path):
        docs = read_documents(os.path.join(ctx.corpus_dir, ctx.public_dom, "train.jsonl"))
        train_bpe([d.text for d in docs], ctx.settings.bpe_vocab, path)
        ctx.log(f"   BPE tokenizer ({ctx.settings.bpe_vocab} ids) trained on {len(docs)} public documents -> {path}")
    return path


def prepare(ctx) -> None:
    """Build (or reuse) the corpora; tokenise each domain's training documents into its own data directory."""
    from . import corpora as C
    from .tokenizer import tokenizer_for

    s = ctx.settings
    with ctx.stage("corpora"):
        spec = C.CorpusSpec(num_owners=s.num_owners, owners=s.owners, public=s.public, train_bytes=s.train_bytes,
                            test_bytes=s.test_bytes, doc_bytes=s.doc_bytes, seed=s.seed)
        ctx.corpus_dir = C.build_corpora(os.path.abspath(os.path.join(ctx.work_dir, "corpora")), spec, log=ctx.log)
        ctx.manifest = C.load_manifest(ctx.corpus_dir)
    ctx.public_dom, ctx.owners = ctx.manifest["public"], ctx.manifest["owners"]
    ctx.data = {d: os.path.join(ctx.run_dir, "data", d) for d in ctx.domains}
    with ctx.stage("prepare-data"):
        if s.tokenizer == "bpe":
            ctx.tokenizer_file = _bpe_tokenizer(ctx)
        todo = [d for d in ctx.domains if not os.path.isfile(os.path.join(ctx.data[d], "meta.json"))]
        _raise_errors(parallel([(f"prepare {d}", lambda d=d: _prepare_domain(ctx, d)) for d in todo],
                               ctx.jobs, ctx.log, {}))
    ctx.tok = tokenizer_for(ctx.data[ctx.public_dom])
    _write_model_config(ctx)


# ----------------------------------------------------------------------------- 3.-5. training
def _resolve_embedder(ctx) -> None:
    """``ctx.embedder``: ``settings.router_embedder``, or ``hidden`` (with the reason in
    ``ctx.embedder_note``) when MiniLM is asked for but not installed."""
    from flexmoe_training.router_init import minilm_available

    ctx.embedder, ctx.embedder_note = ctx.settings.router_embedder, ""
    if ctx.embedder == "minilm":
        ok, why = minilm_available()
        if not ok:
            ctx.embedder, ctx.embedder_note = "hidden", f"MiniLM unavailable: {why}"
            ctx.log(f"   router init: {ctx.embedder_note}; using the public model's hidden states (the ablation)")


def train_public(ctx) -> None:
    """The dense public model (its FFN becomes expert 0 = "public"; its router row r_public is
    the public corpus's embedding by the demo's router embedder)."""
    _resolve_embedder(ctx)
    with ctx.stage("train-public"):
        if not done(ctx.ck("public")):
            opts = cli_options("train-public")
            run_cli(["train-public", "--data", ctx.data[ctx.public_dom], "--out", ctx.ck("public"), "--model-config",
                     ctx.cfg_path, "--overwrite", *opt(opts, router_embedder=ctx.embedder),
                     *_train_flags(ctx, opts, ctx.settings.public_steps)],
                    ctx.logfile("train-public"), ctx.echo_children, ctx.env)


def _owner_task(ctx, d: str) -> None:
    router = os.path.join(ctx.run_dir, "routers", f"{d}.safetensors")
    if not os.path.isfile(router):
        os.makedirs(os.path.dirname(router), exist_ok=True)
        opts = cli_options("init-router")
        run_cli(["init-router", "--public", ctx.ck("public"), "--data", ctx.data[d], "--out", router,
                 *opt(opts, embedder=ctx.embedder, device=ctx.settings.device, overwrite=True)],
                ctx.logfile(f"init-router-{d}"), ctx.echo_par, ctx.env)
    from .corpora import proxy_pool

    proxy = _proxy_path(ctx, d)
    if ctx.settings.router_tuning and not os.path.isfile(proxy):
        # the owner's own documents and the public corpus in; only public document ids out
        run_module("flexmoe_training.demo.proxy",
                   ["--owner", os.path.join(ctx.corpus_dir, d, "train.jsonl"), "--public",
                    proxy_pool(ctx.corpus_dir, ctx.public_dom), "--out", proxy,
                    "--num-docs", ctx.settings.proxy_docs], ctx.logfile(f"proxy-{d}"), ctx.echo_par, ctx.env)
    if not done(ctx.ck(f"expert-{d}")):
        opts = cli_options("train-expert")
        mix = ["--public-data", _owner_public_dir(ctx)] if ctx.settings.owner_public_mix else []
        run_cli(["train-expert", "--public", ctx.ck("public"), "--data", ctx.data[d], *mix, "--name", d,
                 "--out", ctx.ck(f"expert-{d}"), "--router-init", router, "--overwrite",
                 *opt(opts, bias_init=ctx.settings.bias_init), *_train_flags(ctx, opts, ctx.settings.expert_steps)],
                ctx.logfile(f"train-expert-{d}"), ctx.echo_par, ctx.env)


def _owner_public_dir(ctx) -> str:
    """The public text every owner mixes into its expert training (``train-expert --public-data``):
    documents of the proxy pool (public text the public model never trained on), drawn with the
    seed until their bytes are ``owner_public_mix / (1 - owner_public_mix)`` of an owner's training
    bytes, so about that share of an owner's training windows is public text."""
    return os.path.join(ctx.run_dir, "data", "owner-public")


def _prepare_owner_public(ctx) -> None:
    import random

    from .corpora import proxy_pool, read_documents

    s = ctx.settings
    if not s.owner_public_mix or os.path.isfile(os.path.join(_owner_public_dir(ctx), "meta.json")):
        return
    docs = read_documents(proxy_pool(ctx.corpus_dir, ctx.public_dom))
    random.Random(f"{s.seed}:owner-public").shuffle(docs)
    want, chosen, size = s.owner_public_mix / (1.0 - s.owner_public_mix) * s.train_bytes, [], 0
    for doc in docs:
        if size >= want:
            break
        chosen.append((f"owner-public-{doc.id}", doc.text))
        size += len(doc.text.encode("utf-8"))
    _prepare_docs(ctx, "owner-public", chosen, _owner_public_dir(ctx))


def _proxy_path(ctx, d: str) -> str:
    """Owner ``d``'s published proxy file: public document ids, one a line."""
    return os.path.join(ctx.run_dir, "proxies", f"{d}.ids")


def owners(ctx) -> None:
    """Each owner alone (owners in parallel, each its own processes and only its own data): router
    init from the owner's documents, its proxy selection, then its expert on the frozen public anchor."""
    with ctx.stage(f"owners: init-router + proxy + train-expert ({len(ctx.owners)} owners, {ctx.jobs} at a time)"):
        _prepare_owner_public(ctx)
        _raise_errors(parallel([(f"owner {d}", lambda d=d: _owner_task(ctx, d)) for d in ctx.owners],
                               ctx.jobs, ctx.log, ctx.timings))


# ----------------------------------------------------------------------------- 6.-7. merge and baselines
def _merge_task(ctx) -> None:
    """Merge (into ``ctx.merge_out``), then tune the router (into ``merged``) unless switched off."""
    if not done(ctx.ck(ctx.merge_out)):
        opts = cli_options("merge")
        owner_args: List[str] = []
        for d in ctx.owners:
            owner_args += ["--owner", ctx.ck(f"expert-{d}")]
        run_cli(["merge", "--public", ctx.ck("public"), *owner_args, "--out", ctx.ck(ctx.merge_out),
                 *opt(opts, top_k=ctx.K, overwrite=True)], ctx.logfile("merge"), ctx.echo_par, ctx.env)
    if ctx.settings.router_tuning and not done(ctx.ck("merged")):
        _fed_task(ctx) if ctx.settings.tune_method == "federated" else _tune_task(ctx)


def _fed_task(ctx) -> None:
    """Federated router tuning (:mod:`.fed_router`): every owner and the public party in its own
    process with only its own data, the coordinator here; the round the owners' validation keeps
    becomes ``ckpt/merged``."""
    import torch

    from flexmoe_kernels.models import FlexOlmoForCausalLM

    from .fed_router import choose_round, coordinate, load_router, router_state

    s = ctx.settings
    exchange = os.path.join(ctx.run_dir, "fed")
    shutil.rmtree(exchange, ignore_errors=True)
    model = FlexOlmoForCausalLM.from_pretrained(ctx.ck(ctx.merge_out), dtype=torch.float32)
    local = max(1, s.tune_steps // s.fed_rounds)
    # the public party trains on public text the public model never saw and validates on the
    # public corpus's validation split; each owner on its own data directory's splits
    parties = {d: (["--data", ctx.data[d]]) for d in ctx.owners}
    parties[ctx.public_dom] = ["--data", _owner_public_dir(ctx), "--val-data", ctx.data[ctx.public_dom]]
    failed: Dict[str, str] = {}
    result: dict = {}

    def party(name, flags):
        def run():
            try:
                run_module("flexmoe_training.demo.fed_router",
                           ["--model", ctx.ck(ctx.merge_out), "--name", name, *flags, "--exchange", exchange,
                            "--rounds", s.fed_rounds, "--local-steps", local, "--lr", s.fed_local_lr,
                            "--eval-every", s.fed_eval_every, "--seq-len", s.seq_len, "--batch-size",
                            s.batch_size, "--seed", s.seed, "--device", s.device], ctx.logfile(f"fed-{name}"), False,
                           ctx.env)
            except StageError as e:
                failed[name] = str(e).splitlines()[0]
                raise
        return f"federated party {name}", run

    def coordinator():
        try:
            result.update(coordinate(exchange, router_state(model), list(parties), s.fed_rounds,
                                     lambda: next((f"party {n} failed: {e}" for n, e in failed.items()), None),
                                     lr=s.fed_lr, weight_decay=s.tune_weight_decay, eval_every=s.fed_eval_every,
                                     log=ctx.log))
        except RuntimeError as e:
            raise StageError(f"federated router tuning: {e}") from e

    _prepare_owner_public(ctx)
    _raise_errors(parallel([("federated coordinator", coordinator)] + [party(n, f) for n, f in parties.items()],
                           len(parties) + 1, ctx.log, ctx.timings))
    decision = choose_round(result["val"], ctx.owners, ctx.public_dom, s.fed_public_tolerance, 0.0,
                            result["rounds"])
    decision.update(val=result["val"], rounds=s.fed_rounds, local_steps=local, optimizer="FedAdam", lr=s.fed_lr,
                    local_lr=s.fed_local_lr, weight_decay=s.tune_weight_decay, parties=list(parties))
    write_text_atomic(os.path.join(ctx.run_dir, "tuning.json"),
                      json.dumps({"method": "federated", "keep_tuned": decision["round"] > 0, "federated": decision},
                                 indent=1))
    ctx.log(f"   federated router tuning: owners' validation mean {decision['start_owner_mean']:.4f} (start) -> "
            f"{decision['best_owner_mean']:.4f} (round {decision['round']}); "
            + ("the tuned router is kept" if decision["round"] else "the untuned router is kept"))
    load_router(model, result["globals"][decision["round"]])
    model.config.extra["role"] = "router-tuned (federated)" if decision["round"] else "merged"
    with atomic_directory(ctx.ck("merged")) as tmp:       # ckpt/merged: the model the demo evaluates
        shutil.copytree(ctx.ck(ctx.merge_out), tmp, dirs_exist_ok=True)
        model.save_pretrained(tmp)


def _tune_task(ctx) -> None:
    """Router tuning: ``tune-router`` (router rows and non-public biases, top-k = all experts while
    tuning, the merged model's top-k saved) on the union of the owners' proxies plus a public sample."""
    from .corpora import proxy_pool
    from .proxy import read_proxy_ids, tuning_split

    s = ctx.settings
    train, val = tuning_split(proxy_pool(ctx.corpus_dir, ctx.public_dom), [_proxy_path(ctx, d) for d in ctx.owners],
                              s.tune_public_docs, s.seed, s.tune_val_fraction)
    val_data = os.path.join(ctx.run_dir, "data", "tune-val")
    _prepare_docs(ctx, "tune-val", [(f"tune-{doc.id}", doc.text) for doc in val], val_data)
    # routing supervision: each owner's proxies -> its expert, the public sample -> "public"
    # (an id two owners chose goes to the first); without it one directory, next-token loss only
    chooser: Dict[str, str] = {}
    for d in ctx.owners:
        for i in read_proxy_ids(_proxy_path(ctx, d)):
            chooser.setdefault(i, d)
    groups = {e: [doc for doc in train if chooser.get(doc.id, "public") == e] for e in ["public", *ctx.owners]}
    data_flags: List[str] = []
    for e, docs in groups.items() if s.tune_route_weight else [("", train)]:
        path = os.path.join(ctx.run_dir, "data", f"tune-{e}" if e else "tune")
        _prepare_docs(ctx, f"tune-{e}" if e else "tune", [(f"tune-{doc.id}", doc.text) for doc in docs], path)
        data_flags += ["--route-data", f"{e}={path}"] if e else ["--data", path]
    opts = cli_options("tune-router")
    tuned = ctx.ck("merged-tuned")
    # tune-router keeps the untuned router unless tuning improves validation on the held-out
    # proxies (evaluated with the saved top-k), and stops early on a plateau
    if not done(tuned):
        run_cli(["tune-router", "--model", ctx.ck(ctx.merge_out), *data_flags, "--out", tuned,
                 *opt(opts, route_weight=s.tune_route_weight or None),
                 "--overwrite", *opt(opts, top_k=ctx.K, weight_decay=s.tune_weight_decay, val_data=val_data,
                                     eval_every=max(1, s.tune_steps // 10), eval_batches=16),
                 *_train_flags(ctx, opts, s.tune_steps, lr=s.tune_lr)], ctx.logfile("tune-router"), ctx.echo_par,
                ctx.env)
    sel = read_run(tuned).get("selection") or {}
    if sel:
        ctx.log(f"   router tuning: validation on held-out proxies {sel['start_val_loss']:.4f} (untuned) -> "
                f"{sel['best_val_loss']:.4f}; kept {sel['kept']} (step {sel['best_step']})")
    decision = _owner_check(ctx, [ctx.ck(ctx.merge_out), tuned])
    write_text_atomic(os.path.join(ctx.run_dir, "tuning.json"),
                      json.dumps({"method": "proxies", "keep_tuned": decision["keep_tuned"], "selection": sel,
                                  "owner_check": decision}, indent=1))
    ctx.log(f"   owners' check (each on its own validation data, one number each): mean "
            f"{decision['mean_untuned']:.4f} untuned, {decision['mean_tuned']:.4f} tuned -> "
            + ("the tuned router is kept" if decision["keep_tuned"] else "the untuned router is kept"))
    chosen = tuned if decision["keep_tuned"] else ctx.ck(ctx.merge_out)
    with atomic_directory(ctx.ck("merged")) as tmp:       # ckpt/merged: the model the demo evaluates
        shutil.copytree(chosen, tmp, dirs_exist_ok=True)


def _owner_check(ctx, models: List[str]) -> dict:
    """Each owner (and the public data) scores ``models`` (untuned, tuned) on the validation split
    of its own data directory, in its own process (:mod:`.owner_check`); only the numbers come
    back. The decision of :func:`owner_check.choose`."""
    from .owner_check import choose

    out_dir = os.path.join(ctx.run_dir, "owner_check")
    os.makedirs(out_dir, exist_ok=True)
    S = ctx.settings

    def task(d):
        def run():
            run_module("flexmoe_training.demo.owner_check",
                       ["--data", ctx.data[d], *[a for m in models for a in ("--model", m)], "--seq-len", S.seq_len,
                        "--max-windows", 64, "--out", os.path.join(out_dir, f"{d}.json")],
                       ctx.logfile(f"owner-check-{d}"), False, ctx.env)
        return d, run

    _raise_errors(parallel([task(d) for d in ctx.domains], ctx.jobs, ctx.log, ctx.timings))
    scores = {}
    for d in ctx.domains:
        with open(os.path.join(out_dir, f"{d}.json"), encoding="utf-8") as f:
            scores[d] = json.load(f)["losses"]
    return choose(scores)


def tuning_summary(ctx) -> Optional[dict]:
    """The router tuning's record: ``tune-router``'s selection on held-out proxies and the owners'
    check (``RUN_DIR/tuning.json``), None without router tuning."""
    if not ctx.settings.router_tuning:
        return None
    path = os.path.join(ctx.run_dir, "tuning.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        rec = json.load(f)
    if rec.get("method") == "federated":
        return dict(rec["federated"], method="federated", keep_tuned=rec["keep_tuned"])
    return dict(rec.get("selection") or {}, method="proxies", owner_check=rec.get("owner_check"))


def _dense_task(ctx, d: str) -> None:
    """BTM member d: the public model continued (all weights, one "expert") on d's data with the
    FLOPs of owner d's expert training."""
    if not done(ctx.ck(f"dense-{d}")):
        opts = cli_options("train-moe")
        run_cli(["train-moe", "--public", ctx.ck("public"), "--num-experts", 1, "--top-k", 1,
                 "--data", ctx.data[d], "--out", ctx.ck(f"dense-{d}"), "--overwrite",
                 "--match-flops-of", ctx.ck(f"expert-{d}"), *_train_flags(ctx, opts, None)],
                ctx.logfile(f"train-dense-{d}"), ctx.echo_par, ctx.env)


def _moe_task(ctx) -> None:
    """Joint MoE: E experts, top-K, from scratch on all domains' data with the FLOPs of the public
    run plus every owner's run."""
    if not done(ctx.ck("moe")):
        opts = cli_options("train-moe")
        all_data: List[str] = []
        for d in ctx.domains:
            all_data += ["--data", ctx.data[d]]
        runs = [ctx.ck("public")] + [ctx.ck(f"expert-{d}") for d in ctx.owners]
        run_cli(["train-moe", *all_data, "--out", ctx.ck("moe"), "--model-config", ctx.cfg_path,
                 "--num-experts", ctx.E, "--top-k", ctx.K, "--overwrite", "--match-flops-of", *runs,
                 *_train_flags(ctx, opts, None)], ctx.logfile("train-moe"), ctx.echo_par, ctx.env)


def merge_and_baselines(ctx) -> Dict[str, str]:
    """Merge, and the baselines of equal training FLOPs, in parallel; returns the baselines' errors
    (a failed merge raises StageError). Every checkpoint then records the tokenizer."""
    from flexmoe_training.data import copy_tokenizer_files

    merge_name = "merge" + (" + router tuning" if ctx.settings.router_tuning else "")
    tasks = [(merge_name, lambda: _merge_task(ctx))]
    if ctx.settings.baselines:
        # the longest task first so that the others fill the remaining workers
        tasks = [("baseline: joint MoE", lambda: _moe_task(ctx)), *tasks,
                 *[(f"baseline: public continued on {d} (BTM member)", lambda d=d: _dense_task(ctx, d))
                   for d in ctx.owners]]
    with ctx.stage(f"merge + baselines ({ctx.jobs} at a time)"):
        errors = parallel(tasks, ctx.jobs, ctx.log, ctx.timings)
    if merge_name in errors:
        raise StageError(f"{merge_name}: {errors[merge_name]}")
    # every checkpoint records the tokenizer, so `flexmoe generate --model CKPT` decodes correctly
    for name in os.listdir(os.path.join(ctx.run_dir, "ckpt")):
        if os.path.isfile(os.path.join(ctx.ck(name), "config.json")) and not os.path.isfile(
                os.path.join(ctx.ck(name), "tokenizer_meta.json")):
            copy_tokenizer_files(ctx.data[ctx.public_dom], ctx.ck(name))
    return {k: v for k, v in errors.items() if k != merge_name}


# ----------------------------------------------------------------------------- 8.-10. measure and report
def evaluate(ctx) -> dict:
    """Held-out loss per domain of every model and setting (:func:`measure.evaluate_all`)."""
    from .measure import evaluate_all

    with ctx.stage("evaluate"):
        # measure also scores ckpt/merged-untuned (the merge before router tuning), with its routing
        return evaluate_all(ctx.settings, ctx.run_dir, ctx.corpus_dir, ctx.manifest, ctx.tok, ctx.K, ctx.log)


def router_summary(ctx, results: dict) -> dict:
    """``results["router"]``: router init, negative bias, proxies and tuning (:func:`router_info.router_summary`)."""
    from .router_info import router_summary as summary

    return summary(ctx.settings, ctx.run_dir, ctx.corpus_dir, ctx.public_dom, ctx.owners, ctx.embedder,
                   ctx.embedder_note, results.get("losses", {}))


def audit(ctx) -> List[dict]:
    """Training-data extraction audit (:func:`measure.audit_all`)."""
    from .measure import audit_all

    with ctx.stage("audit"):
        return audit_all(ctx.settings, ctx.run_dir, ctx.corpus_dir, ctx.owners, ctx.tok, ctx.K, ctx.log)


def report(ctx, results: dict) -> dict:
    """Claims, results.json, losses.png and report.txt; prints the report. Returns ``results`` with the claims."""
    import time

    from . import report as R

    results["timings_s"] = {k: round(v, 1) for k, v in ctx.timings.items()}
    results["total_s"] = round(time.time() - ctx.t_all, 1)
    results["run_dir"] = ctx.run_dir
    claims = R.compute_claims(results)
    json_path = os.path.join(ctx.run_dir, "results.json")
    R.write_json(json_path, results, claims)
    pngs = R.write_plots(results, ctx.run_dir, ctx.log)  # losses.png, routing.png
    text = R.format_report(results, claims)
    report_path = os.path.join(ctx.run_dir, "report.txt")
    write_text_atomic(report_path, text + "\n")
    print("\n" + text)
    print("\nStage timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in ctx.timings.items()))
    print(f"Total {results['total_s']:.0f} s. Results: {json_path}" + "".join(f"  plot: {p}" for p in pngs)
          + f"  report: {report_path}")
    print("\n" + R.format_hints(ctx.ck("merged"), results.get("expert_names") or ["public", *ctx.owners], ctx.K))
    results["claims"] = claims
    return results
