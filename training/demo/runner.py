"""How the demo runs the ``flexmoe`` training commands: each as its own process, in parallel
where the recipe allows (owners are independent), with the output in a log file per process."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["RUNNING", "Progress", "StageError", "cli_options", "done", "duration_text", "opt", "parallel", "progress_ticker",
           "read_run", "run_cli", "run_module", "training_env"]


class StageError(RuntimeError):
    """A demo stage failed (the message names the command and its log file)."""


class Progress:
    """What each running child process last said about its progress (thread safe).

    :func:`run_module` feeds it every output line of its child; the trainer's step lines
    (``[kind] step N/M loss L ...`` with ``--no-progress``) and tqdm bars (``N/M [...loss=L``)
    give the step, the total and the loss; :meth:`lines` turns that into one line per child with
    an estimate of the time left (from the steps' pace since the first one it saw)."""

    _TRAINER = re.compile(r"step (\d+)/(\d+) loss ([-+0-9.eEnaif]+)")
    _TQDM = re.compile(r"(\d+)/(\d+) \[.*?loss=([-+0-9.eEnaif]+)")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: Dict[str, dict] = {}

    def started(self, name: str, log_path: str) -> None:
        with self._lock:
            self._running[name] = {"t_start": time.time(), "log": log_path, "step": None}

    def finished(self, name: str) -> None:
        with self._lock:
            self._running.pop(name, None)

    def line(self, name: str, text: str) -> None:
        """Read one output line of the child ``name``."""
        m = self._TRAINER.search(text) or self._TQDM.search(text)
        if m is None:
            return
        step, total, loss = int(m.group(1)), int(m.group(2)), m.group(3)
        now = time.time()
        with self._lock:
            st = self._running.get(name)
            if st is None:
                return
            if st["step"] is None:
                st["first"] = (step, now)
            st.update(step=step, total=total, loss=loss, t_step=now)

    def lines(self, now: Optional[float] = None) -> List[str]:
        """One line per running child: its step, loss and time left, or how long it has run."""
        now = time.time() if now is None else now
        out = []
        with self._lock:
            items = sorted(self._running.items(), key=lambda kv: kv[1]["t_start"])
        for name, st in items:
            ran = f"running {duration_text(now - st['t_start'])}"
            if st["step"] is None:
                out.append(f"{name}: {ran} (log {st['log']})")
                continue
            s0, t0 = st["first"]
            left = ""
            if st["step"] > 0:
                # the pace since the first step line seen, once that spans a few seconds (lines can
                # arrive in bursts on a loaded machine); before that, since the process started
                # (which counts its start-up too: an overestimate, never a burst's underestimate)
                if st["step"] > s0 and st["t_step"] - t0 >= 5.0:
                    per_step = (st["t_step"] - t0) / (st["step"] - s0)
                else:
                    per_step = (st["t_step"] - st["t_start"]) / st["step"]
                eta = max(0.0, per_step * (st["total"] - st["step"]) - (now - st["t_step"]))
                left = f", about {duration_text(eta)} left"
            out.append(f"{name}: step {st['step']}/{st['total']}, loss {st['loss']}{left} ({ran})")
        return out


def duration_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


#: The children that :func:`run_module` is running now, for :func:`progress_ticker`.
RUNNING = Progress()


@contextlib.contextmanager
def progress_ticker(log: Callable[[str], None], every: float = 10.0, progress: Progress = RUNNING,
                    idle: Callable[[], Optional[str]] = lambda: None):
    """While the block runs, log a progress line per running child every ``every`` seconds, or
    ``idle()`` (e.g. the in-process stage and how long it has run) when no child runs."""
    stop = threading.Event()

    def tick():
        while not stop.wait(every):
            texts = progress.lines() or [t for t in [idle()] if t]
            for text in texts:
                log(f"   .. {text}")

    th = threading.Thread(target=tick, name="demo-progress", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=every)


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
    label = os.path.splitext(os.path.basename(log_path))[0]      # e.g. train-expert-code
    RUNNING.started(label, log_path)
    try:
        with open(log_path, "ab") as logf:
            logf.write(("$ " + " ".join(cmd) + "\n").encode())
            logf.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            rc = _pump(proc, logf, echo, lambda text: RUNNING.line(label, text))
    finally:
        RUNNING.finished(label)
    if rc != 0:
        tail = open(log_path, "rb").read()[-3000:].decode("utf-8", "replace")
        raise StageError(f"`{name or module}` failed with exit status {rc}; log: {log_path}\n{tail}")


def _pump(proc, logf, echo: bool, on_line: Callable[[str], None]) -> int:
    """Copy the child's output to ``logf`` (and the terminal with ``echo``), each complete line
    (ended by a newline or a carriage return) to ``on_line``; the child's exit status."""
    pending = b""
    while True:
        chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not chunk:
            break
        logf.write(chunk)
        logf.flush()
        if echo:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        *done_lines, pending = re.split(rb"[\r\n]", pending + chunk)
        for raw in done_lines:
            on_line(raw.decode("utf-8", "replace"))
    return proc.wait()


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
