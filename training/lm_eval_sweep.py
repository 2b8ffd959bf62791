"""``flexmoe eval``'s engine: opt-out configurations evaluated on lm-evaluation-harness with
one loaded model, and the report (``results.json``, ``results.csv``, ``table.md``, ``heatmap.png``).

A *configuration* is a set of allowed experts and a top-k. :func:`sweep_configurations` gives
the paper's opt-out table: every expert allowed, each non-public expert opted out in turn, the
public expert alone; each with the checkpoint's top-k, lowered to the set's size where the set
is smaller (recorded as ``top_k_lowered_from``). :func:`run_configurations` evaluates each
configuration on each task with ``lm_eval.simple_evaluate`` on the same
:class:`flexmoe_kernels.integrations.lm_eval.FlexMoELM` (reconfigured, never reloaded) and
keeps lm-eval's own ``results`` dict per task unchanged.

Importing this module needs nothing beyond the package; the functions that run lm-eval
import it when called.
"""
from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["ALL", "check_include_path", "explicit_configurations", "metric_rows", "public_expert",
           "run_configurations", "sweep_configurations", "task_manager_for", "write_report"]

ALL = "all"
SCHEMA = 1


# ----------------------------------------------------------------------------- configurations
def public_expert(names: Sequence[str]) -> str:
    """The public expert: the one named ``public``, else expert 0 (FlexOlmo puts it first)."""
    return "public" if "public" in names else names[0]


def _config(name: str, allowed: Sequence[str], names: Sequence[str], top_k: int, lowered: Optional[int]) -> dict:
    return {"name": name, "allowed_experts": list(allowed), "opted_out": [n for n in names if n not in allowed],
            "top_k": int(top_k), "top_k_lowered_from": lowered}


def sweep_configurations(names: Sequence[str], top_k: int) -> list[dict]:
    """The opt-out sweep: ``all``, ``no-<expert>`` for each non-public expert, ``<public>-only``.
    Each keeps ``top_k`` unless its set is smaller (then the set's size, ``top_k_lowered_from`` set).
    ``ValueError`` for a model with one expert (nothing to opt out)."""
    names = list(names)
    if len(names) < 2:
        raise ValueError(f"--opt-out-sweep: the model has {len(names)} expert ({', '.join(names)}): nothing to opt out")
    public = public_expert(names)
    configs = [_config(ALL, names, names, top_k, None)]
    for n in names:
        if n != public:
            allowed = [m for m in names if m != n]
            k = min(top_k, len(allowed))
            configs.append(_config(f"no-{n}", allowed, names, k, top_k if k < top_k else None))
    configs.append(_config(f"{public}-only", [public], names, 1, top_k if top_k > 1 else None))
    return configs


def explicit_configurations(sets: Sequence[Sequence[Any]], names: Sequence[str], top_k: int,
                            explicit_top_k: Optional[int] = None, flag: str = "--allowed-experts") -> list[dict]:
    """``all`` (the table's baseline) then one configuration per allowed set (names or indices).
    Each set routes ``explicit_top_k`` (``--top-k``) experts per token, else the checkpoint's
    ``top_k``; a set smaller than that is a ``ValueError`` naming ``flag`` that says what to do."""
    from flexmoe_kernels.integrations.lm_eval import parse_expert_list

    names = list(names)
    k_all = min(explicit_top_k, len(names)) if explicit_top_k else top_k
    configs = [_config(ALL, names, names, k_all, None)]
    for raw in sets:
        allowed = parse_expert_list(raw if isinstance(raw, str) else "|".join(map(str, raw)), names, argument=flag)
        k = explicit_top_k or top_k
        if len(allowed) < k:
            how = (f"lower --top-k to {len(allowed)} or less" if explicit_top_k
                   else f"pass --top-k {len(allowed)} (the checkpoint's top-k is {top_k}), or use --opt-out-sweep, "
                        f"which lowers it by itself")
            raise ValueError(f"{flag} {','.join(allowed)}: allows {len(allowed)} expert{'s' if len(allowed) != 1 else ''}, fewer than top-k {k} "
                             f"experts per token: allow at least {k} experts or {how}")
        name = "+".join(allowed) if len(allowed) < len(names) else f"{ALL}@k{k}"
        if any(c["name"] == name and c["top_k"] == k for c in configs):
            continue
        configs.append(_config(name, allowed, names, k, None))
    return configs


