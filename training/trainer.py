"""The DeepSpeed training loop shared by every training command.

Legend: B micro-batch (sequences per rank), S sequence length, G global batch, V vocabulary.

* Distributed: ``torch.distributed`` is initialised here (NCCL on CUDA, gloo on CPU) from the
  launcher's environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``:
  the ``deepspeed`` launcher, ``torchrun``) or, without a launcher, as a 1-process group on a
  free local port; then ``deepspeed.initialize(..., dist_init_required=False)``.
* DeepSpeed config: ``training/configs/zero{0,1,2,3}.json`` (or ``--deepspeed-config``); the
  ``"auto"`` entries are filled from the command line. bf16 on CUDA (when supported), fp32 on CPU.
* Optimiser: AdamW (betas 0.9/0.95) over the trainable parameters only (frozen ones get no
  state and no gradient); weight decay on matrices only; learning rate set every step from a
  linear warm-up + cosine schedule (:func:`lr_at`), so the schedule needs no saved state.
* Loss: next-token cross-entropy + ``z_loss_weight * sum over layers router_z_loss(logits)``
  (only for models with more than one expert).
* Output: the run works in ``OUT.inprogress/`` (metrics.jsonl, run.json, ``state/`` = the last
  resumable checkpoint: HF weights in fp32 + optimizer moments in safetensors + JSON). At the
  end the final HF checkpoint, run.json and metrics.jsonl are renamed to ``OUT`` in one step.
  Running the same command again after a kill resumes from ``state/``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from flexmoe_kernels import router_z_loss
from flexmoe_kernels.modules import FlexMoE

from .data import BatchSampler, DataDir, copy_tokenizer_files, eval_windows
from .modeling import export_state_dict, model_from_state_dict

__all__ = ["TrainOptions", "RunSpec", "DistInfo", "init_distributed", "lr_at", "train", "TrainingError", "write_json_atomic"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STATE_FORMAT = "flexmoe-train-state-v1"


class TrainingError(RuntimeError):
    """A training run cannot start or continue (message says why and what to do)."""


# ---------------------------------------------------------------------------- options
@dataclass
class TrainOptions:
    """Hyper-parameters and run control shared by the training commands (CLI flags of the same name)."""

    steps: int = 100
    seq_len: int = 128
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    z_loss_weight: float = 1e-3
    zero_stage: int = 0
    deepspeed_config: Optional[str] = None
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 8
    save_every: int = 0
    max_steps_this_run: Optional[int] = None
    log_every: int = 10
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    overwrite: bool = False
    restart: bool = False

    @classmethod
    def from_args(cls, args) -> "TrainOptions":
        kw = {f: getattr(args, f) for f in cls.__dataclass_fields__ if hasattr(args, f)}
        return cls(**kw)

    def validate(self) -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a non-negative integer, got {v!r}")
        if self.max_steps_this_run is not None and self.max_steps_this_run <= 0:
            raise ValueError(f"--max-steps-this-run must be positive, got {self.max_steps_this_run}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.clip < 0 or self.z_loss_weight < 0:
            raise ValueError("--weight-decay, --clip and --z-loss-weight must be >= 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")

    def fingerprint(self) -> dict:
        """The options that must not change when a run is resumed."""
        keys = ("steps", "seq_len", "micro_batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps",
                "weight_decay", "clip", "z_loss_weight", "seed")
        return {k: getattr(self, k) for k in keys}


def lr_at(step: int, opts: TrainOptions) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``,
    then cosine decay from ``lr`` to ``lr * min_lr_ratio`` at ``steps``."""
    if opts.warmup_steps and step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    span = max(1, opts.steps - opts.warmup_steps)
    t = min(1.0, (step - opts.warmup_steps) / span)
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launched: bool  # False: a single process without a launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was requested but torch sees no CUDA device")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed (idempotent) and return this process's rank and device.

    On CPU, sets ``DS_ACCELERATOR=cpu`` before DeepSpeed is imported and disables DeepSpeed's
    shared-memory collective extension (a ~75 s JIT compile on first use; gloo is enough).
    """
    import torch.distributed as dist

    dev = resolve_device(device)
    if dev.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    import deepspeed  # noqa: F401  (after DS_ACCELERATOR is set)
    import deepspeed.ops

    if dev.type == "cpu" and os.environ.get("FLEXMOE_DS_SHM", "0") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, dist_init_required=False)
    return DistInfo(rank, world, local_rank, dev, backend, launched)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_reduce_sum(values: Sequence[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------- files
def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_hf(config, sd: Mapping[str, torch.Tensor], directory: Path) -> None:
    """Write an HF FlexOlmo checkpoint (atomic, via ``FlexOlmoForCausalLM.save_pretrained``)."""
    model_from_state_dict(config, sd).save_pretrained(directory)


def ds_config(opts: TrainOptions, world_size: int, use_bf16: bool) -> dict:
    """The DeepSpeed config: the shipped ZeRO file (or ``--deepspeed-config``) with "auto" filled in."""
    path = Path(opts.deepspeed_config) if opts.deepspeed_config else CONFIG_DIR / f"zero{opts.zero_stage}.json"
    if not path.is_file():
        raise TrainingError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainingError(f"DeepSpeed config {str(path)!r} is not valid JSON: {exc}") from exc
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # "_comment" etc.
    fill = {
        "train_micro_batch_size_per_gpu": opts.micro_batch_size,
        "gradient_accumulation_steps": opts.grad_accum,
        "train_batch_size": opts.micro_batch_size * opts.grad_accum * world_size,
        "gradient_clipping": opts.clip,
    }
    for k, v in fill.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
        elif cfg[k] != v:
            raise TrainingError(f"DeepSpeed config {str(path)!r} sets {k}={cfg[k]}, but the command line implies {v}")
    cfg.setdefault("bf16", {})
    if cfg["bf16"].get("enabled", "auto") == "auto":
        cfg["bf16"]["enabled"] = bool(use_bf16)
    cfg.setdefault("fp16", {"enabled": False})
    for k in ("optimizer", "scheduler"):
        if k in cfg:
            raise TrainingError(f"DeepSpeed config {str(path)!r} has an {k!r} section; the optimizer and schedule "
                                "come from the command line (AdamW, warm-up + cosine)")
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


# ---------------------------------------------------------------------------- optimizer state I/O
def _inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _full_fp32(p: torch.Tensor) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    v = safe_get_full_fp32_param(p)
    return (p.detach() if v is None else v).float().cpu().clone()


def _full_state(engine, p: torch.Tensor, key: str) -> Optional[torch.Tensor]:
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        v = safe_get_full_optimizer_state(p, key)
        return None if v is None else v.float().cpu().clone()
    st = engine.optimizer.state.get(p, {})
    return st[key].float().cpu().clone() if key in st else None


def _adam_step(engine) -> float:
    for st in _inner_optimizer(engine).state.values():
        if "step" in st:
            s = st["step"]
            return float(s.item() if isinstance(s, torch.Tensor) else s)
    return 0.0


def _restore_optimizer(engine, named: Sequence[tuple[str, torch.Tensor]], fp32: Mapping[str, torch.Tensor],
                       moments: Mapping[str, torch.Tensor], adam_step: float) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    inner = _inner_optimizer(engine)
    # Optimizer states are created lazily at the first step: create them (zeros) now so the
    # saved moments can be written into them, and let DeepSpeed link its fragments to them.
    flat = [fp for g in inner.param_groups for fp in g["params"]]
    flat += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))  # ZeRO-3's master partitions
    for fp in flat:
        st = inner.state[fp]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(float(adam_step))
            st["exp_avg"] = torch.zeros_like(fp, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(fp, memory_format=torch.preserve_format)
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in named:
        zero = hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")
        if zero:
            safe_set_full_fp32_param(p, fp32[name].to(p.device))
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, moments[f"{key}.{name}"].to(p.device), key)
        else:
            with torch.no_grad():
                p.copy_(fp32[name].to(p.dtype))
            st = engine.optimizer.state[p]
            st["exp_avg"] = moments[f"exp_avg.{name}"].to(device=p.device, dtype=p.dtype).clone()
            st["exp_avg_sq"] = moments[f"exp_avg_sq.{name}"].to(device=p.device, dtype=p.dtype).clone()
            st["step"] = torch.tensor(adam_step, dtype=torch.float32)
    for st in inner.state.values():
        if "step" in st:
            st["step"] = (torch.full_like(st["step"], adam_step) if isinstance(st["step"], torch.Tensor)
                          else type(st["step"])(adam_step))


# ---------------------------------------------------------------------------- the run
@dataclass
class RunSpec:
    """What a command trains and how its result is written."""

    kind: str                         # "public", "expert", "dense", "moe", "router"
    out: Path
    model: torch.nn.Module            # on CPU, fp32, frozen/parametrized as wanted
    datas: Sequence[DataDir]
    tokenizer_src: Path               # a data dir or checkpoint holding the tokenizer description
    frozen_reference: Mapping[str, torch.Tensor]   # param name -> fp32 value it must keep (bit for bit)
    final_config: Callable[[], object]              # -> FlexOlmoConfig of the saved checkpoint
    run_info: dict = field(default_factory=dict)    # extra fields for run.json
    flops_per_token: float = 0.0
    save_dtype: torch.dtype = torch.float32         # dtype of the final checkpoint's tensors
    # Optional last edit of the exported HF state dict before it is written (main rank only):
    # sd -> (sd, extra run.json fields). train-public sets the public router row here.
    finalize_state_dict: Optional[Callable[[dict], tuple[dict, dict]]] = None


class _Stop:
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


def _named_trainable(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _export_values(engine, spec: RunSpec, dist: DistInfo) -> dict[str, torch.Tensor]:
    """Per-parameter fp32 values: trainable ones from the optimizer's fp32 master copy, frozen
    ones from the reference (checked equal to the module's copy by :func:`_verify_frozen`)."""
    model = engine.module
    values: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            values[n] = _full_fp32(p)
        elif n in spec.frozen_reference:
            values[n] = spec.frozen_reference[n]
        else:
            values[n] = _gather(p).float().cpu().clone()
    return values


def _gather(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().cpu().clone()
    return p.detach()


def _verify_frozen(engine, spec: RunSpec) -> int:
    """Every frozen parameter still equals its reference bit for bit (in the module's dtype)."""
    n_checked = 0
    for n, p in engine.module.named_parameters():
        if p.requires_grad or n not in spec.frozen_reference:
            continue
        cur = _gather(p).cpu()
        ref = spec.frozen_reference[n].to(cur.dtype)
        if cur.shape != ref.shape or not torch.equal(cur, ref):
            raise TrainingError(f"frozen tensor {n!r} changed during training: it is no longer bit-identical to the "
                                "public model's (refusing to write a checkpoint that cannot be merged)")
        n_checked += 1
    return n_checked


def _save_state(engine, spec: RunSpec, dist: DistInfo, work: Path, step: int, opts: TrainOptions,
                extra_state: dict) -> None:
    """Write ``work/state`` atomically: fp32 trainable weights, Adam moments, RNG (safetensors) and
    the step / options (JSON). Frozen tensors are not saved: they are rebuilt from the inputs."""
    from safetensors.torch import save_file

    values = {n: _full_fp32(p) for n, p in _named_trainable(engine.module)}
    moments: dict[str, torch.Tensor] = {}
    for n, p in _named_trainable(engine.module):
        for key in ("exp_avg", "exp_avg_sq"):
            v = _full_state(engine, p, key)
            moments[f"{key}.{n}"] = v if v is not None else torch.zeros(p.shape if not hasattr(p, "ds_shape") else p.ds_shape)
    adam_step = _adam_step(engine)
    if dist.is_main:
        tmp = Path(tempfile.mkdtemp(prefix=".state.tmp-", dir=work))
        try:
            save_file({n: v.contiguous() for n, v in values.items()}, str(tmp / "trainable.safetensors"), metadata={"format": STATE_FORMAT})
            save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / "optimizer.safetensors"),
                      metadata={"format": STATE_FORMAT})
            save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
            write_json_atomic(tmp / "trainer_state.json", {
                "format": STATE_FORMAT, "step": step, "adam_step": adam_step, "options": opts.fingerprint(),
                "kind": spec.kind, "world_size": dist.world_size, "zero_stage": opts.zero_stage, **extra_state})
            old = work / "state"
            if old.exists():
                trash = work / f".state.old-{os.getpid()}"
                os.replace(old, trash)
                os.replace(tmp, old)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _barrier()


