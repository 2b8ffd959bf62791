"""The DeepSpeed training loop shared by every training command.

Legend: B micro-batch (sequences per rank), S sequence length, G global batch, V vocabulary.

Components (each its own module):

* :mod:`.options`: ``TrainOptions`` (the shared flags) and the schedule :func:`lr_at` (linear
  warm-up + cosine, a function of the step, so the schedule needs no saved state).
* :mod:`.distributed`: ``torch.distributed`` + DeepSpeed set-up and the DeepSpeed config
  (``training/configs/zero{0,1,2,3}.json`` or ``--deepspeed-config``; bf16 on CUDA when
  supported, fp32 on CPU).
* :mod:`.resume`: the resumable state ``OUT.inprogress/state`` (DeepSpeed's checkpoint, each
  rank writing its own partition; RNG, step) and the decision to resume or start over.
* Model: built here from the command's :class:`ModelBuild` once the process group is up; under
  ZeRO-3 parameter by parameter straight into partitions (no rank holds the whole model).
* :mod:`.runlog`: ``run.json`` and ``metrics.jsonl``.
* this module: the run itself (:func:`train`).

* Optimiser: AdamW (betas 0.9/0.95) over the trainable parameters only (frozen ones get no
  state and no gradient); weight decay on matrices only.
* Loss: next-token cross-entropy + ``z_loss_weight * sum over layers router_z_loss(logits)``
  (only for models with more than one expert).
* Output: the run works in ``OUT.inprogress/``. At the end the final HF checkpoint (gathered one
  parameter at a time, in shards of at most ``--max-shard-size`` with an index), run.json and
  metrics.jsonl replace ``OUT`` in one step (:func:`flexmoe_kernels.utils.fs.replace_directory`).
  Running the same command again after a kill (or ``--max-steps-this-run``) resumes from ``state/``.
"""
from __future__ import annotations

import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from flexmoe_kernels import router_z_loss
from flexmoe_kernels.modules import FlexMoE
from flexmoe_kernels.models.checkpoint import lazy_state_dict, save_state_dict
from flexmoe_kernels.utils.fs import replace_directory, write_json_atomic

from .data import BatchSampler, DataDir, copy_tokenizer_files, eval_windows
from .monitoring import MONITOR_DIR, add_monitors, monitor_step
from .distributed import (DistInfo, all_reduce_sum, barrier, ds_config, init_distributed, param_numel, param_shape,
                          release_distributed, zero3_partitioner)
from .modeling import LazyTensors, build_model, count_params, export_items, model_from_state_dict, param_value
from .options import TrainingError, TrainOptions, lr_at
from .resume import (data_identity, full_fp32, gather, load_engine_state, named_trainable, open_work_dir, save_state,
                     zero_stage_of)
from .runlog import RunLog, utc_now, versions
from .selection import BestSelection, SelectionState, validation_top_k

__all__ = ["TrainOptions", "ModelBuild", "RunSpec", "DistInfo", "init_distributed", "lr_at", "train", "TrainingError",
           "write_json_atomic", "save_hf"]


@dataclass
class ModelBuild:
    """How the trainer builds the model (after the process group is up, see :func:`_build_model`):
    ``config``, an HF-named ``source`` of its values (a lazy checkpoint, :func:`~.modeling.fresh_source`,
    :func:`~.modeling.coupled_source`, ...) and ``prepare(model)`` (freezing), run on the meta model."""

    config: object
    source: Mapping[str, torch.Tensor]
    prepare: Optional[Callable[[torch.nn.Module], object]] = None