# ----------------------------------------------------------------------------- tasks
def check_include_path(path: Optional[str], flag: str = "--include-path") -> list[str]:
    """Parse every task YAML under ``path`` as lm-eval does; returns the task / group names.
    ``ValueError`` naming ``flag`` for a missing directory, a file that does not parse or has
    no ``task`` / ``group``, or a directory with no YAML at all."""
    if path is None:
        return []
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path!r} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a directory of task YAML files")
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    found: dict = {}
    files = list(TaskIndex._iter_yaml_files(Path(path)))
    if not files:
        raise ValueError(f"{flag} {path!r} has no task YAML (*.yaml) in it")
    for f in files:
        try:
            cfg = load_yaml(f, resolve_func=False, recursive=True)
            TaskIndex.process_cfg(cfg, f, found)
        except Exception as exc:
            why = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ValueError(f"{flag} {path!r}: {os.path.relpath(f, path)} does not parse as an lm-eval task: "
                             f"{type(exc).__name__}: {why}") from exc
    return sorted(found)


def task_manager_for(tasks: Sequence[str], include_path: Optional[str], flag: str = "--tasks"):
    """An lm-eval ``TaskManager`` that knows every task of ``tasks`` (only ``include_path`` is
    indexed when it holds them all: fast; else lm-eval's own tasks too). ``ValueError`` naming
    ``flag`` for an unknown task (with the close names)."""
    import difflib

    from lm_eval.tasks import TaskManager

    tm = None
    if include_path:
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in tm.all_tasks for t in tasks):
            tm = None
    if tm is None:
        tm = TaskManager(include_path=include_path)
    for t in tasks:
        if t not in tm.all_tasks:
            close = difflib.get_close_matches(t, tm.all_tasks, n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            where = f" nor in --include-path {include_path!r}" if include_path else " (pass --include-path for your own)"
            raise ValueError(f"{flag}: unknown task {t!r}: not one of lm-eval's {len(tm.all_tasks)} tasks{where}{hint}")
    return tm


def build_tasks(tasks: Sequence[str], tm, flag: str = "--tasks") -> None:
    """Build every task once (its dataset loads, its templates compile) so that a broken task
    fails before any evaluation; ``ValueError`` naming ``flag`` and the task."""
    for t in tasks:
        try:
            if hasattr(tm, "load"):  # lm-eval >= 0.4.10
                tm.load([t])
            else:
                from lm_eval.tasks import get_task_dict

                get_task_dict([t], tm)
        except Exception as exc:
            why = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ValueError(f"{flag}: task {t!r} could not be built: {type(exc).__name__}: {why}") from exc


# ----------------------------------------------------------------------------- running
def run_configurations(lm, configs: Sequence[dict], tasks: Sequence[str], tm, *, limit=None,
                       progress: bool = True, keep_samples: bool = False,
                       log: Callable[[str], None] = print, **evaluate_kwargs) -> tuple[list[dict], dict]:
    """Evaluate each configuration on each task with ``lm_eval.simple_evaluate`` on ``lm`` (a
    ``FlexMoELM``, reconfigured per configuration). Returns ``(records, run_info)``: one record
    per configuration (its fields plus lm-eval's ``results`` per task unchanged, ``versions``,
    ``n-shot``, ``n-samples``, ``higher_is_better``, ``seconds``; ``samples`` when
    ``keep_samples``), and lm-eval's seeds / version from its first run."""
    import lm_eval
    from tqdm.auto import tqdm

    records, run_info = [], {}
    bar = tqdm(total=len(configs) * len(tasks), desc="flexmoe eval", unit="task", disable=not progress,
               dynamic_ncols=True)
    try:
        for cfg in configs:
            lm.configure(cfg["allowed_experts"], cfg["top_k"])
            if cfg.get("top_k_lowered_from"):
                log(f"flexmoe eval: {cfg['name']}: top-k lowered from {cfg['top_k_lowered_from']} to {cfg['top_k']} "
                    f"(only {len(cfg['allowed_experts'])} allowed)")
            rec = dict(cfg, results={}, versions={}, **{"n-shot": {}, "n-samples": {}, "higher_is_better": {}})
            if keep_samples:
                rec["samples"] = {}
            t0 = time.perf_counter()
            for task in tasks:
                bar.set_postfix_str(f"{cfg['name']} / {task}")
                out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit,
                                              log_samples=keep_samples, **evaluate_kwargs)
                if not run_info:
                    c = out.get("config", {})
                    run_info = {"lm_eval_version": out.get("lm_eval_version") or lm_eval.__version__,
                                "random_seed": c.get("random_seed"), "numpy_seed": c.get("numpy_seed"),
                                "torch_seed": c.get("torch_seed"), "fewshot_seed": c.get("fewshot_seed"),
                                "transformers_version": out.get("transformers_version"),
                                "bootstrap_iters": c.get("bootstrap_iters")}
                for key in ("results", "versions", "n-shot", "n-samples", "higher_is_better"):
                    rec[key].update(out.get(key) or {})
                if keep_samples:
                    rec["samples"].update(out.get("samples") or {})
                bar.update(1)
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            records.append(rec)
    finally:
        bar.close()
    return records, run_info