def _load_state(work: Path, spec: RunSpec, opts: TrainOptions) -> Optional[dict]:
    from safetensors.torch import load_file

    st_dir = work / "state"
    if not (st_dir / "trainer_state.json").is_file():
        return None
    try:
        meta = json.loads((st_dir / "trainer_state.json").read_text())
        if meta.get("format") != STATE_FORMAT:
            raise TrainingError(f"{st_dir} has format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        params = load_file(str(st_dir / "trainable.safetensors"))
        moments = load_file(str(st_dir / "optimizer.safetensors"))
        rng = load_file(str(st_dir / "rng.safetensors"))["torch_rng"]
    except TrainingError:
        raise
    except Exception as exc:
        raise TrainingError(f"cannot resume: the saved state in {str(st_dir)!r} is unreadable ({exc}); "
                            f"pass --restart to start over") from exc
    if meta.get("kind") != spec.kind:
        raise TrainingError(f"{str(work)!r} holds a {meta.get('kind')!r} run, not {spec.kind!r}")
    if meta["options"] != opts.fingerprint():
        diff = {k: (meta["options"].get(k), v) for k, v in opts.fingerprint().items() if meta["options"].get(k) != v}
        raise TrainingError(f"cannot resume {str(work)!r}: options changed since it was started (saved, now): {diff}; "
                            "use the same options, or --restart to start over")
    names = {n for n, _ in _named_trainable(spec.model)}
    if set(params) != names:
        raise TrainingError(f"cannot resume {str(work)!r}: its trainable tensors do not match this model's")
    for n, p in _named_trainable(spec.model):
        if tuple(params[n].shape) != tuple(p.shape):
            raise TrainingError(f"cannot resume {str(work)!r}: {n!r} has shape {tuple(params[n].shape)}, "
                                f"the model needs {tuple(p.shape)}")
    return {"meta": meta, "params": params, "moments": moments, "rng": rng}


def _model_flops(model) -> dict:
    cfg = model.config
    from .modeling import count_params

    return count_params(cfg)


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("deepspeed", "flexmoe_kernels"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def _loss(engine, batch: torch.Tensor, opts: TrainOptions, use_z: bool) -> tuple[torch.Tensor, float, float]:
    x, y = batch[:, :-1], batch[:, 1:]
    out = engine(x, output_router_logits=use_z)
    logits = out.logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    z = torch.zeros((), device=ce.device)
    if use_z and out.router_logits:
        z = sum(router_z_loss(lg) for lg in out.router_logits)
    loss = ce + opts.z_loss_weight * z
    return loss, float(ce.detach()), float(z.detach())


@torch.no_grad()
def _evaluate(engine, windows: torch.Tensor, opts: TrainOptions, dist: DistInfo) -> Optional[float]:
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
    total, count = _all_reduce_sum([total, count], dist.device)
    return total / max(count, 1)


def train(spec: RunSpec, opts: TrainOptions, argv: Optional[Sequence[str]] = None) -> int:
    """Run (or resume) a training job; returns 0 when finished or paused (see ``run.json`` status)."""
    opts.validate()
    out = Path(spec.out).resolve()
    work = out.with_name(out.name + ".inprogress")
    dist = init_distributed(opts.device)
    import deepspeed

    if out.exists() and not opts.overwrite:
        raise TrainingError(f"output {str(out)!r} already exists (pass --overwrite to replace it)")
    # A partial run (OUT.inprogress) is resumed when its options match; --restart discards it,
    # --overwrite discards it only when it cannot be resumed.
    resume = None
    if work.exists() and not opts.restart:
        try:
            resume = _load_state(work, spec, opts)
        except TrainingError as exc:
            if not opts.overwrite:
                raise
            if dist.is_main:
                print(f"[{spec.kind}] discarding the partial run in {work}: {exc}", flush=True)
            resume = None
            opts_restart = True
        else:
            opts_restart = False
    else:
        opts_restart = work.exists()
    _barrier()
    if opts_restart and dist.is_main and work.exists():
        shutil.rmtree(work)
    _barrier()
    if resume is not None and dist.is_main:
        print(f"[{spec.kind}] resuming from step {resume['meta']['step']} ({work})", flush=True)
    use_bf16 = dist.device.type == "cuda" and opts.dtype != "fp32" and torch.cuda.is_bf16_supported()
    if opts.dtype == "bf16" and dist.device.type != "cuda":
        raise TrainingError("--dtype bf16 is for CUDA; CPU training runs in fp32")
    cfg = ds_config(opts, dist.world_size, use_bf16)
    sampler = BatchSampler(spec.datas, opts.seq_len, opts.micro_batch_size, opts.grad_accum, dist.world_size, opts.seed)
    windows = eval_windows(spec.datas, opts.seq_len, opts.eval_batches * opts.micro_batch_size) \
        if opts.eval_batches else torch.empty(0, opts.seq_len + 1, dtype=torch.long)

    created_work = False
    if dist.is_main and not work.exists():
        work.mkdir(parents=True)
        created_work = True
    _barrier()
    start_step = 0
    state_saved = resume is not None
    try:
        model = spec.model
        named = _named_trainable(model)
        if not named:
            raise TrainingError("nothing to train: every parameter is frozen")
        if resume is not None:
            start_step = int(resume["meta"]["step"])
            with torch.no_grad():
                for n, p in named:
                    p.copy_(resume["params"][n])
            torch.set_rng_state(resume["rng"])
        if opts.zero_stage == 3 and not any(parametrize.is_parametrized(m) for m in model.modules()):
            # FlexMoE reads its children's parameters without calling them: gather them all at
            # the FlexMoE call. (A parametrized model is left alone: each parametrization module
            # is called when its tensor is read, which gathers its parameters.)
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [FlexMoE])
        model.to(dist.device)
        decay = [p for n, p in named if p.ndim >= 2 and opts.weight_decay > 0]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and opts.weight_decay > 0)]
        groups = [g for g in ({"params": decay, "weight_decay": opts.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), eps=1e-8)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, dist_init_required=False)
        if resume is not None:
            trainable_engine = _named_trainable(engine.module)
            _restore_optimizer(engine, trainable_engine, resume["params"], resume["moments"],
                               float(resume["meta"]["adam_step"]))
        use_z = getattr(model.config, "num_experts", 1) > 1 and opts.z_loss_weight > 0
        params = _model_flops(model)
        tokens_per_step = sampler.global_batch_size * opts.seq_len

        metrics_path = work / "metrics.jsonl"
        if dist.is_main:
            kept = []
            if resume is not None and metrics_path.exists():
                for line in metrics_path.read_text().splitlines():
                    try:
                        if json.loads(line).get("step", 0) <= start_step:
                            kept.append(line)
                    except json.JSONDecodeError:
                        pass
            metrics_path.write_text("".join(x + "\n" for x in kept))
        run = {
            "command": spec.kind, "argv": list(argv) if argv is not None else sys.argv[1:], "status": "running",
            "out": str(out), "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": str(dist.device), "world_size": dist.world_size, "zero_stage": opts.zero_stage,
            "dtype": "bf16" if use_bf16 else "fp32", "options": opts.fingerprint(),
            "data": [str(d.path) for d in spec.datas], "global_batch_size": sampler.global_batch_size,
            "tokens_per_step": tokens_per_step, "params": params,
            "params_trainable": sum(p.numel() for _, p in named),
            "flops_per_token": spec.flops_per_token, "resumed_from_step": start_step if resume else None,
            "versions": _versions(), **spec.run_info,
        }
        if dist.is_main and resume is not None and (work / "run.json").exists():
            try:
                prev = json.loads((work / "run.json").read_text())
                run["resumes"] = prev.get("resumes", []) + [start_step]
            except json.JSONDecodeError:
                pass
        if dist.is_main:
            write_json_atomic(work / "run.json", run)

        bar = None
        if opts.progress and dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=opts.steps, initial=start_step, desc=spec.kind, unit="step", dynamic_ncols=True)
        stop_at = opts.steps if opts.max_steps_this_run is None else min(opts.steps, start_step + opts.max_steps_this_run)
        last = {"loss": None, "val_loss": None}
        t_run = time.perf_counter()

        def log(rec: dict) -> None:
            if dist.is_main:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")

        step = start_step
        with _Stop() as stopper:
            while step < stop_at:
                t0 = time.perf_counter()
                lr = lr_at(step, opts)
                for g in engine.optimizer.param_groups:
                    g["lr"] = lr
                batch = sampler.global_batch(step)
                ce_sum = z_sum = 0.0
                for micro in range(opts.grad_accum):
                    mb = sampler.micro_batch(step, micro, dist.rank, batch).to(dist.device)
                    loss, ce, z = _loss(engine, mb, opts, use_z)
                    engine.backward(loss)
                    engine.step()
                    ce_sum += ce
                    z_sum += z
                ce_all, z_all, flag = _all_reduce_sum([ce_sum, z_sum, float(stopper.requested)], dist.device)
                n = opts.grad_accum * dist.world_size
                step += 1
                dt = time.perf_counter() - t0
                gn = engine.get_global_grad_norm()
                rec = {"step": step, "loss": ce_all / n, "z_loss": z_all / n, "lr": lr,
                       "grad_norm": float(gn) if gn is not None else None, "tokens": step * tokens_per_step,
                       "step_time_s": dt, "tokens_per_s": tokens_per_step / dt, "time": time.time()}
                last["loss"] = rec["loss"]
                if not math.isfinite(rec["loss"]):
                    raise TrainingError(f"loss became {rec['loss']} at step {step}; lower --lr")
                log(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                elif dist.is_main and opts.log_every and (step % opts.log_every == 0 or step == 1):
                    print(f"[{spec.kind}] step {step}/{opts.steps} loss {rec['loss']:.4f} lr {lr:.2e} "
                          f"tok/s {rec['tokens_per_s']:.0f}", flush=True)
                if opts.eval_every and step % opts.eval_every == 0 and step < opts.steps:
                    vl = _evaluate(engine, windows, opts, dist)
                    if vl is not None:
                        last["val_loss"] = vl
                        log({"step": step, "val_loss": vl, "time": time.time()})
                if flag > 0:
                    break
                if opts.save_every and step % opts.save_every == 0 and step < stop_at:
                    _save_state(engine, spec, dist, work, step, opts, {})
                    state_saved = True
        if bar is not None:
            bar.close()

        if step < opts.steps:
            # Paused (--max-steps-this-run or a signal): save the resumable state and stop.
            _save_state(engine, spec, dist, work, step, opts, {})
            if dist.is_main:
                run.update(status="paused", step=step, elapsed_s=time.perf_counter() - t_run)
                write_json_atomic(work / "run.json", run)
                print(f"[{spec.kind}] paused at step {step}/{opts.steps}; run the same command again to resume "
                      f"(state in {work})", flush=True)
            _barrier()
            return 0

        val = _evaluate(engine, windows, opts, dist) if opts.eval_batches else None
        if val is not None:
            log({"step": step, "val_loss": val, "time": time.time()})
        n_frozen = _verify_frozen(engine, spec)
        values = _export_values(engine, spec, dist)
        if dist.is_main:
            hf = {k: v.to(spec.save_dtype) for k, v in export_state_dict(engine.module, values).items()}
            if spec.finalize_state_dict is not None:
                hf, finalize_info = spec.finalize_state_dict(hf)
                run.update(finalize_info)
            final = work / "final"
            if final.exists():
                shutil.rmtree(final)
            save_hf(spec.final_config(), hf, final)
            copy_tokenizer_files(spec.tokenizer_src, final)
            run.update(status="finished", step=step, end_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       elapsed_s=time.perf_counter() - t_run, final_train_loss=last["loss"], final_val_loss=val,
                       tokens=step * tokens_per_step, total_flops=spec.flops_per_token * step * tokens_per_step,
                       frozen_tensors_verified=n_frozen)
            write_json_atomic(work / "run.json", run)
            shutil.copyfile(work / "run.json", final / "run.json")
            shutil.copyfile(metrics_path, final / "metrics.jsonl")
            if out.exists():
                trash = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, trash)
                os.replace(final, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(final, out)
            shutil.rmtree(work, ignore_errors=True)
            print(f"[{spec.kind}] done: {step} steps, train loss {last['loss']:.4f}"
                  + (f", val loss {val:.4f}" if val is not None else "") + f" -> {out}", flush=True)
        _barrier()
        return 0
    except BaseException:
        if dist.is_main and created_work and not state_saved:
            shutil.rmtree(work, ignore_errors=True)
        raise