@dataclass
class RunSpec:
    """What a command trains and how its result is written.

    Give ``build`` (the trainer builds the model: under ZeRO-3 partitioned parameter by
    parameter, so no rank holds the whole model; the frozen reference is then the source's
    values of the frozen parameters, read on demand) or, for callers that already hold a model,
    ``model`` (on CPU, fp32, frozen / parametrized as wanted) and ``frozen_reference``.
    """

    kind: str                         # "public", "expert", "dense", "moe", "router"
    out: Path
    datas: Sequence[DataDir]
    tokenizer_src: Path               # a data dir or checkpoint holding the tokenizer description
    final_config: Callable[[], object]              # -> FlexOlmoConfig of the saved checkpoint
    build: Optional[ModelBuild] = None
    model: Optional[torch.nn.Module] = None
    frozen_reference: Mapping[str, torch.Tensor] = field(default_factory=dict)  # param name -> fp32 value it must keep
    run_info: dict = field(default_factory=dict)    # extra fields for run.json
    flops_per_token: float = 0.0
    save_dtype: torch.dtype = torch.float32         # dtype of the final checkpoint's tensors
    # Optional last edit of the exported HF state dict before it is written (main rank only):
    # sd -> (sd, extra run.json fields); sd is the written checkpoint, read lazily. train-public
    # sets the public router row here.
    finalize_state_dict: Optional[Callable[[Mapping], tuple[Mapping, dict]]] = None
    # The command's inputs besides --data ({flag: value or resume.*_identity(...)}): a resumed run
    # must have the same (refused otherwise, naming the flag). --data is added by the trainer.
    inputs: dict = field(default_factory=dict)
    # Export the trainable values of the best validation, the starting ones included, and stop
    # early on a plateau (training/selection.py; router tuning). None: export the last values.
    select: Optional[BestSelection] = None
    # Validation data instead of the held-out split of ``datas``: every token of these (their own
    # train and val splits), e.g. owners' proxies held out from router tuning.
    val_datas: Optional[Sequence[DataDir]] = None
    # Routing supervision (router tuning): the expert each of ``datas``' windows should be routed
    # to (-1: none); adds ``route_weight`` x the mean over layers of the router's cross-entropy
    # against it to the loss. Empty: plain next-token loss.
    route_targets: Sequence[int] = ()
    route_weight: float = 0.0


@dataclass
class _Run:
    """Everything one invocation of :func:`train` works with (filled in as the run proceeds)."""

    spec: RunSpec
    opts: TrainOptions
    dist: DistInfo
    out: Path
    work: Path
    sampler: BatchSampler
    windows: torch.Tensor
    use_bf16: bool
    ds_cfg: dict
    zero_stage: int
    resume: Optional[dict]
    log: RunLog
    inputs: dict = field(default_factory=dict)  # the identity of every input flag (resume refuses others)
    engine: object = None
    start_step: int = 0
    step: int = 0
    state_saved: bool = False
    last_loss: Optional[float] = None
    t_run: float = 0.0
    selection: Optional[SelectionState] = None   # with spec.select: the best validation so far
    stopped_early: bool = False

    @property
    def tokens_per_step(self) -> int:
        return self.sampler.global_batch_size * self.opts.seq_len


