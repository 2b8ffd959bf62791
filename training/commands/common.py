"""What the ``flexmoe`` training subcommands share: the training flag groups, the error guard,
and the checks of their inputs (data directories, tokenizers, free outputs).

Every command validates its inputs before it writes anything, writes its output atomically
(:mod:`flexmoe_kernels.utils.fs`) and leaves ``run.json`` in its output directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["FORMATTER", "DefaultsOnceFormatter", "add_command", "add_name_list", "add_train_args", "require", "check_out_free", "check_output",
           "check_train_output",
           "check_tokenizer", "csv_list", "dense_config", "fresh_model", "freeze_single_router", "guard",
           "main_error", "open_datas", "options_from_args", "tokenizer_src"]

FORMATTER = argparse.RawDescriptionHelpFormatter


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Each flag's default once: its help states it, or argparse adds it when it is a real value
    (never ``None``, never a second time)."""

    def _get_help_string(self, action):
        text = action.help or ""
        no_value = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or no_value or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def add_command(sub, name: str, func, *, help: str, description: str) -> argparse.ArgumentParser:
    """Add subcommand ``name`` (run by ``func(args) -> exit status``) to ``sub``, an argparse
    subparsers object, and return its parser for the flags."""
    p = sub.add_parser(name, formatter_class=FORMATTER, help=help, description=description)
    p.set_defaults(func=func)
    return p


def require(p: argparse.ArgumentParser, flag: str, help: str | None = None, **kwargs) -> None:
    """Add the required flag ``flag`` (e.g. ``--data``) to ``p``."""
    p.add_argument(flag, required=True, help=help, **kwargs)


def add_train_args(p: argparse.ArgumentParser, *, lr: float, steps: int = 100, weight_decay: bool = True,
                   warmup: int = 10) -> None:
    """Add the "training", "engine" and "run control" flag groups (the fields of ``TrainOptions``)."""
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence S (default 128)")
    g.add_argument("--micro-batch-size", type=int, default=8, help="sequences per rank per micro-step (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * this (cosine; default 0.1)")
    g.add_argument("--warmup-steps", type=int, default=warmup, help=f"linear warm-up steps (default {warmup})")
    if weight_decay:
        g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    g.add_argument("--z-loss-weight", type=float, default=1e-3, help="router z-loss weight (default 1e-3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the init and of the data sampling (default 0)")
    g = p.add_argument_group("engine")
    g.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3],
                   help="DeepSpeed ZeRO stage; uses training/configs/zero<N>.json (default 0)")
    g.add_argument("--deepspeed-config", default=None, help="a DeepSpeed JSON config instead of the shipped one")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda when present")
    add_dtype_arg(g, allowed=("fp32", "bf16"), help="auto: bf16 on CUDA, fp32 on CPU (fp16 is not a training dtype here)")
    g.add_argument("--moe-backend", default="auto", help="FlexMoE backend: auto, torch, triton, cuda")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder block's activations in the backward pass (less memory, "
                        "about one more forward; same gradients)")
    g = p.add_argument_group("run control")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate on val.bin every N steps (0: only at the end)")
    g.add_argument("--eval-batches", type=int, default=8, help="held-out micro-batches per evaluation (default 8)")
    g.add_argument("--save-every", type=int, default=0, help="save a resumable state every N steps (0: only on pause)")
    g.add_argument("--max-steps-this-run", type=int, default=None,
                   help="stop after N steps of this invocation, save, exit 0; rerun the command to resume")
    g.add_argument("--log-every", type=int, default=10, help="print a log line every N steps with --no-progress")
    g.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="DeepSpeed's TensorBoard monitor: loss, lr, grad norm, tokens/s, TFLOP/s per GPU, MFU and "
                        "memory per step into DIR/<command>/ (needs tensorboard; a CSV monitor always writes "
                        "OUT/monitor/csv/)")
    g.add_argument("--wandb-project", default=None, metavar="NAME",
                   help="DeepSpeed's Weights & Biases monitor, the same per-step figures (needs wandb)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="one GPU's peak TFLOP/s for the MFU figure (default: known for H100/H200/A100/..., "
                        "none on CPU)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar (print log lines)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (a partial run is still resumed when its options match)")
    g.add_argument("--restart", action="store_true", help="discard a partial run (OUT.inprogress) instead of resuming")
    add_recipe_arg(g)
    g.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard of the final checkpoint (e.g. 5GB, 500MB; more shards get "
                        "model.safetensors.index.json; default 5GB)")


