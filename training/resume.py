"""Checkpoint and resume state of a training run: ``OUT.inprogress/state``.

The state directory (replaced atomically by :func:`save_state`) holds

* DeepSpeed's own checkpoint of the engine (``engine.save_checkpoint``, frozen parameters
  excluded): every rank writes its own partition of the fp32 master weights and of the Adam
  moments (``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt``, ZeRO 1-3), rank 0 the module file
  (``mp_rank_00_model_states.pt``: the trainable weights for ZeRO 0-2, which every rank holds
  whole anyway; for ZeRO 0 also the optimizer). No rank gathers another's partition.
* ``rng.safetensors``: the torch CPU RNG state (and the CUDA one of the main rank's device on
  GPU; every rank seeds both from ``--seed`` at the start and draws alike, so the main rank's
  state is every rank's); ``trainer_state.json``: format, step, the
  options fingerprint, kind, world size, ZeRO stage and the full shapes of the trainable
  parameters.

A save goes to ``state.partial`` first; when every rank has written its files the main rank
adds ``rng.safetensors`` and ``trainer_state.json`` and swaps it in for ``state`` in one step
(:func:`flexmoe_kernels.utils.fs.replace_directory`; the directory must be on a file system all
ranks share, as DeepSpeed's checkpoints need). Every rank learns whether the save succeeded (the
call raises on all of them, never on one only); a failed save leaves the previous ``state/``.

Frozen tensors are not saved: they are rebuilt from the command's inputs. :func:`load_state`
refuses (TrainingError) a state of another kind, other options, other inputs (``trainer_state.json``
records the content identity of every input flag: data directories, the public anchor, the
owner's name, the router init, the model to tune...; see :func:`data_identity`), other trainable
tensors, another ZeRO stage, or (ZeRO 1-3, whose files are per rank) another number of processes;
and a damaged state (a file of the saved list missing or of another size, or one DeepSpeed cannot
read), naming the file. Each refusal is one line that names ``--restart`` (start over).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from flexmoe_kernels.utils.fs import replace_directory, write_json_atomic

from .distributed import DistInfo, all_reduce_sum, barrier, param_shape
from .options import TrainingError, TrainOptions

__all__ = ["STATE_FORMAT", "STATE_TAG", "checkpoint_identity", "config_identity", "data_identity", "files_identity",
           "full_fp32", "gather", "load_engine_state", "load_state", "named_trainable", "open_work_dir", "save_state",
           "zero_stage_of"]

STATE_FORMAT = "flexmoe-train-state-v3"  # v3: + "inputs" (the identity of every input flag)
STATE_TAG = "state"  # DeepSpeed's tag: the checkpoint lives in OUT.inprogress/state
_PARTIAL = "state.partial"


def named_trainable(model) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of every parameter with ``requires_grad``."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def zero_stage_of(ds_cfg: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 without a ``zero_optimization`` section)."""
    return int(ds_cfg.get("zero_optimization", {}).get("stage", 0))


def full_fp32(p: torch.Tensor) -> torch.Tensor:
    """The full fp32 value of a trainable parameter (the ZeRO master copy when there is one), on
    CPU. Collective under ZeRO 1-3 (every rank calls it for the same parameter)."""
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


# ---------------------------------------------------------------------------- input identity
# What a run was started on, recorded in trainer_state.json ("inputs": {flag: value}) and compared
# on resume. A value is a plain JSON value (a name, a number) or an identity
# {"path": ..., "sha256": ...}, or a list of those; identities compare by sha256 only (a moved
# directory of the same content resumes).
_WHOLE_FILE = 4 << 20  # files up to this size are hashed whole
_BLOCK, _N_BLOCKS = 64 << 10, 16  # larger ones: size + 16 evenly spaced 64 KiB blocks (first and last included)


