"""Checkpoint and resume state of a training run: ``OUT.inprogress/state``.

The state directory (replaced atomically by :func:`save_state`) holds

* ``trainable.safetensors``: fp32 values of the trainable parameters (from the optimizer's
  master copy under ZeRO), ``optimizer.safetensors``: Adam moments ``exp_avg.<name>`` /
  ``exp_avg_sq.<name>``, ``rng.safetensors``: the torch CPU RNG state;
* ``trainer_state.json``: format, step, Adam step, the options fingerprint, kind, world size.

Frozen tensors are not saved: they are rebuilt from the command's inputs. :func:`load_state`
refuses (TrainingError) a state of another kind, other options or other trainable tensors.

Every rank takes part in :func:`save_state` (the full values are gathered collectively for ZeRO
1-3, so the file holds the same tensors whatever the stage and the world size); only the main
rank writes, and every rank learns whether that write succeeded (the call raises on all of them,
never on one only). A failed save leaves the previous ``state/`` as it was.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from flexmoe_kernels.utils.fs import atomic_directory, write_json_atomic

from .distributed import DistInfo, all_reduce_sum, barrier
from .options import TrainingError, TrainOptions

__all__ = ["STATE_FORMAT", "full_fp32", "gather", "load_state", "named_trainable", "open_work_dir",
           "restore_optimizer", "save_state"]

STATE_FORMAT = "flexmoe-train-state-v1"


def named_trainable(model) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of every parameter with ``requires_grad``."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------- optimizer state I/O
def _inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def full_fp32(p: torch.Tensor) -> torch.Tensor:
    """The full fp32 value of a trainable parameter (the ZeRO master copy when there is one), on CPU."""
    from deepspeed.utils import safe_get_full_fp32_param

    v = safe_get_full_fp32_param(p)
    return (p.detach() if v is None else v).float().cpu().clone()


def gather(p: torch.Tensor) -> torch.Tensor:
    """The full value of a (possibly ZeRO-3 partitioned) parameter."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().cpu().clone()
    return p.detach()


def _link_state_fragments(engine) -> None:
    """Point every parameter's DeepSpeed fragment at its current optimizer state (ZeRO-1/2, bf16).

    DeepSpeed links the fragments once, right after the first param group's first step; with
    more than one param group (weight decay on matrices, none on the rest) the later groups
    have no Adam state yet at that moment, so their fragments hold no moments and
    ``safe_get/set_full_optimizer_state`` fail with "exp_avg not found in optimizer state
    fragment". Linking again once every group has state fixes that. A no-op without fragments
    (ZeRO-0 in fp32, ZeRO-3, which reads its flat partitions directly).
    """
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


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