class _Stop:
    """Within the ``with`` block, SIGTERM / SIGINT only set ``requested`` (the run pauses cleanly)."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


def save_hf(config, sd: Mapping[str, torch.Tensor], directory: Path) -> None:
    """Write an HF FlexOlmo checkpoint (atomic, via ``FlexOlmoForCausalLM.save_pretrained``)."""
    model_from_state_dict(config, sd).save_pretrained(directory)


# ---------------------------------------------------------------------------- loss and evaluation
def _loss(engine, batch: torch.Tensor, opts: TrainOptions, use_z: bool,
          route: Optional[tuple] = None) -> tuple[torch.Tensor, float, float]:
    """``(loss, next-token CE, z-loss)``; ``route``: ``(weight, targets (B,) long)`` adds weight x the
    mean over layers of the router logits' cross-entropy against each window's expert (-1: none)."""
    x, y = batch[:, :-1], batch[:, 1:]
    out = engine(x, output_router_logits=use_z or route is not None)
    logits = out.logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    z = torch.zeros((), device=ce.device)
    if use_z and out.router_logits:
        z = sum(router_z_loss(lg) for lg in out.router_logits)
    loss = ce + opts.z_loss_weight * z
    if route is not None and bool((route[1] >= 0).any()):
        t = route[1].to(ce.device).repeat_interleave(x.shape[1])      # (B*S,): rows are (b, s)
        rl = sum(F.cross_entropy(lg.float(), t, ignore_index=-1) for lg in out.router_logits)
        loss = loss + route[0] * rl / len(out.router_logits)
    return loss, float(ce.detach()), float(z.detach())


@torch.no_grad()
def _evaluate(engine, windows: torch.Tensor, opts: TrainOptions, dist: DistInfo) -> Optional[float]:
    """Mean held-out cross-entropy per token over ``windows`` (all ranks together); None without windows."""
    if windows.shape[0] == 0:
        return None
    engine.eval()
    total, count = 0.0, 0
    mine = windows[dist.rank::dist.world_size]
    B = opts.micro_batch_size
    # Every rank must run the same number of forwards (ZeRO-3 gathers are collective).
    n_batches = math.ceil(math.ceil(windows.shape[0] / dist.world_size) / B)
    for i in range(n_batches):
        chunk = mine[i * B:(i + 1) * B]
        real = chunk.shape[0]
        if real == 0:
            chunk = windows[:1]
        chunk = chunk.to(dist.device)
        out = engine(chunk[:, :-1])
        logits = out.logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        if real:
            total += float(ce)
            count += real * (chunk.shape[1] - 1)
    engine.train()
    total, count = all_reduce_sum([total, count], dist.device)
    return total / max(count, 1)


# ---------------------------------------------------------------------------- frozen tensors and export
def _param_values(engine, spec: RunSpec, counter: list,
                  chosen: Optional[dict] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, fp32 value)`` of every parameter, one at a time (collective: every rank runs it):
    trainable ones from ``chosen`` (selected values, training/selection.py) or else the optimizer's
    fp32 master copy, frozen ones from the reference after
    checking that the module's copy still equals it bit for bit (``counter[0]`` counts them)."""
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            yield n, (chosen[n].clone() if chosen is not None else full_fp32(p))
        elif n in spec.frozen_reference:
            cur = gather(p).cpu()
            ref = spec.frozen_reference[n]
            if tuple(cur.shape) != tuple(ref.shape) or not torch.equal(cur, ref.to(cur.dtype)):
                raise TrainingError(f"frozen tensor {n!r} changed during training: it is no longer bit-identical to "
                                    "the public model's (refusing to write a checkpoint that cannot be merged)")
            counter[0] += 1
            yield n, ref.float()
        else:
            yield n, gather(p).float().cpu().clone()


def _export(r: _Run, final: Path) -> int:
    """Write the final HF checkpoint into ``final`` (main rank; every rank gathers): one
    parameter at a time (ZeRO-3: ``GatheredParameters`` on that tensor only), in shards of at
    most ``--max-shard-size``, atomically; then the spec's ``finalize_state_dict``. Returns the
    number of frozen tensors verified."""
    spec, counter = r.spec, [0]
    limit = r.opts.max_shard_bytes()
    items = ((k, v.to(spec.save_dtype)) for k, v in export_items(r.engine.module, _param_values(
        r.engine, spec, counter, r.selection.values if r.selection is not None else None)))
    if r.dist.is_main:
        save_state_dict(spec.final_config(), items, final, limit, dtype=spec.save_dtype)
        if spec.finalize_state_dict is not None:
            hf, info = spec.finalize_state_dict(lazy_state_dict(final))
            r.log.run.update(info)
            save_state_dict(spec.final_config(), hf, final, limit, dtype=spec.save_dtype)
    else:
        for _ in items:
            pass
    return counter[0]


# ---------------------------------------------------------------------------- the run
def _build_model(spec: RunSpec, ds_cfg: dict, dist: DistInfo, use_bf16: bool) -> None:
    """Build ``spec.build``'s model into ``spec.model`` and its lazy frozen reference.

    Under ZeRO-3 the model is built on the meta device and each parameter is materialised from
    the source and partitioned at once (:func:`~.modeling.build_model` with
    :func:`~.distributed.zero3_partitioner`: DeepSpeed's ``zero.Init`` conversion, in the
    engine's dtype, on this rank's device), so no rank ever holds more than one full tensor.
    ZeRO 0-2 replicate the parameters anyway: the model is built whole, on CPU in fp32.
    """
    b = spec.build
    zero3 = zero_stage_of(ds_cfg) == 3
    partition = zero3_partitioner(ds_cfg) if zero3 else None
    dtype = torch.bfloat16 if zero3 and use_bf16 else torch.float32
    model = build_model(b.config, b.source, b.prepare, device=dist.device if zero3 else "cpu", dtype=dtype,
                        partition=partition)
    shapes = {n: param_shape(p) for n, p in model.named_parameters() if not p.requires_grad}
    spec.model = model
    spec.frozen_reference = LazyTensors(shapes, lambda n: param_value(b.source, n, shapes[n]).float())


