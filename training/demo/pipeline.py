"""``flexmoe demo``: the whole FlexOlmo recipe on real text, end to end, in one command.

Stages (each logged with its wall time; each training step runs as its own process through the
``flexmoe`` training commands, and an owner's process is given only that owner's data directory):

1. corpora       build (or reuse) the public corpus and N owner domains (:mod:`.corpora`)
2. prepare-data  tokenise each domain's *training* documents into its own data directory
3. train-public  the dense public model (its FFN becomes expert 0 = "public")
4. init-router   each owner: router embedding from the owner's own documents   } one process
5. train-expert  each owner: 2-expert model on the frozen public anchor         } per owner
6. merge         public + every owner's expert -> one (N+1)-expert model
7. baselines     BTM members: the public model continued densely on each owner's data (one
                 process per owner), and a standard MoE trained jointly on all data; both get
                 the FlexOlmo recipe's training FLOPs
8. evaluate      held-out loss per domain: public, each owner's 2-expert model, merged, merged
                 with each expert opted out, top-k = 1..N+1, BTM ensembles, joint MoE
9. audit         training-data extraction: public, dense-on-owner, merged
10. report       table (stdout), results.json, losses.png; claims judged from the numbers

Everything is written under ``WORK_DIR/<size>-<hash of the settings>/``; stages whose outputs
exist are reused (``--fresh`` re-runs all).

Legend: N owners, E = N + 1 experts, K top-k, S sequence length, D hidden, F FFN width.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

__all__ = ["DemoSettings", "SIZES", "settings_for", "run_demo"]


# ----------------------------------------------------------------------------- settings
@dataclass
class DemoSettings:
    """Everything that decides the demo's numbers (hashed into the run directory's name)."""

    size: str = "default"
    # corpora
    num_owners: int = 3
    owners: Optional[List[str]] = None
    public: Optional[str] = None
    train_bytes: int = 400_000
    test_bytes: int = 40_000
    doc_bytes: int = 2048
    # model (FlexOlmoConfig fields; vocabulary from the tokenizer)
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    # training
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    public_steps: int = 300
    expert_steps: int = 150
    top_k: int = 0                 # merged model's top-k; 0 = N (all but one expert)
    dtype: str = "float32"
    device: str = "auto"
    moe_backend: str = "auto"
    seed: int = 0
    # evaluation / audit
    eval_tokens: int = 16_384      # held-out tokens per domain
    audit_docs: int = 16           # training documents audited per owner
    audit_prefix: int = 32
    audit_gen: int = 128
    audit_threshold: float = 0.9
    baselines: bool = True

    def key(self) -> str:
        d = dataclasses.asdict(self)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


SIZES: Dict[str, dict] = {
    # CI smoke test: about 3 minutes on a 2-core CPU; every stage runs, numbers are noisy.
    "quick": dict(train_bytes=120_000, test_bytes=12_000, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=2, seq_len=64, batch_size=8, lr=5e-3,
                  public_steps=240, expert_steps=120, eval_tokens=4096, audit_docs=6, audit_gen=32),
    # The README's first command: about 15 minutes on a 2-core CPU.
    "default": dict(),
    # A GPU: a bigger model, more data and steps, bf16, fast MoE kernels (moe_backend auto).
    "scale": dict(train_bytes=8_000_000, test_bytes=200_000, hidden_size=512, intermediate_size=1408,
                  num_hidden_layers=8, num_attention_heads=8, seq_len=512, batch_size=32, lr=1e-3,
                  public_steps=3000, expert_steps=1500, eval_tokens=131_072, audit_docs=64, audit_gen=256,
                  dtype="bfloat16", device="cuda", num_owners=4),
}


def settings_for(size: str, **overrides) -> DemoSettings:
    """The settings of a named size with ``overrides`` (None values ignored) applied."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    kw = dict(SIZES[size], size=size)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(DemoSettings)}
    bad = set(kw) - names
    if bad:
        raise TypeError(f"unknown demo settings: {sorted(bad)}")
    return DemoSettings(**kw)


# ----------------------------------------------------------------------------- helpers
class _Log:
    def __init__(self, path: str, quiet: bool = False):
        self.path = path
        self.quiet = quiet
        self.t0 = time.time()
        self.timings: Dict[str, float] = {}

    def __call__(self, msg: str) -> None:
        line = f"[demo {time.time() - self.t0:6.1f}s] {msg}"
        if not self.quiet:
            print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class StageError(RuntimeError):
    pass


