"""Shared helpers of the training tests (no tests here): import ``flexmoe_training`` from ``training/`` without an
install, make random text corpora, tiny model configs, and run the CLI in-process or as a process."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fast_flags(eval_batches: int = 2) -> list:
    """Training flags that keep a tiny CPU run to seconds."""
    return ["--seq-len", "32", "--micro-batch-size", "2", "--no-progress", "--eval-batches", str(eval_batches),
            "--warmup-steps", "2"]


def seeded_rng() -> tuple[int, random.Random]:
    """A fresh seed (printed by the caller's failure message) and its ``random.Random``."""
    seed = random.randrange(2**31)
    return seed, random.Random(seed)


def import_training():
    """``flexmoe_training`` (installed, or aliased to ``training/`` of this checkout)."""
    try:
        import flexmoe_training

        return flexmoe_training
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "flexmoe_training", ROOT / "training" / "__init__.py", submodule_search_locations=[str(ROOT / "training")]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["flexmoe_training"] = mod
        spec.loader.exec_module(mod)
        return mod


def subprocess_env(tmp: Path) -> dict:
    """Environment in which ``python -m flexmoe_training.cli`` works in a child process."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)  # set by an in-process run in this interpreter
    link_dir = tmp / "pkglink"  # this checkout's training/ as the package flexmoe_training
    link_dir.mkdir(exist_ok=True)
    link = link_dir / "flexmoe_training"
    if not link.exists():
        link.symlink_to(ROOT / "training")
    paths = [str(link_dir), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env["DS_ACCELERATOR"] = "cpu"
    return env


WORDS = ("the of and to in is was for on with as by at from that this which model data expert public owner "
         "river mountain stock market protein gene theorem proof kernel tensor token router").split()


def write_corpus(directory: Path, n_docs: int, rng: random.Random, vocab: tuple = WORDS, min_words: int = 40,
                 max_words: int = 120) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [rng.choice(vocab) for _ in range(rng.randint(min_words, max_words))]
        (directory / f"doc{i:03d}.txt").write_text(" ".join(words) + ".\n")
    return directory


def tiny_model_config(path: Path, **over) -> Path:
    cfg = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "max_position_embeddings": 256, "initializer_range": 0.05}
    cfg.update(over)
    path.write_text(json.dumps(cfg))
    return path


def run_cli(args: list) -> int:
    """``flexmoe ARGS`` in this process (exit status)."""
    import_training()
    from flexmoe_training.cli import main

    return main([str(a) for a in args])


def run_cli_process(args: list, tmp: Path, timeout: float = 240, launcher: list | None = None):
    cmd = [sys.executable] + (launcher or []) + ["-m", "flexmoe_training.cli"] + [str(a) for a in args]
    return subprocess.run(cmd, env=subprocess_env(tmp), capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out.append(rec["loss"])
    return out


def torchrun_cmd(nproc: int = 2) -> list:
    """``python -m torch.distributed.run`` with ``nproc`` local ranks on a free port (gloo on CPU)."""
    from flexmoe_kernels.utils.net import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())]


def run_torchrun(args: list, tmp: Path, nproc: int = 2, timeout: float = 300):
    """``flexmoe ARGS`` in ``nproc`` processes under torchrun (``CompletedProcess``, text output)."""
    cmd = torchrun_cmd(nproc) + ["-m", "flexmoe_training.cli"] + [str(a) for a in args]
    return subprocess.run(cmd, env=subprocess_env(tmp), capture_output=True, text=True, timeout=timeout)


_SERIAL_DRIVER = """import json, sys
import torch.distributed as dist
dist.init_process_group("gloo")  # the caller's group: every run below joins it, none tears it down
from flexmoe_training.cli import main
for argv in json.loads(sys.argv[1]):
    rc = main(argv)
    if rc != 0:
        sys.exit(f"flexmoe {argv} exited {rc}")
dist.barrier()  # no rank tears the group down while its peer still works
dist.destroy_process_group()
"""


def run_torchrun_serial(commands: list, tmp: Path, nproc: int = 2, timeout: float = 400):
    """Several ``flexmoe`` commands one after the other in one torchrun launch of ``nproc`` processes
    (one process start-up for all: cheaper than a launch each)."""
    script = tmp / "serial_driver.py"
    script.write_text(_SERIAL_DRIVER)
    cmd = torchrun_cmd(nproc) + [str(script), json.dumps([[str(a) for a in c] for c in commands])]
    return subprocess.run(cmd, env=subprocess_env(tmp), capture_output=True, text=True, timeout=timeout)


def data_and_model_config(root: Path, n_docs: int) -> Path:
    """``root/data`` (``prepare-data`` of ``n_docs`` random documents) and ``root/model.json``
    (:func:`tiny_model_config`); returns ``root``."""
    _, rng = seeded_rng()
    write_corpus(root / "text", n_docs, rng)
    assert run_cli(["prepare-data", "--input", root / "text", "--out", root / "data", "--no-progress"]) == 0
    tiny_model_config(root / "model.json")
    return root


def pause_args(root: Path, zero: int, eval_batches: int = 1) -> list:
    """train-public of :func:`data_and_model_config`'s ``root`` for 4 steps at ZeRO stage ``zero``
    (two param groups: weight decay on matrices only)."""
    return ["train-public", "--data", root / "data", "--model-config", root / "model.json", "--steps", "4",
            "--zero-stage", str(zero), *fast_flags(eval_batches=eval_batches)]


def assert_same_run(a: Path, b: Path, n_steps: int) -> None:
    """Run ``b``'s losses and final weights equal run ``a``'s (the resume tests' tolerance: losses
    1e-6, weights atol 1e-6 / rtol 1e-5); both have ``n_steps`` steps."""
    import torch

    from flexmoe_kernels.models.checkpoint import load_state_dict

    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == n_steps
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), atol=1e-6, rtol=1e-6)
    sa, sb = load_state_dict(a), load_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-6, rtol=1e-5)
