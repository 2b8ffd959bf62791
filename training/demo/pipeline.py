"""``flexmoe demo``: the whole FlexOlmo recipe on real text, end to end, in one command.

Stages (each logged with its wall time; each training step runs as its own process through the
``flexmoe`` training commands, and an owner's process is given only that owner's data directory):

1. corpora       build (or reuse) the public corpus and N owner domains (:mod:`.corpora`)
2. prepare-data  tokenise each domain's *training* documents into its own data directory
3. train-public  the dense public model (its FFN becomes expert 0 = "public")
4. init-router   each owner: router embedding from the owner's own documents   } one process
5. proxy         each owner: ids of the public documents most like its data    } per owner
   train-expert  each owner: 2-expert model on the frozen public anchor (its    }
                 data + ``owner_public_mix`` public text)                       }
6. merge         public + every owner's expert -> one (N+1)-expert model; then router tuning:
                 federated (:mod:`.fed_router`: every owner and the public party tune the router
                 rows and biases on their own data, averaged each round, the round kept by the
                 owners' validation) or, with ``tune_method="proxies"``, ``tune-router`` on the
                 owners' public proxies; the result is the demo's merged model (``ckpt/merged``;
                 before tuning: ``ckpt/merged-untuned``)
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

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .measure import audit_all, evaluate_all  # noqa: F401  (re-exported)
from .runner import StageError, progress_ticker

__all__ = ["DemoContext", "DemoSettings", "MINUTES_ON_2_CORE_CPU", "SIZES", "StageError", "estimate", "settings_for",
           "run_demo"]


# ----------------------------------------------------------------------------- settings
@dataclass
class DemoSettings:
    """Everything that decides the demo's numbers (hashed into the run directory's name)."""

    size: str = "default"
    # corpora
    num_owners: int = 3
    owners: Optional[List[str]] = None
    public: Optional[str] = None
    train_bytes: int = 600_000
    test_bytes: int = 40_000
    doc_bytes: int = 2048
    # model (FlexOlmoConfig fields; vocabulary from the tokenizer)
    hidden_size: int = 192
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    # training
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    public_steps: int = 450
    expert_steps: int = 375
    top_k: int = 0                 # merged model's top-k; 0 = N (all but one expert)
    # router: domain-informed init, negative bias, router tuning on owner-selected public proxies
    router_embedder: str = "minilm"  # init-router / r_public embedder ("hidden" when MiniLM is not installed)
    bias_init: float = -0.5        # b_owner at the start of the owner's training (applied as min(b, 0))
    # share of public text (proxy-pool documents) in each owner's expert training: its router then
    # also learns where the public expert is better (0: the owner's data only)
    owner_public_mix: float = 0.4
    router_tuning: bool = True
    # "federated": FedAdam of the router over the owners' own data and public text, the round kept
    # by the owners' validation (training/demo/fed_router.py); "proxies": the paper's tuning on
    # owner-selected public proxies (tune-router), kept by the owners' check
    tune_method: str = "federated"
    fed_rounds: int = 40           # tune_steps // fed_rounds local SGD steps per party and round
    fed_lr: float = 5e-3           # the coordinator's Adam (on the parties' mean change per round)
    fed_local_lr: float = 0.05     # each party's SGD
    fed_eval_every: int = 5        # rounds between the parties' validation scores (and the last)
    fed_public_tolerance: float = 0.01  # a kept round's public validation loss may exceed the start's by this
    proxy_docs: int = 24           # public documents each owner selects as its proxy
    tune_public_docs: int = 48     # public documents sampled (not proxies) into the tuning data
    tune_val_fraction: float = 0.25  # of each owner's proxies (and the sample) held out to validate tuning
    tune_steps: int = 200          # local steps per party (federated) or tune-router steps (proxies)
    tune_lr: float = 2e-3          # tune-router's (proxies): the paper's, for 4 experts
    tune_weight_decay: float = 0.1
    # routing supervision while tuning (tune-router --route-data): each owner's proxies -> its
    # expert, the public sample -> public, weight x the router's cross-entropy (0: next-token only)
    tune_route_weight: float = 0.0
    dtype: str = "float32"
    device: str = "auto"
    moe_backend: str = "auto"
    seed: int = 0
    # "bpe": a byte-level BPE of bpe_vocab ids trained on the public corpus (routes better than
    # "byte", 258 ids: a byte carries too little of its domain for per-token routing; docs/DEMO.md)
    tokenizer: str = "bpe"
    bpe_vocab: int = 1024
    # evaluation / audit
    eval_tokens: int = 16_384      # held-out tokens per domain
    eval_prefix: int = 32          # first tokens of each window: context only (BTM picks its top-2 members on them)
    audit_docs: int = 32           # training documents audited per owner (resolution: 1 document)
    audit_prefix: int = 32
    audit_gen: int = 256
    audit_threshold: float = 0.9
    audit_control_docs: int = 6    # positive control: documents a tiny model memorises (and as many it never sees)
    baselines: bool = True

    def key(self) -> str:
        d = dataclasses.asdict(self)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


SIZES: Dict[str, dict] = {
    # CI smoke test: every stage runs, numbers are noisy.
    "quick": dict(train_bytes=120_000, test_bytes=12_000, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=2, seq_len=64, batch_size=8, lr=5e-3,
                  public_steps=240, expert_steps=120, eval_tokens=4096, audit_docs=8, audit_gen=32,
                  audit_control_docs=4,
                  proxy_docs=8, tune_public_docs=16, tune_steps=40, fed_rounds=8, fed_eval_every=2),
    # The README's first command.
    "default": dict(),
    # A GPU: the next point of the CPU scale study (training/demo/scale_study.py, docs/DEMO.md):
    # about 9x the 1x point's parameters (4.5x the default's), data and steps 2.8x the 1x point's (= sqrt 8), the same recipe,
    # sequence length and batch, in bf16 with the fast MoE kernels (moe_backend auto).
    "scale": dict(hidden_size=320, intermediate_size=832, num_hidden_layers=5, num_attention_heads=5,
                  train_bytes=1_100_000, test_bytes=80_000, public_steps=850, expert_steps=700, eval_tokens=32_768,
                  audit_docs=64, dtype="bfloat16", device="cuda"),
}


# Wall time in minutes of `flexmoe demo` (and --quick) from a fresh work directory on an idle 2-core CPU,
# measured (docs/DEMO.md, "How long it takes"). The one estimate README.md, docs/DEMO.md and
# `flexmoe demo --help` state, through estimate(); tests/test_docs.py checks that they agree.
MINUTES_ON_2_CORE_CPU: Dict[str, int] = {"quick": 2, "default": 19}


def estimate(size: str) -> str:
    """The stated wall time of a size on an idle 2-core CPU, e.g. ``"about 4 minutes"``."""
    return f"about {MINUTES_ON_2_CORE_CPU[size]} minutes"


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


# ----------------------------------------------------------------------------- context
class _Log:
    """The demo's log: each line, with the time since the start, to stdout and to ``path``.

    Stages run in threads side by side (:func:`runner.parallel`); one lock for every log makes
    each line one write under it, so lines never interleave (``print`` writes the text and the
    newline separately)."""

    _lock = threading.Lock()

    def __init__(self, path: str, quiet: bool = False):
        self.path = path
        self.quiet = quiet
        self.t0 = time.time()
        self.timings: Dict[str, float] = {}

    def __call__(self, msg: str) -> None:
        line = f"[demo {time.time() - self.t0:6.1f}s] {msg}\n"
        with self._lock:
            if not self.quiet:
                sys.stdout.write(line)
                sys.stdout.flush()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)


@dataclass
class DemoContext:
    """What the stages share: settings, where things go, how processes run, and what earlier
    stages produced (filled in by :func:`stages.prepare`)."""

    settings: DemoSettings
    work_dir: str
    run_dir: str
    log: _Log
    env: dict
    jobs: int
    threads: int
    echo_children: bool
    timings: Dict[str, float] = field(default_factory=dict)
    t_all: float = field(default_factory=time.time)
    # from stages.prepare
    corpus_dir: str = ""
    manifest: dict = field(default_factory=dict)
    public_dom: str = ""
    owners: List[str] = field(default_factory=list)
    data: Dict[str, str] = field(default_factory=dict)
    tok: object = None
    cfg_path: str = ""
    tokenizer_file: str = ""        # the BPE tokenizer's JSON file ("" = byte level)
    embedder: str = ""              # the router embedder used (settings.router_embedder or its fallback)
    embedder_note: str = ""         # why, when it differs from the setting
    current_stage: Optional[tuple] = None   # (name, start time) of the stage running now

    def stage_status(self) -> Optional[str]:
        """``"NAME: running 1 min 05 s"`` for the stage running now (the progress ticker's idle line)."""
        from .runner import duration_text

        cur = self.current_stage
        return None if cur is None else f"{cur[0]}: running {duration_text(time.time() - cur[1])}"

    @property
    def domains(self) -> List[str]:
        return [self.public_dom] + self.owners

    @property
    def E(self) -> int:
        """Experts of the merged model: the public one and one per owner."""
        return len(self.owners) + 1

    @property
    def K(self) -> int:
        """Top-k of the merged model: ``settings.top_k`` (0: N), clamped to [1, E]."""
        return max(1, min(self.settings.top_k or len(self.owners), self.E))

    @property
    def merge_out(self) -> str:
        """The checkpoint ``flexmoe merge`` writes: ``merged-untuned`` when the router is tuned
        afterwards (the tuned model is ``merged``), else ``merged``."""
        return "merged-untuned" if self.settings.router_tuning else "merged"

    @property
    def echo_par(self) -> bool:
        """Show child output of stages that may run in parallel (only with one job at a time)."""
        return self.echo_children and self.jobs == 1

    def ck(self, name: str) -> str:
        """The checkpoint directory ``name`` of this run."""
        return os.path.join(self.run_dir, "ckpt", name)

    def logfile(self, name: str) -> str:
        """The log file of the child process ``name``."""
        return os.path.join(self.run_dir, "logs", f"{name}.log")

    @contextlib.contextmanager
    def stage(self, name: str):
        """Log the start and the wall time of a stage (added to ``timings[name]``)."""
        t = time.time()
        self.log(f"== {name} ...")
        self.current_stage = (name, t)
        try:
            yield
        finally:
            self.current_stage = None
            dt = time.time() - t
            self.timings[name] = self.timings.get(name, 0.0) + dt
        self.log(f"   {name}: done in {dt:.1f} s")


def _context(settings: DemoSettings, work_dir: str, fresh: bool, echo_children: bool, quiet: bool, jobs: int,
             threads: int) -> DemoContext:
    from .runner import training_env

    run_dir = os.path.abspath(os.path.join(work_dir, f"{settings.size}-{settings.key()}"))
    if fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    log = _Log(os.path.join(run_dir, "demo.log"), quiet=quiet)
    cores = os.cpu_count() or 1
    jobs = jobs or (1 if settings.device == "cuda" else max(1, min(4, cores)))
    threads = threads or max(1, cores // jobs)
    env = training_env()
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return DemoContext(settings=settings, work_dir=work_dir, run_dir=run_dir, log=log, env=env, jobs=jobs,
                       threads=threads, echo_children=echo_children)


# ----------------------------------------------------------------------------- the pipeline
def run_demo(settings: DemoSettings, work_dir: str, *, fresh: bool = False, echo_children: bool = False,
             quiet: bool = False, jobs: int = 0, threads: int = 0) -> dict:
    """Run the demo; returns the results dict (also written to ``RUN_DIR/results.json``).

    ``jobs``: training processes run at the same time where the recipe allows it (owners are
    independent); 0 = the number of CPU cores (at most 4). ``threads``: CPU threads per
    process; 0 = cores // jobs (at least 1). Neither changes what is computed. Raises
    :class:`StageError` naming the failed stage and its log.
    """
    import torch

    from . import stages

    ctx = _context(settings, work_dir, fresh, echo_children, quiet, jobs, threads)
    torch.set_num_threads(ctx.threads)
    ctx.log(f"run directory {ctx.run_dir}")
    ctx.log(f"each command's full output: {os.path.join(ctx.run_dir, 'logs')}/<command>.log "
            f"(this summary: {ctx.log.path})")
    for line in settings_table(settings):
        ctx.log(line)
    ctx.log(f"{ctx.jobs} training process(es) at a time, {ctx.threads} CPU thread(s) each")
    with progress_ticker(ctx.log, idle=ctx.stage_status):
        return _run_stages(ctx, stages)


def settings_table(settings: DemoSettings) -> List[str]:
    """The settings as an aligned two-column table (``top_k`` 0 shown as what it resolves to)."""
    rows = []
    for k, v in dataclasses.asdict(settings).items():
        if k == "top_k" and not v:
            n = len(settings.owners) if settings.owners else settings.num_owners
            v = f"{n} (0 = the number of owners)"
        rows.append((k, "-" if v is None else str(v)))
    width = max(len(k) for k, _ in rows)
    return ["settings:"] + [f"   {k.ljust(width)}  {v}" for k, v in rows]


def _run_stages(ctx: DemoContext, stages) -> dict:
    stages.prepare(ctx)
    stages.train_public(ctx)
    stages.owners(ctx)
    baseline_errors = stages.merge_and_baselines(ctx)
    results = stages.evaluate(ctx)
    results["flops"] = stages.flops_summary(ctx.run_dir, ctx.owners)
    results["router_tuning"] = stages.tuning_summary(ctx)
    results["baseline_errors"] = baseline_errors
    results["router"] = stages.router_summary(ctx, results)
    results["audit"] = stages.audit(ctx)
    return stages.report(ctx, results)