def _training_env() -> dict:
    """Environment for child processes: they import flexmoe_training the way we were imported."""
    env = dict(os.environ)
    import flexmoe_training

    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(flexmoe_training.__file__)))
    import flexmoe_kernels

    kern_parent = os.path.dirname(os.path.dirname(os.path.abspath(flexmoe_kernels.__file__)))
    extra = []
    # flexmoe_training may be a symlink (development) -> keep the directory that holds the link
    for p in sys.path:
        if p and os.path.isdir(os.path.join(p, "flexmoe_training")):
            extra.append(os.path.abspath(p))
            break
    extra += [kern_parent, pkg_parent]
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(extra + ([old] if old else [])))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_cli(args: Sequence[str], log_path: str, echo: bool, env: dict) -> None:
    """Run ``python -m flexmoe_training.cli ARGS`` as its own process; output to ``log_path`` (and the terminal)."""
    cmd = [sys.executable, "-m", "flexmoe_training.cli", *map(str, args)]
    with open(log_path, "ab") as logf:
        logf.write(("$ " + " ".join(cmd) + "\n").encode())
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        while True:
            chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
            if not chunk:
                break
            logf.write(chunk)
            logf.flush()
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        tail = open(log_path, "rb").read()[-3000:].decode("utf-8", "replace")
        raise StageError(f"`flexmoe {args[0]}` failed with exit status {rc}; log: {log_path}\n{tail}")


def _cli_options(command: str) -> set:
    """Option strings that ``flexmoe COMMAND`` accepts (read from the argument parser, no process)."""
    from flexmoe_training import cli

    parser = cli.build_parser()
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no public API for this
        sub = action.choices.get(command)
        if sub is not None:
            return set(sub._option_string_actions)  # noqa: SLF001
    raise StageError(f"the training command `flexmoe {command}` does not exist (yet) in flexmoe_training")


def _opt(options: set, **kw) -> List[str]:
    """``--flag value`` pairs for the given keyword arguments that the command accepts."""
    out: List[str] = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is None or flag not in options:
            continue
        if isinstance(v, bool):
            if v:
                out.append(flag)
        else:
            out += [flag, str(v)]
    return out


def _parallel(tasks, jobs: int, log, timings: Dict[str, float]) -> Dict[str, str]:
    """Run ``(name, fn)`` tasks, ``jobs`` at a time (threads that wait on child processes).

    Returns ``{name: first line of the error}`` for the tasks that failed; the others finish.
    """
    from concurrent.futures import ThreadPoolExecutor

    errors: Dict[str, str] = {}

    def wrap(name, fn):
        t = time.time()
        log(f"   start {name}")
        try:
            fn()
        except StageError as e:
            errors[name] = str(e).splitlines()[0]
            log(f"   FAILED {name}: {e}")
            return
        dt = time.time() - t
        timings[name] = dt
        log(f"   done  {name} in {dt:.1f} s")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for f in [pool.submit(wrap, n, fn) for n, fn in tasks]:
            f.result()
    return errors


def _done(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "run.json")) and os.path.isfile(os.path.join(path, "config.json"))


