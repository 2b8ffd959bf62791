"""Owner-side check of router tuning: each data owner scores candidate merged models on its own
held-out data, in its own process, and publishes only one number per candidate.

Router tuning trains on public text (the owners' proxies and a public sample), so its own
validation rewards the public expert and cannot see what tuning does to an owner's domain
(docs/DEMO.md, "Why tuning can still hurt the owners"). Only the owners' data can, and it never
leaves them: this module runs with one owner's data directory, computes each candidate's mean
next-token cross-entropy (nats/token) on that directory's *validation* split (never the test
documents the demo's claims are judged on), at the candidate's saved top-k, and writes
``{"losses": [...], "tokens": N}``. The demo keeps the tuned router only when it lowers the mean
of these numbers over the owners and the public data (:func:`choose`).

Command line (what the demo runs per owner and for the public data)::

    python -m flexmoe_training.demo.owner_check --data OWNER_DATA_DIR --model UNTUNED --model TUNED \\
        --seq-len 128 --max-windows 64 --out SCORES.json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Sequence

__all__ = ["candidate_losses", "choose", "main", "window_loss"]


def candidate_losses(data_dir: str, models: Sequence[str], seq_len: int, max_windows: int,
                     batch_size: int = 8) -> tuple:
    """``([loss per model], tokens scored)``: mean next-token cross-entropy of each checkpoint in
    ``models`` on the validation split of ``data_dir`` (windows of ``seq_len + 1`` tokens, at most
    ``max_windows``), each at its saved top-k. ``ValueError`` when the split has no window."""
    import torch

    from flexmoe_kernels.models import FlexOlmoForCausalLM

    from ..data import DataDir, eval_windows

    windows = eval_windows([DataDir(data_dir)], seq_len, max_windows)
    if windows.shape[0] == 0:
        raise ValueError(f"--data {data_dir!r}: its validation split has no window of {seq_len + 1} tokens")
    losses = [window_loss(FlexOlmoForCausalLM.from_pretrained(path, dtype=torch.float32), windows, batch_size)
              for path in models]
    return losses, int(windows.shape[0] * seq_len)


def window_loss(model, windows, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` (in eval mode, at its current top-k)
    over ``windows`` (W, S+1): tokens 1..S of every window, predicted from the ones before."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            w = windows[i:i + batch_size]
            logits = model(w[:, :-1]).logits.float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                           reduction="sum"))
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def choose(scores: Dict[str, List[float]]) -> dict:
    """The decision from ``{domain: [untuned loss, tuned loss]}`` (each owner's and the public
    data's own numbers): keep the tuned router iff the mean over the domains is lower with it."""
    if not scores:
        raise ValueError("no owner scores to decide from")
    untuned = sum(v[0] for v in scores.values()) / len(scores)
    tuned = sum(v[1] for v in scores.values()) / len(scores)
    return {"keep_tuned": tuned < untuned, "mean_untuned": untuned, "mean_tuned": tuned,
            "scores": {d: {"untuned": v[0], "tuned": v[1]} for d, v in scores.items()}}


def main(argv=None) -> int:
    """Command line: score ``--model`` checkpoints on ``--data``'s validation split; write ``--out``."""
    from flexmoe_kernels.utils.fs import write_text_atomic

    p = argparse.ArgumentParser(prog="python -m flexmoe_training.demo.owner_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the owner's prepared data directory (its val split is scored)")
    p.add_argument("--model", action="append", required=True, help="a candidate checkpoint (repeat)")
    p.add_argument("--seq-len", type=int, default=128, help="window length in tokens (default 128)")
    p.add_argument("--max-windows", type=int, default=64, help="at most this many windows (default 64)")
    p.add_argument("--out", required=True, help="JSON file for the numbers (nothing else leaves)")
    args = p.parse_args(argv)
    if args.seq_len < 1 or args.max_windows < 1:
        print("owner_check: --seq-len and --max-windows must be >= 1", file=sys.stderr)
        return 2
    try:
        losses, tokens = candidate_losses(args.data, args.model, args.seq_len, args.max_windows)
    except (ValueError, OSError) as exc:
        print(f"owner_check: {exc}", file=sys.stderr)
        return 2
    write_text_atomic(args.out, json.dumps({"losses": losses, "tokens": tokens}))
    print(f"owner_check: {tokens} validation tokens, losses " + ", ".join(f"{x:.4f}" for x in losses), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