def csv_list(s: str):
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (the type of comma-separated flags)."""
    return [x.strip() for x in s.split(",") if x.strip()]


def add_name_list(p, flag: str, help: str, metavar: str = "NAME,...") -> argparse.Action:
    """Add ``flag``, a list of names that may be repeated and mixed with the comma form:
    ``--deny a,b --deny c`` gives ``["a", "b", "c"]`` (argparse's ``extend`` with
    :func:`csv_list`; without it a repeated flag keeps only its last value). Default None
    (flag absent). ``p`` is a parser, argument group or mutually exclusive group."""
    return p.add_argument(flag, type=csv_list, action="extend", default=None, metavar=metavar,
                          help=f"{help} (comma-separated; repeatable)")


def options_from_args(args):
    """``TrainOptions`` from the parsed flags (weight decay 0 for commands without ``--weight-decay``)."""
    from ..options import TrainOptions

    if not hasattr(args, "weight_decay"):
        args.weight_decay = 0.0
    return TrainOptions.from_args(args)


def main_error(exc: BaseException) -> int:
    """Print ``flexmoe: error: <exc>`` on stderr; returns the exit status 2."""
    print(f"flexmoe: error: {exc}", file=sys.stderr)
    return 2


def guard(fn):
    """Turn the expected user errors into one clear line on stderr and exit status 2
    (``FLEXMOE_DEBUG=1`` re-raises them with the traceback)."""

    def run(args) -> int:
        from ..data import DataError
        from ..modeling import FrozenTensorMismatch, ModelSpecError
        from ..options import TrainingError

        try:
            return fn(args)
        except (DataError, ModelSpecError, FrozenTensorMismatch, TrainingError, FileExistsError,
                FileNotFoundError, ValueError, TypeError) as exc:
            if os.environ.get("FLEXMOE_DEBUG"):
                raise
            return main_error(exc)

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def check_out_free(out: Path, overwrite: bool) -> None:
    """``FileExistsError`` naming ``--out`` when it exists and ``--overwrite`` was not given."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} already exists (pass --overwrite to replace it)")


