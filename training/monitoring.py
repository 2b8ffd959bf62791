"""Runs you can watch: DeepSpeed's own monitor (CSV always, TensorBoard with ``--tensorboard DIR``,
Weights & Biases with ``--wandb-project NAME``) and the per-step figures written to it and to
``metrics.jsonl``: loss, lr, grad norm, tokens/s, achieved TFLOP/s per GPU, MFU and memory.

* :func:`add_monitors` fills the DeepSpeed config's ``csv_monitor`` (``OUT/monitor/csv/*.csv``,
  written into the run's work directory and kept in the final checkpoint directory),
  ``tensorboard`` and ``wandb`` sections; DeepSpeed's ``MonitorMaster`` writes on global rank 0.
* :func:`monitor_step` adds ``tflops_per_gpu``, ``mfu`` (None without a known peak, e.g. on CPU)
  and ``memory_gib`` (peak CUDA memory allocated this step, or the process's resident memory on
  CPU) to a step record, writes the events ``Train/loss``, ``Train/lr``, ``Train/grad_norm``,
  ``Train/tokens_per_s``, ``Train/tflops_per_gpu``, ``Train/mfu``, ``Train/memory_gib`` (x = the
  optimizer step) and logs a line at INFO on the ``flexmoe_training.train`` logger
  (``--log-level info``).

MFU = training FLOPs per token (the trainer's ``flops_per_token``, :mod:`.flops`) x tokens/s /
(ranks x peak): the peak is ``--peak-tflops``, else the dense bf16 figure of a known GPU
(:data:`PEAK_TFLOPS`, by ``torch.cuda.get_device_name``), else unknown.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

__all__ = ["PEAK_TFLOPS", "add_monitors", "monitor_step", "peak_tflops", "MONITOR_DIR"]

log = logging.getLogger("flexmoe_training.train")
MONITOR_DIR = "monitor"
# dense bf16 tensor-core TFLOP/s (vendor datasheets, no sparsity), matched in the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(opts, device: torch.device) -> Optional[float]:
    """``--peak-tflops``, else the known peak of this CUDA device, else None (CPU, unknown GPU)."""
    given = getattr(opts, "peak_tflops", None)
    if given:
        return float(given)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _check_importable(module: str, flag: str, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{flag} needs the {package!r} package (pip install {package}), which is not installed")


def add_monitors(cfg: dict, opts, work: Path, kind: str) -> dict:
    """Fill ``cfg`` (a DeepSpeed config) with the monitors; returns it. ``ValueError`` naming the
    flag when ``--tensorboard`` / ``--wandb-project`` lack their package."""
    job = kind
    cfg.setdefault("csv_monitor", {"enabled": True, "output_path": str(Path(work) / MONITOR_DIR), "job_name": "csv"})
    tb = getattr(opts, "tensorboard", None)
    if tb:
        _check_importable("tensorboard", "--tensorboard", "tensorboard")
        cfg["tensorboard"] = {"enabled": True, "output_path": str(Path(tb).resolve()), "job_name": job}
    project = getattr(opts, "wandb_project", None)
    if project:
        _check_importable("wandb", "--wandb-project", "wandb")
        cfg["wandb"] = {"enabled": True, "project": project, "group": job}
    return cfg


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2 ** 30
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    except (OSError, ValueError):
        return float("nan")


def monitor_step(r, rec: dict) -> dict:
    """Add ``tflops_per_gpu``, ``mfu`` and ``memory_gib`` to the step record ``rec`` of the run ``r``
    (a trainer ``_Run``), write the step's events to DeepSpeed's monitor and log it; returns ``rec``."""
    world = r.dist.world_size
    fpt = float(getattr(r.spec, "flops_per_token", 0) or 0)
    tflops = fpt * rec["tokens_per_s"] / world / 1e12 if fpt else None
    peak = getattr(r, "_peak_tflops", "unset")
    if peak == "unset":
        peak = r._peak_tflops = peak_tflops(r.opts, r.dist.device)
    rec["tflops_per_gpu"] = tflops
    rec["mfu"] = tflops / peak if (tflops is not None and peak) else None
    rec["memory_gib"] = _memory_gib(r.dist.device)
    monitor = getattr(r.engine, "monitor", None)
    if monitor is not None and getattr(monitor, "enabled", False):
        step = rec["step"]
        events = [(f"Train/{k}", float(rec[k]), step) for k in
                  ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu", "memory_gib")
                  if rec.get(k) is not None]
        monitor.write_events(events)
    if log.isEnabledFor(logging.INFO) and r.dist.is_main:
        log.info("[%s] step %d/%d loss %.4f lr %.2e tok/s %.0f TFLOP/s/GPU %s MFU %s mem %.2f GiB", r.spec.kind,
                 rec["step"], r.opts.steps, rec["loss"], rec["lr"], rec["tokens_per_s"],
                 "n/a" if tflops is None else f"{tflops:.3g}", "n/a" if rec["mfu"] is None else f"{rec['mfu']:.1%}",
                 rec["memory_gib"])
    return rec
