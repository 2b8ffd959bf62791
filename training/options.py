"""Options of a training run (the shared ``--steps`` ... ``--restart`` flags) and the schedule.

``TrainOptions`` mirrors the flags of :func:`flexmoe_training.commands.common.add_train_args`
field for field; :func:`lr_at` is the learning-rate schedule (a pure function of the step, so a
resumed run needs no saved scheduler state).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["TrainOptions", "TrainingError", "lr_at"]


class TrainingError(RuntimeError):
    """A training run cannot start or continue (message says why and what to do)."""


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum > 0 else "a non-negative integer"
        raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")


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
    activation_checkpointing: bool = False
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
    max_shard_size: str = "5GB"
    # monitoring (training/monitoring.py); not in the resume fingerprint
    tensorboard: Optional[str] = None
    wandb_project: Optional[str] = None
    peak_tflops: Optional[float] = None

    @classmethod
    def from_args(cls, args) -> "TrainOptions":
        """The options from an argparse namespace (attributes it lacks keep their defaults)."""
        kw = {f: getattr(args, f) for f in cls.__dataclass_fields__ if hasattr(args, f)}
        return cls(**kw)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag of the first invalid option."""
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum"):
            _check_int(getattr(self, name), name, 1)
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "log_every"):
            _check_int(getattr(self, name), name, 0)
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
        self.max_shard_bytes()

    def max_shard_bytes(self) -> int:
        """``--max-shard-size`` in bytes (``"5GB"``, ``"500MB"``, ``"64KiB"`` or a number of bytes);
        ValueError naming the flag."""
        from flexmoe_kernels.models.checkpoint import parse_size

        return parse_size(self.max_shard_size, "--max-shard-size")

    def fingerprint(self) -> dict:
        """The options that must not change when a run is resumed. Not in it: the engine and run
        control flags (``max_shard_size`` only shapes the exported files); ``activation_checkpointing`` among them, since it does not change the
        math (a run paused without it may resume with it, and the other way round)."""
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
