"""Keep the best validated values of the trainable parameters: training that cannot make the
model worse on its validation data (``flexmoe tune-router``'s default).

With ``RunSpec.select`` set the trainer validates

* before the first optimizer step: the starting point (for router tuning, the merged model's
  untuned router), and
* every ``--eval-every`` steps,

and exports the trainable values of the best validation, which are the starting values when no
step improved on them by more than ``min_delta``. After ``patience`` validations in a row without
such an improvement the run stops early and finishes (0: never stop early). Validation runs with
``eval_top_k`` active experts (the top-k of the saved model, not the top-k used while training),
so the choice is made on the model that will be used.

``run.json`` records ``selection``: the start and best losses and steps, whether the trained
values were kept, the validation history and where it stopped early. The state (best values,
counters) is saved beside the resumable state, so a paused run resumes its selection exactly.

Memory: one fp32 copy of the trainable parameters on the CPU (router rows and biases for router
tuning: a few hundred kB for 7x7B).
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from flexmoe_kernels.utils.fs import write_json_atomic

from .options import TrainingError

__all__ = ["BestSelection", "SelectionState", "validation_top_k"]

_FILE = "selection.safetensors"
_META = "selection.json"


@dataclass
class BestSelection:
    """How to select: stop after ``patience`` validations without an improvement of more than
    ``min_delta`` nats/token (0: never early); validate with ``eval_top_k`` experts (None: the
    training model's top-k)."""

    patience: int = 0
    min_delta: float = 0.0
    eval_top_k: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"--patience must be an integer >= 0, got {self.patience!r}")
        if not (isinstance(self.min_delta, (int, float)) and math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"--min-delta must be a finite number >= 0, got {self.min_delta!r}")


@dataclass
class SelectionState:
    """The selection so far: losses are validation cross-entropies (nats/token)."""

    start_loss: float
    best_loss: float
    best_step: int
    values: Dict[str, torch.Tensor]                  # parameter name -> fp32 CPU value at best_step
    bad: int = 0                                     # validations in a row without an improvement
    history: List[list] = field(default_factory=list)  # [[step, loss], ...]
    stopped_early_at: Optional[int] = None

    @classmethod
    def start(cls, loss: float, values: Dict[str, torch.Tensor]) -> "SelectionState":
        """The state before the first step: the starting values are the best so far."""
        if not math.isfinite(loss):
            raise TrainingError(f"the validation loss before training is {loss}: the model or its validation data "
                                "is broken")
        return cls(start_loss=loss, best_loss=loss, best_step=0, values=values, history=[[0, loss]])

    def observe(self, step: int, loss: float, values: Callable[[], Dict[str, torch.Tensor]],
                rule: BestSelection) -> bool:
        """Take the validation ``loss`` after ``step`` steps (``values()`` gives the current
        trainable values; called only on an improvement). True when the run should stop early."""
        self.history.append([step, loss])
        if math.isfinite(loss) and loss < self.best_loss - rule.min_delta:
            self.best_loss, self.best_step, self.values, self.bad = loss, step, values(), 0
            return False
        self.bad += 1
        if rule.patience and self.bad >= rule.patience:
            self.stopped_early_at = step
            return True
        return False

    @property
    def kept_trained(self) -> bool:
        """Whether the exported values are trained ones (a validation improved on the start)."""
        return self.best_step > 0

    def record(self, rule: BestSelection) -> dict:
        """The ``selection`` entry of run.json."""
        return {"start_val_loss": self.start_loss, "best_val_loss": self.best_loss, "best_step": self.best_step,
                "kept": "trained" if self.kept_trained else "start (no step improved validation)",
                "improvement": self.start_loss - self.best_loss, "stopped_early_at": self.stopped_early_at,
                "patience": rule.patience, "min_delta": rule.min_delta, "eval_top_k": rule.eval_top_k,
                "history": self.history}

    # ----------------------------------------------------------------------- pause / resume
    def save(self, work: Path, step: int) -> None:
        """Write the state into the work directory (main rank), for a run paused at ``step``."""
        from safetensors.torch import save_file

        tmp = Path(work) / (_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in self.values.items()}, str(tmp))
        tmp.replace(Path(work) / _FILE)
        write_json_atomic(Path(work) / _META, {
            "saved_at_step": step, "start_loss": self.start_loss, "best_loss": self.best_loss,
            "best_step": self.best_step, "bad": self.bad, "history": self.history})

    @classmethod
    def load(cls, work: Path, step: int) -> "SelectionState":
        """The state a run paused at ``step`` saved; ``TrainingError`` naming ``--restart`` when it
        is missing or from another step (the pause was interrupted between the two saves)."""
        from safetensors.torch import load_file

        meta_path, values_path = Path(work) / _META, Path(work) / _FILE
        try:
            meta = json.loads(meta_path.read_text())
            values = load_file(str(values_path))
        except (OSError, ValueError) as e:
            raise TrainingError(f"cannot resume the best-validation selection from {str(meta_path)!r} / "
                                f"{str(values_path)!r} ({e}); pass --restart to start over") from None
        if meta.get("saved_at_step") != step:
            raise TrainingError(f"{str(meta_path)!r} was saved at step {meta.get('saved_at_step')}, the resumable "
                                f"state at step {step}; pass --restart to start over")
        return cls(start_loss=meta["start_loss"], best_loss=meta["best_loss"], best_step=meta["best_step"],
                   values=values, bad=meta["bad"], history=meta["history"])


@contextlib.contextmanager
def validation_top_k(model, k: Optional[int]):
    """Run the block with ``k`` active experts per token (``model.set_top_k``), then restore."""
    if k is None or not hasattr(model, "set_top_k"):
        yield
        return
    old = model.config.num_experts_per_tok
    model.set_top_k(k)
    try:
        yield
    finally:
        model.set_top_k(old)
