"""How the demo runs the ``flexmoe`` training commands: each as its own process, in parallel
where the recipe allows (owners are independent), with the output in a log file per process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Sequence

__all__ = ["StageError", "cli_options", "done", "opt", "parallel", "read_run", "run_cli", "run_module", "training_env"]


class StageError(RuntimeError):
    """A demo stage failed (the message names the command and its log file)."""


def training_env() -> dict:
    """Environment for child processes: they import flexmoe_training the way we were imported."""
    import flexmoe_training
    from flexmoe_training.distributed import child_env

    env = child_env(dict(os.environ))

    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(flexmoe_training.__file__)))
    import flexmoe_kernels

    kern_parent = os.path.dirname(os.path.dirname(os.path.abspath(flexmoe_kernels.__file__)))
    extra = []
    # flexmoe_training may be a symlink (development) -> keep the directory that holds the link
    for p in sys.path:
        if p and os.path.isdir(os.path.join(p, "flexmoe_training")):
            extra.append(os.path.abspath(p))
            break
    extra += [kern_parent, pkg_parent]
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(extra + ([old] if old else [])))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_cli(args: Sequence[str], log_path: str, echo: bool, env: dict) -> None:
    """Run ``python -m flexmoe_training.cli ARGS`` as its own process; output to ``log_path`` (and the terminal)."""
    run_module("flexmoe_training.cli", args, log_path, echo, env, name=f"flexmoe {args[0]}")


def run_module(module: str, args: Sequence[str], log_path: str, echo: bool, env: dict, name: str = "") -> None:
    """Run ``python -m MODULE ARGS`` as its own process; output to ``log_path`` (and the terminal).
    StageError naming the command (``name``, default the module) and the log when it fails."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    with open(log_path, "ab") as logf:
        logf.write(("$ " + " ".join(cmd) + "\n").encode())
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        while True:
            chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
            if not chunk:
                break
            logf.write(chunk)
            logf.flush()
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        tail = open(log_path, "rb").read()[-3000:].decode("utf-8", "replace")
        raise StageError(f"`{name or module}` failed with exit status {rc}; log: {log_path}\n{tail}")


def cli_options(command: str) -> set:
    """Option strings that ``flexmoe COMMAND`` accepts (read from the argument parser, no process)."""
    from flexmoe_training import cli

    parser = cli.build_parser()
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no public API for this
        sub = action.choices.get(command)
        if sub is not None:
            return set(sub._option_string_actions)  # noqa: SLF001
    raise StageError(f"the training command `flexmoe {command}` does not exist (yet) in flexmoe_training")


def opt(options: set, **kw) -> List[str]:
    """``--flag value`` pairs for the given keyword arguments that the command accepts."""
    out: List[str] = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is None or flag not in options:
            continue
        if isinstance(v, bool):
            if v:
                out.append(flag)
        else:
            out += [flag, str(v)]
    return out


def parallel(tasks, jobs: int, log, timings: Dict[str, float]) -> Dict[str, str]:
    """Run ``(name, fn)`` tasks, ``jobs`` at a time (threads that wait on child processes).

    Returns ``{name: first line of the error}`` for the tasks that failed; the others finish.
    """
    from concurrent.futures import ThreadPoolExecutor

    errors: Dict[str, str] = {}

    def wrap(name, fn):
        t = time.time()
        log(f"   start {name}")
        try:
            fn()
        except StageError as e:
            errors[name] = str(e).splitlines()[0]
            log(f"   FAILED {name}: {e}")
            return
        dt = time.time() - t
        timings[name] = dt
        log(f"   done  {name} in {dt:.1f} s")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for f in [pool.submit(wrap, n, fn) for n, fn in tasks]:
            f.result()
    return errors


def done(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "run.json")) and os.path.isfile(os.path.join(path, "config.json"))


def read_run(path: str) -> dict:
    try:
        with open(os.path.join(path, "run.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