def _create_optimizer_states(engine, adam_step: float) -> None:
    """Optimizer states are created lazily at the first step: create them (zeros) now so saved
    moments can be written into them, and let DeepSpeed link its fragments to them."""
    inner = _inner_optimizer(engine)
    flat = [fp for g in inner.param_groups for fp in g["params"]]
    flat += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))  # ZeRO-3's master partitions
    for fp in flat:
        st = inner.state[fp]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(float(adam_step))
            st["exp_avg"] = torch.zeros_like(fp, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(fp, memory_format=torch.preserve_format)
    _link_state_fragments(engine)


def restore_optimizer(engine, named: Sequence[tuple[str, torch.Tensor]], fp32: Mapping[str, torch.Tensor],
                      moments: Mapping[str, torch.Tensor], adam_step: float) -> None:
    """Write saved fp32 values, Adam moments and the Adam step into ``engine``'s parameters and optimizer."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _create_optimizer_states(engine, adam_step)
    for name, p in named:
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
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
    for st in _inner_optimizer(engine).state.values():
        if "step" in st:
            st["step"] = (torch.full_like(st["step"], adam_step) if isinstance(st["step"], torch.Tensor)
                          else type(st["step"])(adam_step))


# ---------------------------------------------------------------------------- state directory
def _gather_state(engine) -> tuple[dict, dict, float]:
    """Full fp32 values, Adam moments and the Adam step of the trainable parameters (collective)."""
    _link_state_fragments(engine)
    named = named_trainable(engine.module)
    values = {n: full_fp32(p) for n, p in named}
    moments: dict[str, torch.Tensor] = {}
    for n, p in named:
        for key in ("exp_avg", "exp_avg_sq"):
            v = _full_state(engine, p, key)
            moments[f"{key}.{n}"] = v if v is not None else torch.zeros(getattr(p, "ds_shape", p.shape))
    return values, moments, _adam_step(engine)


def _write_state(st_dir: Path, values: Mapping[str, torch.Tensor], moments: Mapping[str, torch.Tensor],
                 meta: dict) -> None:
    """Replace ``st_dir`` atomically with the safetensors files and ``trainer_state.json``."""
    from safetensors.torch import save_file

    with atomic_directory(st_dir) as tmp:
        save_file({n: v.contiguous() for n, v in values.items()}, str(tmp / "trainable.safetensors"),
                  metadata={"format": STATE_FORMAT})
        save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / "optimizer.safetensors"),
                  metadata={"format": STATE_FORMAT})
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        write_json_atomic(tmp / "trainer_state.json", meta)


def save_state(engine, kind: str, dist: DistInfo, work: Path, step: int, opts: TrainOptions) -> None:
    """Replace ``work/state`` atomically with the state after ``step`` optimizer steps.

    Every rank must call it (the gathers are collective); the main rank writes. Raises
    TrainingError on every rank when the write failed; ``work/state`` then still holds the
    previous state (or nothing, if there was none).
    """
    values, moments, adam_step = _gather_state(engine)
    error: Optional[BaseException] = None
    if dist.is_main:
        meta = {"format": STATE_FORMAT, "step": step, "adam_step": adam_step, "options": opts.fingerprint(),
                "kind": kind, "world_size": dist.world_size, "zero_stage": opts.zero_stage}
        try:
            _write_state(work / "state", values, moments, meta)
        except Exception as exc:
            error = exc
    failed, = all_reduce_sum([float(error is not None)], dist.device)
    if failed:
        why = f": {type(error).__name__}: {error}" if error is not None else " on the main rank"
        raise TrainingError(f"saving the resumable state of step {step} in {str(work / 'state')!r} failed{why}; "
                            "the previous state (if any) is kept") from error


def _read_state(st_dir: Path) -> dict:
    from safetensors.torch import load_file

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
    return {"meta": meta, "params": params, "moments": moments, "rng": rng}


def load_state(work: Path, kind: str, model, opts: TrainOptions) -> Optional[dict]:
    """The saved state of ``work`` (``{"meta", "params", "moments", "rng"}``), None when there is none.

    Raises TrainingError when it is unreadable or does not fit this run (kind, options
    fingerprint, names and shapes of ``model``'s trainable parameters).
    """
    st_dir = work / "state"
    if not (st_dir / "trainer_state.json").is_file():
        return None
    state = _read_state(st_dir)
    meta, params = state["meta"], state["params"]
    if meta.get("kind") != kind:
        raise TrainingError(f"{str(work)!r} holds a {meta.get('kind')!r} run, not {kind!r}")
    if meta["options"] != opts.fingerprint():
        diff = {k: (meta["options"].get(k), v) for k, v in opts.fingerprint().items() if meta["options"].get(k) != v}
        raise TrainingError(f"cannot resume {str(work)!r}: options changed since it was started (saved, now): {diff}; "
                            "use the same options, or --restart to start over")
    names = {n for n, _ in named_trainable(model)}
    if set(params) != names:
        raise TrainingError(f"cannot resume {str(work)!r}: its trainable tensors do not match this model's")
    for n, p in named_trainable(model):
        if tuple(params[n].shape) != tuple(p.shape):
            raise TrainingError(f"cannot resume {str(work)!r}: {n!r} has shape {tuple(params[n].shape)}, "
                                f"the model needs {tuple(p.shape)}")
    return state


def open_work_dir(out: Path, work: Path, kind: str, model, opts: TrainOptions, dist: DistInfo) -> Optional[dict]:
    """Decide between resuming and starting over; returns the state to resume from, or None.

    ``out`` existing without ``--overwrite`` raises TrainingError. A partial run (``work``) is
    resumed when its options match; ``--restart`` discards it; ``--overwrite`` discards it only
    when it cannot be resumed. Discarded work directories are removed (main rank).
    """
    if out.exists() and not opts.overwrite:
        raise TrainingError(f"output {str(out)!r} already exists (pass --overwrite to replace it)")
    resume = None
    discard = work.exists()
    if work.exists() and not opts.restart:
        try:
            resume = load_state(work, kind, model, opts)
            discard = False
        except TrainingError as exc:
            if not opts.overwrite:
                raise
            if dist.is_main:
                print(f"[{kind}] discarding the partial run in {work}: {exc}", flush=True)
    barrier()
    if discard and dist.is_main and work.exists():
        shutil.rmtree(work)
    barrier()
    if resume is not None and dist.is_main:
        print(f"[{kind}] resuming from step {resume['meta']['step']} ({work})", flush=True)
    return resume