# ----------------------------------------------------------------------------- report
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metric_rows(records: Sequence[dict], metrics: Optional[Sequence[str]] = None) -> list[tuple[str, str]]:
    """The ``(task, "metric,filter")`` rows of the table: every numeric, non-stderr metric of
    the first configuration (only those named in ``metrics`` when given), in lm-eval's order."""
    rows = []
    for task, res in records[0]["results"].items():
        for key, v in res.items():
            name = key.split(",")[0]
            if "," in key and "_stderr" not in name and _is_number(v) and (not metrics or name in metrics):
                rows.append((task, key))
    return rows


def _value(rec: dict, task: str, key: str) -> Optional[float]:
    v = rec["results"].get(task, {}).get(key)
    return float(v) if _is_number(v) else None


def _fmt(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"


def _delta(v: Optional[float], base: Optional[float]) -> Optional[float]:
    return None if v is None or base is None else v - base


def _csv(records: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["configuration", "allowed_experts", "opted_out", "top_k", "task", "metric", "filter", "value",
                "stderr", "change_from_all"])
    rows = metric_rows(records)
    for rec in records:
        for task, key in rows:
            metric, filt = key.split(",", 1)
            v, base = _value(rec, task, key), _value(records[0], task, key)
            se = rec["results"].get(task, {}).get(f"{metric}_stderr,{filt}")
            d = _delta(v, base)
            w.writerow([rec["name"], "|".join(rec["allowed_experts"]), "|".join(rec["opted_out"]), rec["top_k"], task,
                        metric, filt, "" if v is None else repr(v), repr(float(se)) if _is_number(se) else "",
                        "" if d is None else repr(d)])
    return buf.getvalue()


def _markdown(records: Sequence[dict], title: str, metrics=None) -> str:
    rows = metric_rows(records, metrics)
    head = [f"{r['name']} (k={r['top_k']})" for r in records]
    lines = [f"# {title}", "",
             "Each cell: the score, and for every configuration after the first its change from `all` "
             "(every expert allowed). k: experts per token" +
             ("; lowered where the set is smaller than the checkpoint's top-k." if any(
                 r.get("top_k_lowered_from") for r in records) else "."), "",
             "| task | metric | " + " | ".join(head) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in head) + " |"]
    for task, key in rows:
        base = _value(records[0], task, key)
        cells = []
        for i, rec in enumerate(records):
            v = _value(rec, task, key)
            d = _delta(v, base)
            cells.append(_fmt(v) if i == 0 or d is None else f"{_fmt(v)} ({'+' if d >= 0 else ''}{_fmt(d)})")
        lines.append(f"| {task} | {key.replace(',none', '')} | " + " | ".join(cells) + " |")
    lines += ["", "| configuration | allowed experts | opted out | top-k | seconds |", "| --- | --- | --- | ---: | ---: |"]
    for rec in records:
        k = f"{rec['top_k']}" + (f" (lowered from {rec['top_k_lowered_from']})" if rec.get("top_k_lowered_from") else "")
        lines.append(f"| {rec['name']} | {', '.join(rec['allowed_experts'])} | {', '.join(rec['opted_out']) or '-'} "
                     f"| {k} | {rec.get('seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


def _heatmap(records: Sequence[dict], path: str, title: str, metrics=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = metric_rows(records, metrics) or metric_rows(records)
    vals = np.array([[_value(r, t, k) if _value(r, t, k) is not None else np.nan for r in records] for t, k in rows],
                    dtype=float).reshape(len(rows), len(records))
    delta = vals - vals[:, :1]
    # colour: blue = better than all experts, red = worse (lm-eval's higher_is_better per metric)
    sign = np.array([[-1.0 if records[0].get("higher_is_better", {}).get(t, {}).get(k.split(",")[0]) is False
                      else 1.0] for t, k in rows]).reshape(len(rows), 1)
    better = delta * sign
    lim = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 0.0
    lim = lim if lim > 0 else 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(records), 0.9 + 0.5 * len(rows)), dpi=80)
    im = ax.imshow(better, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(records)), [f"{r['name']}\nk={r['top_k']}" for r in records], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{t}\n{k.replace(',none', '')}" for t, k in rows], fontsize=8)
    for i in range(len(rows)):
        for j in range(len(records)):
            if np.isfinite(vals[i, j]):
                dark = np.isfinite(delta[i, j]) and abs(delta[i, j]) > 0.6 * lim
                ax.text(j, i, f"{vals[i, j]:.3f}" + ("" if j == 0 else f"\n{delta[i, j]:+.3f}"), ha="center",
                        va="center", fontsize=7, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="better (+) / worse (-) than all experts")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def git_commit(path: str) -> Optional[str]:
    """The git commit of the source tree at ``path``, with ``+dirty`` when tracked files differ
    from it (None when it is not a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_report(out: str, payload: dict, *, samples: Optional[dict] = None,
                 metrics: Optional[Sequence[str]] = None) -> None:
    """Write ``out/`` atomically (built beside it, renamed into place): ``results.json``
    (``payload``), ``results.csv`` (every metric), ``table.md`` and ``heatmap.png`` (the
    ``metrics`` named, default all) and, with ``samples`` (configuration -> task -> lm-eval's
    samples), ``samples/<configuration>/<task>.jsonl``."""
    import json

    from lm_eval.utils import handle_non_serializable

    from flexmoe_kernels.utils.fs import atomic_directory

    records = payload["configurations"]
    title = f"{os.path.basename(os.path.normpath(payload['model']['pretrained']))}: opt-out on lm-eval"
    with atomic_directory(out) as d:
        (d / "results.json").write_text(json.dumps(payload, indent=2, default=handle_non_serializable) + "\n")
        (d / "results.csv").write_text(_csv(records))
        (d / "table.md").write_text(_markdown(records, title, metrics))
        _heatmap(records, str(d / "heatmap.png"), title, metrics)
        for cname, by_task in (samples or {}).items():
            sd = d / "samples" / cname
            sd.mkdir(parents=True, exist_ok=True)
            for task, rows in by_task.items():
                with open(sd / f"{task}.jsonl", "w") as fh:
                    for row in rows:
                        fh.write(json.dumps(row, default=handle_non_serializable) + "\n")
