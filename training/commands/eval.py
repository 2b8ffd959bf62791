"""``flexmoe eval``: opt-out configurations of an MoE checkpoint on lm-evaluation-harness, and the
paper's opt-out table (``--opt-out-sweep``) in one command. The engine: :mod:`flexmoe_training.lm_eval_sweep`;
the lm-eval model type: :mod:`flexmoe_kernels.integrations.lm_eval`."""
from __future__ import annotations

import os
import sys
import time

from .common import FORMATTER, add_name_list, check_out_free, check_output, csv_list, guard

DESCRIPTION = """\
Evaluate --model on lm-eval --tasks under one or many opt-out configurations, loading the model
once. Every configuration runs lm-eval's stock Hugging Face model class with our MoE layer patched
in (a FlexOlmo checkpoint with the router expert bias, which transformers lacks: our own model in
that class) and the opted-out experts' router logits set to -inf before the softmax (exactly the
checkpoint rebuilt without them). The same model type for lm-eval's own command line:
python -m flexmoe_kernels.integrations.lm_eval --model flexmoe --model_args pretrained=M,allowed_experts=a|b

Configurations:
  --opt-out-sweep          all experts; each non-public expert opted out in turn; the public expert
                           alone (the public expert: the one named "public", else expert 0). Each
                           keeps the checkpoint's top-k unless its set is smaller: then the top-k is
                           lowered to the set's size (printed, and recorded in the results).
  --allowed-experts A,B    one configuration per occurrence (names or indices), after the
                           all-experts baseline; --top-k sets the experts per token.
  neither                  every expert allowed, only.

Writes OUT/ atomically: results.json (per configuration: allowed experts, top-k, lm-eval's own
results dict per task, unchanged; lm-eval's version and seeds; the model's commit / weight hash),
results.csv, table.md (tasks x configurations with each one's change from all experts), heatmap.png,
and with --log-samples OUT/samples/<configuration>/<task>.jsonl.

Needs lm-eval: pip install 'lm-eval[hf]==0.4.*' matplotlib (or the package's [eval] extra).
Offline: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1, a local checkpoint and local task YAML files
(dataset_path: json) under --include-path.

Example:
  flexmoe eval --model runs/demo/<run>/ckpt/merged --tasks hellaswag,arc_easy --limit 200 \\
      --opt-out-sweep --out evals/merged"""


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("eval", formatter_class=FORMATTER, description=DESCRIPTION,
                       help="evaluate opt-out configurations on lm-evaluation-harness (the opt-out table)")
    p.add_argument("--model", required=True,
                   help="checkpoint directory or Hugging Face Hub id of an MoE transformers can load: flex_olmo "
                        "(ours or transformers'), olmoe, qwen3_moe, mixtral")
    p.add_argument("--tasks", required=True, type=csv_list, metavar="T[,T...]", help="lm-eval task or group names")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a directory of your own task YAML files")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--allowed-experts", type=csv_list, action="append", default=None, metavar="A,B",
                     help="one configuration: the experts allowed (names or indices; comma- or |-separated); "
                          "repeat for more configurations")
    who.add_argument("--opt-out-sweep", action="store_true",
                     help="all experts, each non-public expert opted out, the public expert alone")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="experts per token for --allowed-experts (default: the checkpoint's)")
    add_name_list(p, "--expert-names", "the E expert names, when the checkpoint's config has none")
    p.add_argument("--limit", type=float, default=None, metavar="N",
                   help="at most N examples per task (a fraction if < 1): for quick looks, not for reporting")
    p.add_argument("--batch-size", default="1", metavar="B", help="lm-eval batch size (an integer or 'auto'; default 1)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--moe-backend", default="auto", help="our MoE layer's backend: auto, torch, triton, cuda")
    p.add_argument("--revision", default=None, help="with a Hub id: the branch, tag or commit")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    add_name_list(p, "--metrics", "the metrics of table.md and heatmap.png, e.g. acc,bits_per_byte (default: "
                                  "every metric; results.json and results.csv always have them all)")
    p.add_argument("--log-samples", action="store_true", help="also write every sample's inputs and scores")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's own log lines")
    p.set_defaults(func=run)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@guard
