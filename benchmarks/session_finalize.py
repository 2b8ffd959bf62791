"""The last step of the prepared GPU session (:mod:`benchmarks.gpu_session` ``finalize``): merge
every step's results, fill the stamped commit, write the summary, the plots and the
best-measured config table.
"""
from __future__ import annotations

import json
from pathlib import Path

from .session_prereq import EXT_DIR, ROOT

PARTS = ("layer-fine-grained", "layer-flexolmo-7x7b", "routing", "e2e")


def _merge(work: Path) -> tuple:
    """(meta of the first part, every part's rows, every part's command)."""
    from benchmarks import harness

    meta, rows, cmds = None, [], []
    for part in PARTS:
        try:
            m, r = harness.load_results(work / part)
        except (ValueError, OSError) as exc:
            print(f"[finalize] {part}: no results ({exc})", flush=True)
            continue
        meta = meta or dict(m)
        rows += r
        cmds.append(m.get("command"))
    return meta, rows, cmds


def _fill_commit(meta: dict, rows: list) -> None:
    """Without .git on the GPU machine, take the commit stamped by ``--dry-run --check``."""
    if meta.get("git_commit"):
        return
    stamp = ROOT / EXT_DIR / "commit.txt"
    sha = stamp.read_text().strip() if stamp.is_file() else None
    meta["git_commit"] = sha
    meta["git_commit_source"] = f"{EXT_DIR}/commit.txt (stamped before the GPU run)" if sha else "unknown"
    for r in rows:
        r["git_commit"] = r.get("git_commit") or sha


def _steps_section(out: Path) -> str:
    try:
        steps = json.loads((out / "steps.json").read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return ""
    lines = ["## Session steps", "", "| step | budget s | elapsed s | exit | timed out |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['budget_s']} | {s['elapsed_s']} | {s['exit_codes']} | {s['timed_out']} |"
              for s in steps]
    return "\n".join(lines) + "\n"


def _dump_logs(work: Path) -> None:
    """Every harness log (one line per row, tracebacks) into the console, hence log.txt."""
    for log in sorted(work.glob("*/log.txt")):
        text = log.read_text(errors="replace")
        print(f"\n----- {log.parent.name}/log.txt ({len(text)} chars) -----\n{text[-200_000:]}", flush=True)


def cmd_finalize(args) -> int:
    from benchmarks import harness, report
    from benchmarks.gpu_sweep import best_table, table_file_name

    out, work = Path(args.out), Path(args.work)
    _dump_logs(work)
    meta, rows, cmds = _merge(work)
    if meta is None:
        print("[finalize] nothing to merge", flush=True)
        return 0
    _fill_commit(meta, rows)
    meta.update(command="bash benchmarks/gpu_session.sh OUT_DIR", parts=cmds)
    paths = harness.write_results(out, meta, rows)
    print(f"[finalize] {len(rows)} rows -> {paths['json']}, {paths['csv']}", flush=True)
    table, notes = best_table([r for r in rows if r.get("bench") == "layer"], meta["device"])
    for n in notes:
        print(f"[finalize] table: {n}", flush=True)
    if table is not None:
        (out / table_file_name(meta["device"])).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    for what, fn in (("summary", lambda: (out / "summary.md").write_text(
            report.summarize(meta, rows) + "\n" + _steps_section(out), encoding="utf-8")),
                     ("plots", lambda: report.make_plots(meta, rows, work / "plots")),
                     ("targets", lambda: print(report.format_targets(meta, rows), flush=True))):
        try:
            (work / "plots").mkdir(exist_ok=True)
            fn()
        except Exception as exc:  # noqa: BLE001 - each is a convenience; the rows are written
            print(f"[finalize] {what} failed: {type(exc).__name__}: {exc}", flush=True)
    return 0