def _read_run(path: str) -> dict:
    try:
        with open(os.path.join(path, "run.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _data_summary(data_dir: str) -> str:
    with open(os.path.join(data_dir, "meta.json")) as f:
        m = json.load(f)
    return f"{m.get('train_docs')} docs, {m.get('train_tokens')} tokens (+{m.get('val_tokens')} validation)"


def _flops_summary(run_dir: str, owners: Sequence[str]) -> dict:
    """Training FLOPs of each recipe, from the ``total_flops`` the training runs recorded."""
    ck = lambda name: os.path.join(run_dir, "ckpt", name)  # noqa: E731
    f = lambda name: float(_read_run(ck(name)).get("total_flops") or 0.0)  # noqa: E731
    steps = lambda name: _read_run(ck(name)).get("steps")  # noqa: E731
    have = lambda name: f(name) > 0  # noqa: E731
    return {
        "flexolmo": f("public") + sum(f(f"expert-{d}") for d in owners),
        "btm": (f("public") + sum(f(f"dense-{d}") for d in owners)) if all(have(f"dense-{d}") for d in owners) else None,
        "moe": f("moe") if have("moe") else None,
        "runs": {name: {"total_flops": f(name), "steps": steps(name)}
                 for name in ["public", "moe"] + [f"expert-{d}" for d in owners] + [f"dense-{d}" for d in owners]},
    }


# ----------------------------------------------------------------------------- the pipeline
def run_demo(settings: DemoSettings, work_dir: str, *, fresh: bool = False, echo_children: bool = False,
             quiet: bool = False, jobs: int = 0, threads: int = 0) -> dict:
    """Run the demo; returns the results dict (also written to ``RUN_DIR/results.json``).

    ``jobs``: training processes run at the same time where the recipe allows it (owners are
    independent); 0 = the number of CPU cores (at most 4). ``threads``: CPU threads per
    process; 0 = cores // jobs (at least 1). Neither changes what is computed.
    """
    from . import corpora as C
    from . import report as R

    run_dir = os.path.abspath(os.path.join(work_dir, f"{settings.size}-{settings.key()}"))
    if fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    log = _Log(os.path.join(run_dir, "demo.log"), quiet=quiet)
    cores = os.cpu_count() or 1
    on_gpu = settings.device == "cuda"
    jobs = jobs or (1 if on_gpu else max(1, min(4, cores)))
    threads = threads or max(1, cores // jobs)
    env = _training_env()
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    timings: Dict[str, float] = {}
    t_all = time.time()

    def stage(name: str):
        class _S:
            def __enter__(self_):
                self_.t = time.time()
                log(f"== {name} ...")

            def __exit__(self_, et, ev, tb):
                dt = time.time() - self_.t
                timings[name] = timings.get(name, 0.0) + dt
                if et is None:
                    log(f"   {name}: done in {dt:.1f} s")
                return False
        return _S()

    log(f"run directory {run_dir}")
    log("settings: " + json.dumps(dataclasses.asdict(settings)))
    log(f"{jobs} training process(es) at a time, {threads} CPU thread(s) each")

    # 1. corpora ---------------------------------------------------------------------------
    with stage("corpora"):
        spec = C.CorpusSpec(num_owners=settings.num_owners, owners=settings.owners, public=settings.public,
                            train_bytes=settings.train_bytes, test_bytes=settings.test_bytes,
                            doc_bytes=settings.doc_bytes, seed=settings.seed)
        corpus_dir = C.build_corpora(os.path.abspath(os.path.join(work_dir, "corpora")), spec, log=log)
        manifest = C.load_manifest(corpus_dir)
    public_dom, owners = manifest["public"], manifest["owners"]
    domains = [public_dom] + owners

    # 2. prepare-data: each domain's training documents into its own data directory -----------
    data = {d: os.path.join(run_dir, "data", d) for d in domains}
    def prepare_task(d: str) -> None:
        text_dir = os.path.join(run_dir, "text", d)
        _write_text_dir(text_dir, [os.path.join(corpus_dir, d, "train.jsonl")])
        opts = _cli_options("prepare-data")
        run_cli(["prepare-data", "--input", text_dir, "--out", data[d], *_opt(opts, overwrite=True)]
                + (["--no-progress"] if "--no-progress" in opts else []),
                os.path.join(run_dir, "logs", f"prepare-{d}.log"), False, env)
        shutil.rmtree(text_dir, ignore_errors=True)
        log(f"   prepared {d}: " + _data_summary(data[d]))

    with stage("prepare-data"):
        todo = [d for d in domains if not os.path.isfile(os.path.join(data[d], "meta.json"))]
        errors = _parallel([(f"prepare {d}", lambda d=d: prepare_task(d)) for d in todo], jobs, log, {})
        if errors:
            raise StageError("; ".join(f"{k}: {v}" for k, v in errors.items()))
    tok = load_tokenizer(data[public_dom])

    # the model's architecture; vocabulary and special tokens come from the data directories
    model_cfg = {
        "hidden_size": settings.hidden_size, "intermediate_size": settings.intermediate_size,
        "num_hidden_layers": settings.num_hidden_layers, "num_attention_heads": settings.num_attention_heads,
        "max_position_embeddings": max(settings.seq_len, 1 + settings.audit_prefix + settings.audit_gen) * 2,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "initializer_range": 0.02,
    }
    cfg_path = os.path.join(run_dir, "model_config.json")
    with open(cfg_path, "w") as f:
        json.dump(model_cfg, f, indent=1)
    N = len(owners)
    E = N + 1
    K = settings.top_k or N
    K = max(1, min(K, E))
    ck = lambda name: os.path.join(run_dir, "ckpt", name)  # noqa: E731
    dtype_flag = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}.get(settings.dtype, "auto")

    def train_flags(opts: set, steps: Optional[int]) -> List[str]:
        """The shared training flags; ``steps`` None when the command derives them (FLOPs matching)."""
        warm = max(1, (steps or settings.expert_steps) // 10)
        flags = _opt(opts, steps=steps, warmup_steps=warm, seq_len=settings.seq_len,
                     micro_batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed, dtype=dtype_flag,
                     device=settings.device, moe_backend=settings.moe_backend,
                     log_every=max(1, (steps or 100) // 5))
        return flags + (["--no-progress"] if "--no-progress" in opts and not echo_children else [])

    # 3. public model ------------------------------------------------------------------------
    with stage("train-public"):
        if not _done(ck("public")):
            opts = _cli_options("train-public")
            run_cli(["train-public", "--data", data[public_dom], "--out", ck("public"), "--model-config", cfg_path,
                     "--overwrite", *train_flags(opts, settings.public_steps)],
                    os.path.join(run_dir, "logs", "train-public.log"), echo_children, env)

    # 4./5. each owner alone (owners in parallel, each its own processes and only its own data):
    #       router init from the owner's documents, then its expert on the frozen public anchor
    routers = {d: os.path.join(run_dir, "routers", f"{d}.safetensors") for d in owners}
    echo_par = echo_children and jobs == 1

    def owner_task(d: str) -> None:
        if not os.path.isfile(routers[d]):
            os.makedirs(os.path.dirname(routers[d]), exist_ok=True)
            opts = _cli_options("init-router")
            run_cli(["init-router", "--public", ck("public"), "--data", data[d], "--out", routers[d],
                     *_opt(opts, device=settings.device, overwrite=True)],
                    os.path.join(run_dir, "logs", f"init-router-{d}.log"), echo_par, env)
        if not _done(ck(f"expert-{d}")):
            opts = _cli_options("train-expert")
            run_cli(["train-expert", "--public", ck("public"), "--data", data[d], "--name", d,
                     "--out", ck(f"expert-{d}"), "--router-init", routers[d], "--overwrite",
                     *train_flags(opts, settings.expert_steps)],
                    os.path.join(run_dir, "logs", f"train-expert-{d}.log"), echo_par, env)

    with stage(f"owners: init-router + train-expert ({N} owners, {jobs} at a time)"):
        errors = _parallel([(f"owner {d}", lambda d=d: owner_task(d)) for d in owners], jobs, log, timings)
        if errors:
            raise StageError("; ".join(f"{k}: {v}" for k, v in errors.items()))

    # 6. merge, 7. baselines of equal training FLOPs (in parallel) ----------------------------
    #    BTM member d: the public model continued (all weights trained, one "expert") on d's data
    #    with the FLOPs of owner d's expert training; joint MoE: E experts, top-K, from scratch on
    #    all domains' data with the FLOPs of the public run plus every owner's run.
    def merge_task() -> None:
        if not _done(ck("merged")):
            opts = _cli_options("merge")
            owner_args: List[str] = []
            for d in owners:
                owner_args += ["--owner", ck(f"expert-{d}")]
            run_cli(["merge", "--public", ck("public"), *owner_args, "--out", ck("merged"),
                     *_opt(opts, top_k=K, overwrite=True)],
                    os.path.join(run_dir, "logs", "merge.log"), echo_par, env)

    def dense_task(d: str) -> None:
        if not _done(ck(f"dense-{d}")):
            opts = _cli_options("train-moe")
            run_cli(["train-moe", "--public", ck("public"), "--num-experts", 1, "--top-k", 1,
                     "--data", data[d], "--out", ck(f"dense-{d}"), "--overwrite",
                     "--match-flops-of", ck(f"expert-{d}"), *train_flags(opts, None)],
                    os.path.join(run_dir, "logs", f"train-dense-{d}.log"), echo_par, env)

    def moe_task() -> None:
        if not _done(ck("moe")):
            opts = _cli_options("train-moe")
            all_data: List[str] = []
            for d in domains:
                all_data += ["--data", data[d]]
            runs = [ck("public")] + [ck(f"expert-{d}") for d in owners]
            run_cli(["train-moe", *all_data, "--out", ck("moe"), "--model-config", cfg_path,
                     "--num-experts", E, "--top-k", K, "--overwrite", "--match-flops-of", *runs,
                     *train_flags(opts, None)],
                    os.path.join(run_dir, "logs", "train-moe.log"), echo_par, env)

    tasks = [("merge", merge_task)]
    if settings.baselines:
        # the longest task first so that the others fill the remaining workers
        tasks = [("baseline: joint MoE", moe_task), *tasks,
                 *[(f"baseline: public continued on {d} (BTM member)", lambda d=d: dense_task(d)) for d in owners]]
    with stage(f"merge + baselines ({jobs} at a time)"):
        errors = _parallel(tasks, jobs, log, timings)
    if "merge" in errors:
        raise StageError(f"merge: {errors['merge']}")
    baseline_errors: Dict[str, str] = {k: v for k, v in errors.items() if k != "merge"}
    flops = _flops_summary(run_dir, owners)

    # every checkpoint records the tokenizer, so `flexmoe generate --model CKPT` decodes correctly
    from flexmoe_training.data import copy_tokenizer_files

    for name in os.listdir(os.path.join(run_dir, "ckpt")):
        if os.path.isfile(os.path.join(ck(name), "config.json")) and not os.path.isfile(
                os.path.join(ck(name), "tokenizer_meta.json")):
            copy_tokenizer_files(data[public_dom], ck(name))

    # 8. evaluation -------------------------------------------------------------------------
    with stage("evaluate"):
        results = evaluate_all(settings, run_dir, corpus_dir, manifest, tok, K, log)
    results["flops"] = flops
    results["baseline_errors"] = baseline_errors

    # 9. extraction audit -----------------------------------------------------------------------
    with stage("audit"):
        results["audit"] = audit_all(settings, run_dir, corpus_dir, owners, tok, K, log)

    # 10. report -------------------------------------------------------------------------------
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["total_s"] = round(time.time() - t_all, 1)
    results["run_dir"] = run_dir
    claims = R.compute_claims(results)
    json_path = os.path.join(run_dir, "results.json")
    R.write_json(json_path, results, claims)
    png = os.path.join(run_dir, "losses.png")
    try:
        R.plot_losses(results, png)
    except Exception as e:  # the plot must never lose the numbers
        log(f"plot failed: {type(e).__name__}: {e}")
        png = None
    text = R.format_report(results, claims)
    with open(os.path.join(run_dir, "report.txt"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    print(f"\nStage timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"Total {results['total_s']:.0f} s. Results: {json_path}" + (f"  plot: {png}" if png else "")
          + f"  report: {os.path.join(run_dir, 'report.txt')}")
    deny = owners[0]
    print(f"\nTry opt-out inference on the merged model:\n  flexmoe generate --model {ck('merged')} "
          f"--deny {deny} \"def main(\"\n  flexmoe generate --model {ck('merged')} --allow public,{deny} \"def main(\"")
    results["claims"] = claims
    return results


def _write_text_dir(text_dir: str, jsonl_paths: Sequence[str]) -> None:
    """One ``.txt`` file per document (the input format of ``flexmoe prepare-data``)."""
    from .corpora import read_documents

    tmp = text_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for p in jsonl_paths:
        dom = os.path.basename(os.path.dirname(p))
        for doc in read_documents(p):
            with open(os.path.join(tmp, f"{dom}-{doc.id}.txt"), "w", encoding="utf-8") as f:
                f.write(doc.text)
    shutil.rmtree(text_dir, ignore_errors=True)
    os.replace(tmp, text_dir)


# ----------------------------------------------------------------------------- tokenizer
def load_tokenizer(data_dir: str):
    """The tokenizer ``flexmoe prepare-data`` used for a data directory (from its meta.json)."""
    from .tokenizer import tokenizer_for

    return tokenizer_for(data_dir)


# ----------------------------------------------------------------------------- evaluation
def _load(path: str, settings: DemoSettings):
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


def evaluate_all(settings: DemoSettings, run_dir: str, corpus_dir: str, manifest: dict, tok, K: int, log) -> dict:
    """Held-out loss per domain for every model / setting; returns the results dict for the report."""
    import torch

    from .evaluate import ensemble_logprobs, summarise, target_logprobs

    public_dom, owners = manifest["public"], manifest["owners"]
    domains = [public_dom] + owners
    windows = _test_windows(settings, corpus_dir, domains, tok)
    log("   held-out windows: " + ", ".join(f"{d} {w.shape[0]}x{w.shape[1]}" for d, w in windows.items()))
    ck = lambda name: os.path.join(run_dir, "ckpt", name)  # noqa: E731
    losses: Dict[str, Dict[str, dict]] = {}
    configs: Dict[str, dict] = {}
    lp_cache: Dict[str, Dict[str, torch.Tensor]] = {}

    def run(name, model, kind, label, allowed=None, keep=False):
        t = time.time()
        row, lps = {}, {}
        for d in domains:
            lp = target_logprobs(model, windows[d], allowed_experts=allowed)
            row[d] = summarise(lp)
            if keep:
                lps[d] = lp
        losses[name] = row
        configs[name] = {"kind": kind, "label": label, "allowed": allowed}
        if keep:
            lp_cache[name] = lps
        log(f"   {label:34s} " + "  ".join(f"{d} {row[d]['loss']:.3f}" for d in domains) + f"  ({time.time() - t:.1f} s)")

    public = _load(ck("public"), settings)
    run("public", public, "public", "public model", keep=True)
    del public
    for d in owners:
        m = _load(ck(f"expert-{d}"), settings)
        run(f"owner:{d}", m, "owner", f"owner {d}: 2-expert model")
        del m
    merged = _load(ck("merged"), settings)
    names = list(merged.expert_names)
    merged.set_top_k(K)
    run("merged", merged, "merged", f"merged, all {len(names)} experts (k={K})")
    for d in owners:
        if d not in names:
            log(f"   merged model has no expert named {d!r} (experts {names}); opt-out of {d} skipped")
            continue
        allowed = [n for n in names if n != d]
        k = min(K, len(allowed))
        merged.set_top_k(k)
        run(f"optout:{d}", merged, "optout", f"merged without {d} (k={k})", allowed=allowed)
    for k in range(1, len(names) + 1):
        merged.set_top_k(k)
        run(f"topk:{k}", merged, "topk", f"merged, top-k={k}")
    merged.set_top_k(K)
    del merged
    # baselines
    dense_ok = all(os.path.isfile(os.path.join(ck(f"dense-{d}"), "run.json")) for d in owners)
    if dense_ok:
        for d in owners:
            m = _load(ck(f"dense-{d}"), settings)
            run(f"dense:{d}", m, "dense", f"dense continued on {d} (BTM member)", keep=True)
            del m
        for w in ("prior", "uniform"):
            row = {}
            for d in domains:
                members = torch.stack([lp_cache["public"][d]] + [lp_cache[f"dense:{o}"][d] for o in owners])
                row[d] = summarise(ensemble_logprobs(members, w))
            losses[f"btm-{w}"] = row
            label = f"BTM ensemble ({'prefix-likelihood' if w == 'prior' else 'uniform'} weights)"
            configs[f"btm-{w}"] = {"kind": "btm", "label": label}
            log(f"   {label:34s} " + "  ".join(f"{d} {row[d]['loss']:.3f}" for d in domains))
    if os.path.isfile(os.path.join(ck("moe"), "run.json")):
        m = _load(ck("moe"), settings)
        run("moe", m, "moe", f"standard MoE, joint data (k={m.config.num_experts_per_tok})")
        del m
    return {
        "public_domain": public_dom,
        "owner_domains": owners,
        "expert_names": names,
        "top_k": K,
        "losses": losses,
        "configs": configs,
        "corpora": {"dir": corpus_dir, "domains": manifest["domains"], "skipped": manifest.get("skipped", {})},
        "settings": dataclasses.asdict(settings),
        "eval_windows": {d: list(w.shape) for d, w in windows.items()},
    }


def audit_all(settings: DemoSettings, run_dir: str, corpus_dir: str, owners: Sequence[str], tok, K: int, log) -> List[dict]:
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
                m = _load(path, settings)
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