def run(args) -> int:
    """Check every input, load the model once, evaluate each configuration, write the report."""
    t_start = time.perf_counter()
    local_model = args.model if os.path.exists(args.model) else None
    check_output(args.out, [("--model", local_model), ("--include-path", args.include_path)])
    check_out_free(_path(args.out), args.overwrite)
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_k is not None and args.opt_out_sweep:
        raise ValueError("--top-k goes with --allowed-experts; --opt-out-sweep keeps the checkpoint's top-k "
                         "(lowered where a set is smaller)")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit:g}")
    batch_size = args.batch_size if args.batch_size.startswith("auto") else _positive_int(args.batch_size)
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"flexmoe eval needs lm-evaluation-harness ({exc}): pip install 'lm-eval[hf]==0.4.*' "
                         f"matplotlib") from None
    import logging

    if not args.verbose:
        for name in ("lm_eval", "lm-eval", "lm_eval.evaluator", "transformers", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)

    from flexmoe_kernels.integrations.lm_eval import FlexMoELM, inspect_checkpoint

    from .. import lm_eval_sweep as sweep

    # 1. the model's config (no weights): an MoE we can opt out of, its names and top-k
    info = inspect_checkpoint(args.model, revision=args.revision, argument="--model",
                              expert_names="|".join(args.expert_names) if args.expert_names else None)
    names, top_k = info["expert_names"], info["top_k"]
    # 2. the configurations
    if args.opt_out_sweep:
        configs = sweep.sweep_configurations(names, top_k)
    elif args.allowed_experts:
        configs = sweep.explicit_configurations(args.allowed_experts, names, top_k, args.top_k)
    else:
        configs = sweep.explicit_configurations([], names, top_k, args.top_k)
    # 3. the tasks: the include path parses, every task exists and builds
    sweep.check_include_path(args.include_path)
    tm = sweep.task_manager_for(args.tasks, args.include_path)
    sweep.build_tasks(args.tasks, tm)
    # 4. the model, once
    device = _device(args.device)
    _note(f"flexmoe eval: {args.model} ({info['model_type']}, experts {', '.join(names)}, top-k {top_k}) on "
          f"{device}: {len(configs)} configuration(s) x {len(args.tasks)} task(s)")
    lm = FlexMoELM(pretrained=args.model, device=device, batch_size=batch_size, dtype=args.dtype,
                   moe_backend=args.moe_backend, expert_names="|".join(names),
                   **({"revision": args.revision} if args.revision else {}))
    lm.quiet = not args.verbose
    if not args.verbose:
        try:
            import datasets

            datasets.disable_progress_bars()
        except (ImportError, AttributeError):
            pass
    # 5. evaluate
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    records, run_info = sweep.run_configurations(
        lm, configs, args.tasks, tm, limit=limit, progress=args.progress, keep_samples=args.log_samples, log=_note,
        **({"num_fewshot": args.num_fewshot} if args.num_fewshot is not None else {}))
    samples = {r["name"]: r.pop("samples") for r in records} if args.log_samples else None
    payload = _payload(args, lm, info, records, run_info, limit, batch_size, device, time.perf_counter() - t_start)
    sweep.write_report(args.out, payload, samples=samples, metrics=args.metrics)
    print((_path(args.out) / "table.md").read_text())
    _note(f"flexmoe eval: wrote {args.out}/results.json, results.csv, table.md, heatmap.png "
          f"in {time.perf_counter() - t_start:.1f} s")
    return 0


def _path(p):
    from pathlib import Path

    return Path(p)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise ValueError(f"--batch-size must be a positive integer or 'auto', got {s!r}")
    return v


def _payload(args, lm, info, records, run_info, limit, batch_size, device, seconds) -> dict:
    import platform

    import torch
    import transformers

    import flexmoe_kernels

    from .. import lm_eval_sweep as sweep

    pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(flexmoe_kernels.__file__)))
    return {
        "schema": sweep.SCHEMA,
        "model": {
            "pretrained": args.model,
            "revision": args.revision,
            "commit": lm.checkpoint_info.get("commit") or info.get("commit"),
            "tensors_sha256": lm.tensors_sha256(),
            "model_type": info["model_type"],
            "expert_names": list(lm.expert_names),
            "checkpoint_top_k": lm.checkpoint_top_k,
            "dtype": str(lm._model.dtype),
            "moe_backend": args.moe_backend,
        },
        "lm_eval": run_info,
        "tasks": list(args.tasks),
        "include_path": os.path.abspath(args.include_path) if args.include_path else None,
        "limit": limit,
        "num_fewshot": args.num_fewshot,
        "batch_size": batch_size,
        "device": device,
        "environment": {
            "flexmoe_kernels": flexmoe_kernels.__version__,
            "flexmoe_kernels_git_commit": sweep.git_commit(pkg_dir),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
            "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE"),
        },
        "seconds": round(seconds, 3),
        "configurations": records,
    }