def _params_held(model, dist: DistInfo) -> dict:
    """Measured, per rank (collective): the parameter elements each rank holds (``param.data``,
    empty for a partitioned parameter, plus its ZeRO-3 partition ``ds_tensor``) against the full
    model's. A parameter ZeRO-3 persists (below ``stage3_param_persistence_threshold``) counts whole."""
    local = sum(p.data.numel() + (int(p.ds_tensor.numel()) if getattr(p, "ds_tensor", None) is not None else 0)
                for p in model.parameters())
    mine = [0.0] * dist.world_size
    mine[dist.rank] = float(local)
    per_rank = [int(x) for x in all_reduce_sum(mine, dist.device)]
    full = sum(param_numel(p) for p in model.parameters())
    return {"per_rank_elements": per_rank, "full_elements": full,
            "per_rank_fraction": [x / max(full, 1) for x in per_rank]}


def _build_engine(r: _Run) -> None:
    """Wrap the model in a DeepSpeed engine with AdamW; load a resumed run's state into it."""
    import deepspeed

    model, opts = r.spec.model, r.opts
    named = named_trainable(model)
    if not named:
        raise TrainingError("nothing to train: every parameter is frozen")
    if r.zero_stage == 3 and not any(parametrize.is_parametrized(m) for m in model.modules()):
        # FlexMoE reads its children's parameters without calling them: gather them all at
        # the FlexMoE call. (A parametrized model is left alone: each parametrization module
        # is called when its tensor is read, which gathers its parameters.)
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [FlexMoE])
    if opts.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        model.to(r.dist.device)
    decay = [p for n, p in named if len(param_shape(p)) >= 2 and opts.weight_decay > 0]
    no_decay = [p for n, p in named if not (len(param_shape(p)) >= 2 and opts.weight_decay > 0)]
    groups = [g for g in ({"params": decay, "weight_decay": opts.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=r.ds_cfg,
                                           dist_init_required=False)
    if r.resume is not None:
        r.start_step = int(r.resume["meta"]["step"])
        load_engine_state(engine, r.work, r.resume)
    r.engine = engine


def _run_record(r: _Run, argv: Optional[Sequence[str]]) -> dict:
    """The initial ``run.json`` record."""
    spec, opts, dist = r.spec, r.opts, r.dist
    return {
        "command": spec.kind, "argv": list(argv) if argv is not None else sys.argv[1:], "status": "running",
        "out": str(r.out), "start_time": utc_now(),
        "device": str(dist.device), "world_size": dist.world_size, "zero_stage": r.zero_stage,
        "activation_checkpointing": opts.activation_checkpointing,
        "dtype": "bf16" if r.use_bf16 else "fp32", "options": opts.fingerprint(),
        "data": [str(d.path) for d in spec.datas], "global_batch_size": r.sampler.global_batch_size,
        "tokens_per_step": r.tokens_per_step, "params": count_params(spec.model.config),
        "params_trainable": sum(param_numel(p) for _, p in named_trainable(spec.model)),
        "params_held": _params_held(spec.model, dist), "max_shard_size": opts.max_shard_size,
        "flops_per_token": spec.flops_per_token, "resumed_from_step": r.start_step if r.resume else None,
        "inputs": r.inputs,
        "versions": versions(), **spec.run_info,
    }


def _train_step(r: _Run, step: int, use_z: bool, stop_requested: bool) -> tuple[dict, bool]:
    """One optimizer step (all micro-batches); returns its metrics record and whether any rank asked to stop."""
    engine, opts, dist = r.engine, r.opts, r.dist
    t0 = time.perf_counter()
    lr = lr_at(step, opts)
    for g in engine.optimizer.param_groups:
        g["lr"] = lr
    batch = r.sampler.global_batch(step)
    targets = torch.tensor(list(r.spec.route_targets))[r.sampler.sources(step)] if r.spec.route_weight else None
    ce_sum = z_sum = 0.0
    for micro in range(opts.grad_accum):
        mb = r.sampler.micro_batch(step, micro, dist.rank, batch).to(dist.device)
        route = None if targets is None else (r.spec.route_weight, r.sampler.micro_batch(step, micro, dist.rank, targets))
        loss, ce, z = _loss(engine, mb, opts, use_z, route)
        engine.backward(loss)
        engine.step()
        ce_sum += ce
        z_sum += z
    ce_all, z_all, flag = all_reduce_sum([ce_sum, z_sum, float(stop_requested)], dist.device)
    n = opts.grad_accum * dist.world_size
    dt = time.perf_counter() - t0
    gn = engine.get_global_grad_norm()
    rec = {"step": step + 1, "loss": ce_all / n, "z_loss": z_all / n, "lr": lr,
           "grad_norm": float(gn) if gn is not None else None, "tokens": (step + 1) * r.tokens_per_step,
           "step_time_s": dt, "tokens_per_s": r.tokens_per_step / dt, "time": time.time()}
    if not math.isfinite(rec["loss"]):
        raise TrainingError(f"loss became {rec['loss']} at step {step + 1}; lower --lr")
    return rec, flag > 0


def _report_step(r: _Run, rec: dict, bar) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    elif r.dist.is_main and r.opts.log_every and (rec["step"] % r.opts.log_every == 0 or rec["step"] == 1):
        print(f"[{r.spec.kind}] step {rec['step']}/{r.opts.steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
              f"tok/s {rec['tokens_per_s']:.0f}", flush=True)


def _run_steps(r: _Run) -> None:
    """Train from ``r.start_step`` until ``--steps``, ``--max-steps-this-run`` or a stop signal."""
    opts = r.opts
    use_z = getattr(r.spec.model.config, "num_experts", 1) > 1 and opts.z_loss_weight > 0
    bar = None
    if opts.progress and r.dist.is_main:
        from tqdm import tqdm

        bar = tqdm(total=opts.steps, initial=r.start_step, desc=r.spec.kind, unit="step", dynamic_ncols=True)
    stop_at = opts.steps if opts.max_steps_this_run is None else min(opts.steps, r.start_step + opts.max_steps_this_run)
    r.step = r.start_step
    with _Stop() as stopper:
        while r.step < stop_at:
            rec, stop = _train_step(r, r.step, use_z, stopper.requested)
            r.step += 1
            r.last_loss = rec["loss"]
            r.log.metric(monitor_step(r, rec))  # + TFLOP/s, MFU, memory; DeepSpeed's monitor
            _report_step(r, rec, bar)
            if opts.eval_every and r.step % opts.eval_every == 0 and r.step < opts.steps:
                vl = _validate(r)
                if vl is not None:
                    r.log.metric({"step": r.step, "val_loss": vl, "time": time.time()})
                    if r.selection is not None and r.selection.observe(r.step, vl, lambda: _trainable_values(r),
                                                                       r.spec.select):
                        r.stopped_early = True
                        print(f"[{r.spec.kind}] stopping early at step {r.step}: no validation improvement in "
                              f"{r.spec.select.patience} evaluations (best {r.selection.best_loss:.4f} at step "
                              f"{r.selection.best_step})", flush=True)
                        break
            if stop:
                break
            if opts.save_every and r.step % opts.save_every == 0 and r.step < stop_at:
                _save_state(r)
    if bar is not None:
        bar.close()


def _save_state(r: _Run) -> None:
    """The resumable state (and the selection's, written first: a resume checks their steps agree)."""
    if r.selection is not None and r.dist.is_main:
        r.selection.save(r.work, r.step)
    save_state(r.engine, r.spec.kind, r.dist, r.work, r.step, r.opts, r.inputs)
    r.state_saved = True


def _validate(r: _Run) -> Optional[float]:
    """The validation loss of the current values, with the selection's top-k when it has one."""
    k = r.spec.select.eval_top_k if r.spec.select is not None else None
    with validation_top_k(r.spec.model, k):
        return _evaluate(r.engine, r.windows, r.opts, r.dist)


def _trainable_values(r: _Run) -> dict:
    """``{name: fp32 CPU value}`` of the trainable parameters (collective under ZeRO)."""
    return {n: full_fp32(p) for n, p in named_trainable(r.engine.module)}


def _start_selection(r: _Run) -> None:
    """With ``spec.select``: validate the starting values (a fresh run) or reload the selection
    of a resumed one. ``TrainingError`` when there is no validation data."""
    if r.spec.select is None:
        return
    if r.windows.shape[0] == 0:
        raise TrainingError("keeping the best validated values needs validation windows: a --data / --val-data "
                            "with held-out tokens of at least --seq-len + 1, and --eval-batches >= 1")
    if r.resume is not None:
        r.selection = SelectionState.load(r.work, r.start_step)
        return
    loss = _validate(r)
    r.log.metric({"step": 0, "val_loss": loss, "time": time.time()})
    r.selection = SelectionState.start(loss, _trainable_values(r))
    print(f"[{r.spec.kind}] validation before training: {loss:.4f}", flush=True)


def _pause(r: _Run) -> None:
    """Save the resumable state and mark the run paused (``--max-steps-this-run`` or a signal)."""
    _save_state(r)
    if r.dist.is_main:
        r.log.update(status="paused", step=r.step, elapsed_s=time.perf_counter() - r.t_run)
        print(f"[{r.spec.kind}] paused at step {r.step}/{r.opts.steps}; run the same command again to resume "
              f"(state in {r.work})", flush=True)
    barrier()


def _finish(r: _Run) -> None:
    """Final evaluation, frozen-tensor check, export; the checkpoint replaces ``OUT`` in one step."""
    spec, engine, step = r.spec, r.engine, r.step
    val = _validate(r) if r.opts.eval_batches else None
    if val is not None and (r.selection is None or r.selection.history[-1][0] != step):
        r.log.metric({"step": step, "val_loss": val, "time": time.time()})
        if r.selection is not None:
            r.selection.observe(step, val, lambda: _trainable_values(r), spec.select)
    if r.selection is not None:
        val = r.selection.best_loss          # the exported values' validation loss
        r.log.run["selection"] = r.selection.record(spec.select)
        print(f"[{spec.kind}] keeping the values of step {r.selection.best_step} "
              f"({'trained' if r.selection.kept_trained else 'the start: no step improved validation'}): "
              f"validation {r.selection.start_loss:.4f} -> {r.selection.best_loss:.4f}", flush=True)
    final = r.work / "final"
    if r.dist.is_main and final.exists():
        shutil.rmtree(final)
    n_frozen = _export(r, final)
    if r.dist.is_main:
        copy_tokenizer_files(spec.tokenizer_src, final)
        r.log.update(status="finished", step=step, end_time=utc_now(), elapsed_s=time.perf_counter() - r.t_run,
                     final_train_loss=r.last_loss, final_val_loss=val, tokens=step * r.tokens_per_step,
                     total_flops=spec.flops_per_token * step * r.tokens_per_step, frozen_tensors_verified=n_frozen)
        shutil.copyfile(r.log.run_path, final / "run.json")
        shutil.copyfile(r.log.metrics_path, final / "metrics.jsonl")
        if (r.work / MONITOR_DIR).is_dir():  # the CSV monitor's files
            shutil.copytree(r.work / MONITOR_DIR, final / MONITOR_DIR)
        replace_directory(final, r.out)
        shutil.rmtree(r.work, ignore_errors=True)
        print(f"[{spec.kind}] done: {step} steps, train loss {r.last_loss:.4f}"
              + (f", val loss {val:.4f}" if val is not None else "") + f" -> {r.out}", flush=True)
    barrier()


def _setup(spec: RunSpec, opts: TrainOptions) -> _Run:
    """Validate, initialise the process group, decide resume vs. restart, build the data sources."""
    opts.validate()
    out = Path(spec.out).resolve()
    work = out.with_name(out.name + ".inprogress")
    dist = init_distributed(opts.device)
    # The run's own random stream (dropout and the like; CPU and every CUDA device): from --seed, the
    # same on every rank, and a resumed run continues the saved one (load_engine_state).
    torch.manual_seed(opts.seed)
    use_bf16 = dist.device.type == "cuda" and opts.dtype != "fp32" and torch.cuda.is_bf16_supported()
    if opts.dtype == "bf16" and dist.device.type != "cuda":
        raise TrainingError("--dtype bf16 is for CUDA; CPU training runs in fp32")
    cfg = add_monitors(ds_config(opts, dist.world_size, use_bf16), opts, work, spec.kind)  # training/monitoring.py
    if spec.build is not None:
        _build_model(spec, cfg, dist, use_bf16)
    if spec.model is None:
        raise TrainingError("internal error: the RunSpec has neither a model nor a build")
    inputs = {"--data": [data_identity(d) for d in spec.datas], **spec.inputs}
    if spec.val_datas:
        inputs["--val-data"] = [data_identity(d) for d in spec.val_datas]
    resume = open_work_dir(out, work, spec.kind, spec.model, opts, dist, zero_stage_of(cfg), inputs)
    sampler = BatchSampler(spec.datas, opts.seq_len, opts.micro_batch_size, opts.grad_accum, dist.world_size, opts.seed)
    windows = torch.empty(0, opts.seq_len + 1, dtype=torch.long)
    if opts.eval_batches:
        windows = eval_windows(spec.val_datas or spec.datas, opts.seq_len, opts.eval_batches * opts.micro_batch_size,
                               splits=("train", "val") if spec.val_datas else ("val",))
    return _Run(spec=spec, opts=opts, dist=dist, out=out, work=work, sampler=sampler, windows=windows,
                use_bf16=use_bf16, ds_cfg=cfg, zero_stage=zero_stage_of(cfg), resume=resume, log=RunLog(work, dist.is_main), state_saved=resume is not None,
                inputs=inputs)


def train(spec: RunSpec, opts: TrainOptions, argv: Optional[Sequence[str]] = None) -> int:
    """Run (or resume) a training job; returns 0 when finished or paused (see ``run.json`` status).

    Raises TrainingError (or ValueError for invalid options) before anything is written when the
    run cannot start. A work directory this call created is removed again if the run fails
    before its first optimizer step; a later failure (a save included) keeps it, with the last
    resumable state that was saved, and marks ``run.json`` ``failed``. The process group
    :func:`init_distributed` created is torn down on every rank before returning
    (:func:`release_distributed`; after a barrier when the run succeeded), so no rank leaves
    while another still uses it.
    """
    ok = False
    try:
        rc = _train(spec, opts, argv)
        ok = True
        return rc
    finally:
        release_distributed(sync=ok)


def _train(spec: RunSpec, opts: TrainOptions, argv: Optional[Sequence[str]]) -> int:
    """:func:`train` within the process group (set up here by :func:`_setup`)."""
    r = _setup(spec, opts)
    created_work = False
    if r.dist.is_main and not r.work.exists():
        r.work.mkdir(parents=True)
        created_work = True
    barrier()
    try:
        _build_engine(r)
        r.log.start(_run_record(r, argv), r.start_step if r.resume is not None else None)
        r.t_run = time.perf_counter()
        _start_selection(r)
        _run_steps(r)
        if r.step < opts.steps and not r.stopped_early:
            _pause(r)
        else:
            _finish(r)
        return 0
    except BaseException as exc:
        _on_failure(r, created_work, exc)
        raise


def _on_failure(r: _Run, created_work: bool, exc: BaseException) -> None:
    """After an error (main rank): remove a work directory this call created when nothing was
    trained or saved yet; otherwise keep it (its ``state/`` is the last good one) and record the
    error in ``run.json`` (status ``failed``)."""
    if not r.dist.is_main or not r.work.exists():
        return
    if created_work and not r.state_saved and r.step == r.start_step:
        shutil.rmtree(r.work, ignore_errors=True)
        return
    try:
        r.log.update(status="failed", step=r.step, error=f"{type(exc).__name__}: {exc}", end_time=utc_now())
    except Exception as log_exc:  # the error being raised matters more than the log
        print(f"[{r.spec.kind}] could not record the failure in run.json: {log_exc}", file=sys.stderr, flush=True)