def _hash_file(h, path: Path, name: str) -> None:
    size = path.stat().st_size
    h.update(f"{name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return
        for i in range(_N_BLOCKS):
            f.seek((size - _BLOCK) * i // (_N_BLOCKS - 1))
            h.update(f.read(_BLOCK))


def files_identity(root, names) -> dict:
    """``{"path", "sha256"}`` of the files ``names`` (relative to the directory ``root``, or
    ``root`` itself for a file when ``names`` is None): sizes and contents, files above 4 MiB
    sampled (16 blocks of 64 KiB), so a multi-GB input costs about 1 MiB of reading."""
    import hashlib

    root = Path(root).resolve()
    h = hashlib.sha256()
    if names is None:
        _hash_file(h, root, "")  # content only: the same file under another name is the same input
    else:
        for n in sorted(names):
            _hash_file(h, root / n, n)
    return {"path": str(root), "sha256": h.hexdigest()}


def data_identity(data) -> dict:
    """Identity of a prepared data directory (``DataDir``): meta.json, train.bin, val.bin and its tokenizer file."""
    names = [n for n in ("meta.json", "train.bin", "val.bin", "tokenizer.json") if (Path(data.path) / n).is_file()]
    return files_identity(data.path, names)


def checkpoint_identity(directory) -> dict:
    """Identity of a checkpoint directory: config.json and its safetensors files (and index)."""
    d = Path(directory)
    names = [p.name for p in d.iterdir() if p.is_file() and (p.name == "config.json" or p.name.endswith(".safetensors")
                                                              or p.name.endswith(".safetensors.index.json"))]
    return files_identity(d, names)


def config_identity(spec: str, config) -> dict:
    """Identity of a model config (``--model-config`` preset or file, resolved): its JSON
    without the engine-only fields (MoE backend, attention implementation) and version fields."""
    import hashlib

    engine_only = ("flexmoe_moe_backend", "flexmoe_attn_implementation", "moe_backend", "transformers_version")
    d = {k: v for k, v in config.to_dict().items() if k not in engine_only}
    return {"path": str(spec), "sha256": hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()}


def _ident(v):
    if isinstance(v, dict) and "sha256" in v:
        return v["sha256"]
    if isinstance(v, (list, tuple)):
        return [_ident(x) for x in v]
    return v


def _show(v) -> str:
    if isinstance(v, dict) and "sha256" in v:
        return f"{v.get('path')!r} (content sha256 {str(v['sha256'])[:12]})"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


def _check_inputs(work: Path, saved: dict, now: dict) -> None:
    for flag in sorted(set(saved) | set(now)):
        a, b = saved.get(flag), now.get(flag)
        if _ident(a) != _ident(b):
            raise TrainingError(f"cannot resume {str(work)!r}: {flag} is not the input it was started on "
                                f"(saved {_show(a)}, now {_show(b)}): run the same command with the same inputs, "
                                "or pass --restart to start over")


# ---------------------------------------------------------------------------- state directory
def _trainable_shapes(model) -> dict:
    return {n: list(param_shape(p)) for n, p in named_trainable(model)}


def _rng_tensors(device: torch.device) -> dict:
    """The RNG states a resumed run restores: torch's CPU generator, and on GPU ``device``'s."""
    t = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        t["cuda_rng"] = torch.cuda.get_rng_state(device)
    return t


def _restore_rng(state: dict) -> None:
    """Set the RNG states :func:`_rng_tensors` saved (the CUDA one on this rank's current device)."""
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"], torch.cuda.current_device())


def _finish_partial(partial: Path, st_dir: Path, meta: dict, device: torch.device = torch.device("cpu")) -> None:
    """Main rank: add the RNG and ``trainer_state.json`` to the written partial state; swap it in."""
    import safetensors.torch

    safetensors.torch.save_file(_rng_tensors(device), str(partial / "rng.safetensors"))
    # every file of the state (all ranks' partitions are written by now) with its size: a resume
    # checks them first and names a missing or truncated one (see _check_files)
    meta = dict(meta, files={str(f.relative_to(partial)): f.stat().st_size
                             for f in sorted(partial.rglob("*")) if f.is_file()})
    write_json_atomic(partial / "trainer_state.json", meta)
    replace_directory(partial, st_dir)


def save_state(engine, kind: str, dist: DistInfo, work: Path, step: int, opts: TrainOptions,
               inputs: Optional[dict] = None) -> None:
    """Replace ``work/state`` atomically with the state after ``step`` optimizer steps.

    Every rank must call it: each writes its own partition (DeepSpeed's ``save_checkpoint``,
    frozen parameters excluded), then the main rank finishes and swaps the directory. Raises
    TrainingError on every rank when any part failed; ``work/state`` then still holds the
    previous state (or nothing, if there was none). ``inputs``: the identity of the run's input
    flags (``{flag: value}``, see :func:`data_identity`), recorded for :func:`load_state`.
    """
    partial = work / _PARTIAL
    if dist.is_main and partial.exists():
        shutil.rmtree(partial)
    barrier()
    error: Optional[BaseException] = None
    try:
        engine.save_checkpoint(str(work), tag=_PARTIAL, client_state={}, save_latest=False,
                               exclude_frozen_parameters=True)
    except Exception as exc:
        error = exc
    failed, = all_reduce_sum([float(error is not None)], dist.device)
    if not failed and dist.is_main:
        meta = {"format": STATE_FORMAT, "step": step, "options": opts.fingerprint(), "inputs": dict(inputs or {}),
                "kind": kind, "world_size": dist.world_size, "zero_stage": int(engine.zero_optimization_stage()),
                "trainable": _trainable_shapes(engine.module)}
        try:
            _finish_partial(partial, work / STATE_TAG, meta, dist.device)
        except Exception as exc:
            error = exc
    failed, = all_reduce_sum([float(error is not None)], dist.device)
    if failed:
        if dist.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        why = f": {type(error).__name__}: {error}" if error is not None else " on another rank"
        raise TrainingError(f"saving the resumable state of step {step} in {str(work / STATE_TAG)!r} failed{why}; "
                            "the previous state (if any) is kept") from error


_RESTART = "pass --restart to start over (it discards the partial run)"


def _damaged(st_dir: Path, name: str, why: str) -> TrainingError:
    return TrainingError(f"cannot resume: the saved state is damaged: {str(st_dir / name)!r} {why}; {_RESTART}")


def _check_files(st_dir: Path, meta: dict) -> None:
    """Every file the save recorded is there with its size, and each torch file (a zip archive)
    has a readable directory (its end: what truncation or a partial copy destroys); TrainingError
    naming the first file that is not."""
    import zipfile

    for name, size in sorted(meta.get("files", {}).items()):
        f = st_dir / name
        if not f.is_file():
            raise _damaged(st_dir, name, f"is missing (saved with {size} bytes)")
        if f.stat().st_size != size:
            raise _damaged(st_dir, name, f"has {f.stat().st_size} bytes, saved with {size}")
        if name.endswith(".pt"):
            try:
                zipfile.ZipFile(f).close()
            except (zipfile.BadZipFile, OSError) as exc:
                raise _damaged(st_dir, name, f"is not a readable torch file ({exc})") from exc


def load_engine_state(engine, work: Path, state: dict) -> None:
    """Load a saved state into a freshly initialised ``engine`` (every rank its own partition:
    weights, fp32 masters, Adam moments and step) and restore the RNG states. A file DeepSpeed
    cannot read (damage :func:`_check_files` could not see) raises TrainingError naming it."""
    try:
        path, _ = engine.load_checkpoint(str(work), tag=STATE_TAG, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
    except Exception as exc:
        where = getattr(exc, "filename", None) or str(work / STATE_TAG)
        why = " ".join(str(exc).split())[:300] or "no message"
        raise TrainingError(f"cannot resume: loading the saved state {str(where)!r} failed "
                            f"({type(exc).__name__}: {why}): it is damaged; {_RESTART}") from exc
    if path is None:
        raise TrainingError(f"cannot resume: DeepSpeed found no checkpoint in {str(work / STATE_TAG)!r}; "
                            "pass --restart to start over")
    _restore_rng(state)


def _read_state(st_dir: Path) -> dict:
    from safetensors.torch import load_file

    try:
        meta = json.loads((st_dir / "trainer_state.json").read_text())
        if meta.get("format") != STATE_FORMAT:
            raise TrainingError(f"cannot resume: {str(st_dir)!r} has format {meta.get('format')!r}, expected "
                                f"{STATE_FORMAT!r}; pass --restart to start over")
        _check_files(st_dir, meta)
        rngs = load_file(str(st_dir / "rng.safetensors"))
        rng, cuda_rng = rngs["torch_rng"], rngs.get("cuda_rng")
    except TrainingError:
        raise
    except Exception as exc:
        raise TrainingError(f"cannot resume: the saved state in {str(st_dir)!r} is unreadable ({exc}); "
                            f"pass --restart to start over") from exc
    return {"meta": meta, "rng": rng, "cuda_rng": cuda_rng}


def load_state(work: Path, kind: str, model, opts: TrainOptions, world_size: int = 1,
               zero_stage: Optional[int] = None, inputs: Optional[dict] = None) -> Optional[dict]:
    """The saved state of ``work`` (``{"meta", "rng", "cuda_rng"}``; the engine's part is loaded later by
    :func:`load_engine_state`), None when there is none.

    Raises TrainingError when it is unreadable or does not fit this run (kind, options
    fingerprint, ``inputs`` (unless None) by content identity, names and full shapes of ``model``'s trainable parameters, ZeRO stage, and for
    ZeRO 1-3 the number of processes).
    """
    st_dir = work / STATE_TAG
    if not (st_dir / "trainer_state.json").is_file():
        if st_dir.is_dir():  # a save is swapped in whole: only damage removes it
            raise _damaged(st_dir, "trainer_state.json", "is missing")
        return None
    state = _read_state(st_dir)
    meta = state["meta"]
    if meta.get("kind") != kind:
        raise TrainingError(f"{str(work)!r} holds a {meta.get('kind')!r} run, not {kind!r}")
    if meta["options"] != opts.fingerprint():
        diff = {k: (meta["options"].get(k), v) for k, v in opts.fingerprint().items() if meta["options"].get(k) != v}
        raise TrainingError(f"cannot resume {str(work)!r}: options changed since it was started (saved, now): {diff}; "
                            "use the same options, or --restart to start over")
    if inputs is not None:
        _check_inputs(work, meta.get("inputs", {}), inputs)
    stage = opts.zero_stage if zero_stage is None else zero_stage
    if meta.get("zero_stage") != stage or (stage > 0 and meta.get("world_size") != world_size):
        raise TrainingError(f"cannot resume {str(work)!r}: it was saved by {meta.get('world_size')} process(es) at "
                            f"ZeRO stage {meta.get('zero_stage')}, this run has {world_size} at stage {stage} "
                            "(ZeRO states are per rank): use the same, or --restart to start over")
    have = meta.get("trainable", {})
    want = _trainable_shapes(model)
    if set(have) != set(want):
        raise TrainingError(f"cannot resume {str(work)!r}: its trainable tensors do not match this model's")
    for n, shape in want.items():
        if list(have[n]) != shape:
            raise TrainingError(f"cannot resume {str(work)!r}: {n!r} has shape {tuple(have[n])}, "
                                f"the model needs {tuple(shape)}")
    return state


def open_work_dir(out: Path, work: Path, kind: str, model, opts: TrainOptions, dist: DistInfo,
                  zero_stage: Optional[int] = None, inputs: Optional[dict] = None) -> Optional[dict]:
    """Decide between resuming and starting over; returns the state to resume from, or None.

    ``out`` existing without ``--overwrite`` raises TrainingError. A partial run (``work``) is
    resumed when its options and ``inputs`` match; ``--restart`` discards it; ``--overwrite`` discards it only
    when it cannot be resumed. Discarded work directories are removed (main rank).
    """
    if out.exists() and not opts.overwrite:
        raise TrainingError(f"output {str(out)!r} already exists (pass --overwrite to replace it)")
    resume = None
    discard = work.exists()
    if work.exists() and not opts.restart:
        try:
            resume = load_state(work, kind, model, opts, dist.world_size, zero_stage, inputs)
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
