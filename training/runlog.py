"""The run log of a training run: ``run.json`` (what ran and how it ended) and ``metrics.jsonl``.

Both live in the work directory ``OUT.inprogress`` and are copied into the final checkpoint.
Only the main rank writes; on other ranks every method is a no-op. ``run.json`` is replaced
atomically at every update; ``metrics.jsonl`` gets one JSON object per line (training steps:
``step, loss, z_loss, lr, grad_norm, tokens, step_time_s, tokens_per_s, time``; evaluations:
``step, val_loss, time``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from flexmoe_kernels.utils.fs import write_json_atomic

__all__ = ["RunLog", "utc_now", "versions"]


def utc_now() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def versions() -> dict:
    """Versions of python, torch, deepspeed and flexmoe_kernels (those that import)."""
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("deepspeed", "flexmoe_kernels"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


class RunLog:
    """``run.json`` + ``metrics.jsonl`` of the work directory ``work`` (written when ``is_main``)."""

    def __init__(self, work: Path, is_main: bool) -> None:
        self.run_path = Path(work) / "run.json"
        self.metrics_path = Path(work) / "metrics.jsonl"
        self.is_main = is_main
        self.run: dict = {}

    def start(self, run: dict, resumed_from: Optional[int]) -> None:
        """Begin the log with the record ``run``.

        A fresh run (``resumed_from`` None) starts an empty ``metrics.jsonl``; a resumed one keeps
        the metric lines up to step ``resumed_from`` and appends that step to ``run["resumes"]``.
        """
        self.run = run
        if not self.is_main:
            return
        kept = []
        if resumed_from is not None and self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resumed_from:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass
        self.metrics_path.write_text("".join(x + "\n" for x in kept))
        if resumed_from is not None and self.run_path.exists():
            try:
                prev = json.loads(self.run_path.read_text())
                run["resumes"] = prev.get("resumes", []) + [resumed_from]
            except json.JSONDecodeError:
                pass
        write_json_atomic(self.run_path, run)

    def metric(self, rec: dict) -> None:
        """Append one record to ``metrics.jsonl``."""
        if self.is_main:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def update(self, **fields) -> None:
        """Add ``fields`` to the run record and rewrite ``run.json``."""
        self.run.update(fields)
        if self.is_main:
            write_json_atomic(self.run_path, self.run)