def _real(path) -> Path:
    """``path`` absolute with every symbolic link resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_output(out, inputs, *, out_flag: str = "--out", kind: str = "dir", written=()) -> None:
    """Refuse, before anything is touched, an output path that cannot be written safely: the one
    check every ``flexmoe`` command that writes makes of its output.

    ``ValueError`` naming ``out_flag``, the path and what to do when:

    * the output is, contains or lies inside one of ``inputs`` (symbolic links resolved), so
      writing it would replace or change the input (``--overwrite`` does not change this);
      ``inputs`` are ``(flag, value)`` pairs, ``value`` a path, a list of paths or None (absent);
    * a directory above the output is a regular file (a file is in the way);
    * ``kind="dir"``: the output exists and is not a directory; ``kind="file"``: it is a directory.

    ``written``: ``(what, path)`` of other paths the command writes beside the output (a training
    run's ``OUT.inprogress``), checked against the inputs too.
    """
    shown = os.fspath(out)
    absolute = Path(os.path.abspath(os.path.expanduser(shown)))
    for parent in absolute.parents:
        if os.path.lexists(parent) and not os.path.isdir(parent):
            raise ValueError(f"{out_flag} {shown!r}: {str(parent)!r} is a file, not a directory, so nothing can be "
                             f"created under it (a file is in the way): choose another {out_flag} or move that file")
    if kind == "dir" and os.path.lexists(absolute) and not os.path.isdir(absolute):
        raise ValueError(f"{out_flag} {shown!r} is an existing file, not a directory: choose another {out_flag} "
                         f"(a directory is written there) or remove the file")
    if kind == "file" and os.path.isdir(absolute):
        raise ValueError(f"{out_flag} {shown!r} is a directory: give the path of a file to write")
    resolved = _real(out)
    named = f"{out_flag} {shown!r}" + ("" if str(resolved) == shown else f" (= {str(resolved)!r})")
    targets = [(named, resolved)] + [(f"{named} (its {what} {str(p)!r})", _real(p)) for what, p in written]
    for flag, value in inputs:
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is None:
                continue
            inp = _real(v)
            for what, target in targets:
                if target == inp:
                    how = "is"
                elif inp.is_relative_to(target):
                    how = "contains"
                elif target.is_relative_to(inp):
                    how = "lies inside"
                else:
                    continue
                where = "" if str(inp) == os.fspath(v) else f" (= {str(inp)!r})"
                raise ValueError(f"{what} {how} the input {flag} {os.fspath(v)!r}{where}: writing it would "
                                 f"{'change' if how == 'lies inside' else 'destroy'} the input (--overwrite or "
                                 f"not); choose an {out_flag} outside every input")


def check_train_output(args, *flags: str, extra: Sequence[tuple] = ()) -> None:
    """:func:`check_output` for a training command: ``--out`` and its partial run ``OUT.inprogress``
    against the inputs named by ``flags`` (e.g. ``"--data"``, ``"--public"``) and the inputs every
    training command may read (``--deepspeed-config``, ``--model-config`` when it is a file,
    ``--match-flops-of``); ``extra``: more ``(flag, path or paths)`` inputs."""
    names = list(flags) + ["--deepspeed-config", "--match-flops-of"]
    inputs = [(f, getattr(args, f[2:].replace("-", "_"), None)) for f in names] + list(extra)
    model_config = getattr(args, "model_config", None)
    if model_config and os.path.isfile(model_config):  # else a preset name
        inputs.append(("--model-config", model_config))
    out = _real(args.out)
    check_output(args.out, inputs, written=[("partial run", out.with_name(out.name + ".inprogress"))])


def open_datas(paths, flag: str = "--data"):
    """Open the ``flag`` directories (``DataError`` naming the flag) and check they share a tokenizer."""
    from ..data import DataDir, DataError, check_compatible

    datas = []
    for p in paths:
        try:
            datas.append(DataDir(p))
        except DataError as exc:
            raise DataError(f"{flag}: {exc}") from exc
    check_compatible(datas)
    return datas


def _tokenizer_meta(directory: Path) -> dict | None:
    d = Path(directory)
    if (d / "tokenizer_meta.json").is_file():
        return json.loads((d / "tokenizer_meta.json").read_text())
    if (d / "meta.json").is_file():
        return json.loads((d / "meta.json").read_text()).get("tokenizer")
    return None


def tokenizer_src(ckpt: Path, data) -> Path:
    """Where the output checkpoint's tokenizer description comes from: the input checkpoint's,
    or (a checkpoint made elsewhere has none) the data directory's."""
    return ckpt if (ckpt / "tokenizer_meta.json").is_file() else data.path


def check_tokenizer(ckpt: Path, data, what: str) -> None:
    """``ValueError`` when the checkpoint ``what`` (a flag name) records another tokenizer than ``data``."""
    have = _tokenizer_meta(ckpt)
    if have is not None and have != data.meta["tokenizer"]:
        raise ValueError(f"--data {str(data.path)!r} was tokenised with {data.meta['tokenizer']}, but {what} "
                         f"{str(ckpt)!r} uses {have}: prepare the data with the model's tokenizer")


def dense_config(args, datas, **extra_overrides):
    """The ``--model-config`` preset with the data's vocabulary and special tokens (and ``extra_overrides``);
    ``ValueError`` when ``--seq-len`` exceeds its positions."""
    from ..modeling import load_model_config

    d0 = datas[0]
    over = dict(vocab_size=d0.vocab_size, eos_token_id=d0.eos_token_id,
                pad_token_id=d0.meta.get("pad_token_id"), moe_backend=args.moe_backend)
    over.update(extra_overrides)
    cfg = load_model_config(args.model_config, **over)
    if cfg.max_position_embeddings < args.seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    return cfg


def fresh_model(cfg, seed: int):
    """A randomly initialised fp32 ``FlexOlmoForCausalLM`` (torch seeded with ``seed``)."""
    import torch

    from flexmoe_kernels.models import FlexOlmoForCausalLM

    torch.manual_seed(seed)
    return FlexOlmoForCausalLM(cfg).float()


def freeze_single_router(model) -> dict:
    """A dense model's router (one row: softmax = 1) has no effect on the output: freeze it.
    Returns the frozen reference values by parameter name."""
    ref = {}
    for n, p in model.named_parameters():
        if n.endswith("mlp.gate.weight"):
            p.requires_grad_(False)
            ref[n] = p.detach().float().clone()
    return ref


# ---------------------------------------------------------------------------- --dtype (one spelling)
# Every command's --dtype takes fp32 | bf16 | fp16, and torch's long names as aliases (float32 /
# float, bfloat16, float16 / half); a command may add "auto" or "keep" and support a subset
# (the error names the flag and what it takes). Documented once: training/README.md "--dtype".
DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                 "fp16": "fp16", "float16": "fp16", "half": "fp16"}
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_type(allowed, extra=("auto",), flag: str = "--dtype"):
    """An argparse ``type`` for ``--dtype``: a value of ``allowed`` (canonical short names) or one of
    their torch long-name aliases, returned as the short name; ``extra`` words (``auto``, ``keep``)
    pass as they are. Anything else: an argparse error naming the flag and the accepted values."""
    allowed, extra = tuple(allowed), tuple(extra)

    def parse(value: str) -> str:
        v = str(value).strip().lower().removeprefix("torch.")
        if v in extra:
            return v
        canon = DTYPE_ALIASES.get(v)
        if canon in allowed:
            return canon
        names = list(extra) + [f"{a} ({TORCH_DTYPE_NAMES[a]})" for a in allowed]
        why = f"{canon} is not supported here; " if canon else ""
        raise argparse.ArgumentTypeError(f"{flag} {value!r}: {why}use one of {', '.join(names)}")

    parse.__name__ = "dtype"
    return parse


