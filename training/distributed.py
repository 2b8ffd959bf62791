"""Distributed set-up for training: ``torch.distributed`` + DeepSpeed, and the DeepSpeed config.

* :func:`init_distributed` initialises ``torch.distributed`` (NCCL on CUDA, gloo on CPU) from the
  launcher's environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``:
  the ``deepspeed`` launcher, ``torchrun``) or, without a launcher, as a 1-process group on a
  free local port; then DeepSpeed's communication layer on top of it (no second init).
  :func:`release_distributed` undoes that at the end of a run: it destroys the process group
  :func:`init_distributed` created (on every rank, after a barrier, so no rank exits while
  another still uses the group) and the launcher variables it set, so a later run or child
  process of the same interpreter starts clean.
* :func:`ds_config`: ``training/configs/zero{0,1,2,3}.json`` (or ``--deepspeed-config``) with the
  ``"auto"`` entries filled from the command line.
* :func:`zero3_partitioner`: ZeRO-3 partitioning of one parameter at a time (the model is built
  on the meta device and materialised parameter by parameter, see
  :func:`training.modeling.build_model`), with the settings ``deepspeed.zero.Init`` takes from
  the DeepSpeed config; :func:`param_numel` / :func:`param_shape`: full sizes of a possibly
  partitioned parameter.
* :func:`barrier` / :func:`all_reduce_sum`: no-ops in a 1-process group.

Used by the training loop and by ``benchmarks/bench_e2e.py`` (one set-up for both).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from flexmoe_kernels.utils.net import free_port

from .options import TrainingError, TrainOptions

__all__ = ["CONFIG_DIR", "DistInfo", "all_reduce_sum", "barrier", "child_env", "ds_config", "init_distributed",
           "param_numel", "param_shape", "release_distributed", "resolve_device", "zero3_partitioner"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# The launcher variables this process set itself (no launcher): child processes must not inherit them.
_SET_HERE: dict = {}
# Whether init_distributed created the process group itself (launcher or not).
_GROUP_CREATED_HERE = [False]


@dataclass
class DistInfo:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launched: bool  # False: a single process without a launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when torch sees one, else cpu; ``cuda`` without a GPU raises TrainingError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was requested but torch sees no CUDA device")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed and DeepSpeed (idempotent) and return this process's rank and device.

    ``device`` is ``auto``, ``cpu`` or ``cuda``. On CPU, sets ``DS_ACCELERATOR=cpu`` before
    DeepSpeed is imported and disables DeepSpeed's shared-memory collective extension (a ~75 s
    JIT compile on first use; gloo is enough) unless ``FLEXMOE_DS_SHM=1``.
    """
    import torch.distributed as dist

    dev = resolve_device(device)
    if dev.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    launched = not _SET_HERE and "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched and not _SET_HERE:
        _SET_HERE.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": str(free_port())})
        os.environ.update(_SET_HERE)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        _GROUP_CREATED_HERE[0] = True
    import deepspeed  # noqa: F401  (after DS_ACCELERATOR is set)
    import deepspeed.ops

    if dev.type == "cpu" and os.environ.get("FLEXMOE_DS_SHM", "0") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, dist_init_required=False)
    return DistInfo(rank, world, local_rank, dev, backend, launched)


def release_distributed(sync: bool = True) -> None:
    """Undo what :func:`init_distributed` set up: destroy the process group it created (through
    DeepSpeed, which also drops its cached sub-groups) and remove from ``os.environ`` the
    launcher variables it put there (those still holding its values).

    ``sync``: wait at a barrier first (every rank must then call it; also with a group the caller
    created), so that no rank tears the group down, exits or starts the caller's next run while
    another is still in a collective or writing; pass False on an error path,
    where the other ranks may never get there. Afterwards the process has no process group of
    its own (one made by the caller before :func:`init_distributed` is left alone), so its exit,
    child processes it starts and a later :func:`init_distributed` behave as in a fresh
    interpreter. A no-op when nothing was set up here.
    """
    import torch.distributed as dist

    if sync and dist.is_available() and dist.is_initialized():
        # Every rank finishes this run before any goes on (to exit, to tear the group down, or to
        # the caller's next run): a rank that exits or destroys a gloo group while its peer still
        # writes the final checkpoint aborts the peer ("terminate called without an active
        # exception", seen with a caller-owned group in two processes).
        barrier()
    if _GROUP_CREATED_HERE[0]:
        import deepspeed.comm

        if dist.is_initialized():
            deepspeed.comm.destroy_process_group()
        _GROUP_CREATED_HERE[0] = False
    for k, v in _SET_HERE.items():
        if os.environ.get(k) == v:
            del os.environ[k]
    _SET_HERE.clear()


def child_env(env: dict) -> dict:
    """``env`` without the launcher variables :func:`init_distributed` set in this process (a child
    process would otherwise take them for a launcher's and rendezvous on this process's port)."""
    return {k: v for k, v in env.items() if not (k in _SET_HERE and _SET_HERE[k] == v)}


def barrier() -> None:
    """``dist.barrier()`` when more than one process takes part."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], device) -> list[float]:
    """Sum ``values`` (float64) over all processes; the input itself in a 1-process group."""
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise TrainingError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainingError(f"DeepSpeed config {str(path)!r} is not valid JSON: {exc}") from exc
    return {k: v for k, v in cfg.items() if not k.startswith("_")}  # "_comment" etc.


def ds_config(opts: TrainOptions, world_size: int, use_bf16: bool) -> dict:
    """The DeepSpeed config: the shipped ZeRO file (or ``--deepspeed-config``) with "auto" filled in.

    Raises TrainingError when the file is missing or invalid, contradicts the command line, or
    has an ``optimizer`` / ``scheduler`` section (those come from the command line).
    """
    path = Path(opts.deepspeed_config) if opts.deepspeed_config else CONFIG_DIR / f"zero{opts.zero_stage}.json"
    cfg = _read_config(path)
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


def zero3_partitioner(cfg: dict):
    """A function ``partition(param)`` that turns a full parameter into a ZeRO-3 partitioned one
    (DeepSpeed's ``zero.Init`` conversion: the parameter keeps only this rank's 1/N slice in
    ``param.ds_tensor``, ``param.data`` becomes empty). Every rank must pass the same values in
    the same order (no broadcast is done: they are read from the same files / seeds)."""
    import deepspeed

    init = deepspeed.zero.Init(config_dict_or_path=cfg)

    def partition(param) -> None:
        init._convert_to_deepspeed_param(param)
        param.partition()

    return partition


def param_numel(p: torch.Tensor) -> int:
    """Elements of the full parameter (``ds_numel`` of a ZeRO-3 partitioned one)."""
    return int(getattr(p, "ds_numel", p.numel()))


def param_shape(p: torch.Tensor) -> tuple:
    """Shape of the full parameter (``ds_shape`` of a ZeRO-3 partitioned one)."""
    return tuple(getattr(p, "ds_shape", p.shape))
