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