def add_dtype_arg(p, *, allowed=("fp32", "bf16", "fp16"), extra=("auto",), default="auto", help: str = "") -> None:
    """Add ``--dtype`` with the one spelling (:func:`dtype_type`) to ``p`` (a parser or group)."""
    shown = "|".join(list(extra) + list(allowed))
    p.add_argument("--dtype", type=dtype_type(allowed, extra), default=default, metavar=shown,
                   help=f"{help} (torch long names such as bfloat16 also accepted)" if help else
                   "torch long names such as bfloat16 also accepted")


# ---------------------------------------------------------------------------- --recipe FILE
RECIPE_COMMANDS = ("train-public", "train-expert", "tune-router", "train-dense", "train-moe", "merge",
                   "init-router")


def add_recipe_arg(p) -> None:
    """Add ``--recipe FILE`` (read before parsing by :func:`apply_recipe`)."""
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="a recipe JSON (e.g. training/configs/recipe_flexolmo_7b.json): its section for this "
                        "command gives flag values (key = flag without '--'); flags given on the command "
                        "line win; a key that is not a flag of this command is an error")


def _recipe_value(action, value, where: str):
    """``value`` (from JSON) as ``action`` would have parsed it; ``ValueError`` naming ``where``."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: a switch takes true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    many = action.nargs in ("+", "*") or isinstance(action, (argparse._AppendAction, argparse._ExtendAction))
    if many and not isinstance(value, list):
        value = [value]
    if isinstance(value, (dict, bool)) or (isinstance(value, list) and not many):
        raise ValueError(f"{where}: expected a value like on the command line, got {value!r}")

    def one(v):
        if isinstance(v, (dict, list, bool)) or v is None:
            raise ValueError(f"{where}: expected a value like on the command line, got {v!r}")
        try:
            out = action.type(str(v)) if action.type is not None else str(v)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        if action.choices is not None and out not in action.choices:
            raise ValueError(f"{where}: {v!r} is not one of {list(action.choices)}")
        return out

    if not many:
        return one(value)
    out = [one(v) for v in value]
    if isinstance(action, argparse._ExtendAction) and out and isinstance(out[0], list):
        out = [x for part in out for x in part]  # e.g. csv_list items
    return out


def apply_recipe(parser: argparse.ArgumentParser, command: str, path: str) -> dict:
    """Make the ``command`` section of the recipe ``path`` the defaults of ``parser`` (flags given
    on the command line still win; a required flag the recipe gives is no longer required).
    Returns ``{dest: value}``. ``ValueError`` naming the file, the section and the key for a
    missing file, bad JSON, a missing section, a key that is not a flag of ``command`` or a bad value.
    Keys starting with ``_`` are comments."""
    from pathlib import Path

    f = Path(path)
    if not f.is_file():
        raise ValueError(f"--recipe {path!r} does not exist")
    try:
        recipe = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--recipe {path!r}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"--recipe {path!r}: expected a JSON object with a section per command")
    sections = [k for k in recipe if not k.startswith("_")]
    if command not in recipe:
        raise ValueError(f"--recipe {path!r} has no {command!r} section (it has {sections})")
    section = recipe[command]
    if not isinstance(section, dict):
        raise ValueError(f"--recipe {path!r}: section {command!r} must be a JSON object of flag: value")
    actions = {s: a for a in parser._actions for s in a.option_strings}
    defaults = {}
    for key, value in section.items():
        if key.startswith("_"):
            continue
        where = f"--recipe {path!r} [{command}] {key!r}"
        action = actions.get(f"--{key}")
        if action is None or key in ("recipe", "help"):
            known = sorted(s[2:] for s in actions if s.startswith("--") and s not in ("--help", "--recipe"))
            raise ValueError(f"{where}: not a flag of `flexmoe {command}` (its flags: {', '.join(known)})")
        defaults[action.dest] = _recipe_value(action, value, where)
        action.required = False
    parser.set_defaults(**defaults)
    return defaults


def recipe_in_argv(argv) -> str | None:
    """The value of ``--recipe`` in ``argv`` (``--recipe F`` or ``--recipe=F``; the last one), or None."""
    found = None
    for i, a in enumerate(argv):
        if a == "--recipe" and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith("--recipe="):
            found = a.split("=", 1)[1]
    return found
