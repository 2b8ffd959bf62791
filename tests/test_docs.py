"""The documentation runs as written (issue 12 item 8).

* Every ```python block of README.md and docs/*.md is executed, as written, in a temporary
  directory (no network). A block that cannot run here is marked by the line
  ``<!-- no-test: REASON -->`` right before its opening fence, and only then skipped.
* The demo's time estimate is stated once in code (``pipeline.MINUTES_ON_2_CORE_CPU``) and the
  README, docs/DEMO.md and ``flexmoe demo --help`` say the same.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST = re.compile(r"<!--\s*no-test:\s*(.*?)\s*-->")


def python_blocks(text: str) -> list:
    """``(line, code, skip_reason)`` for each ```python block of a Markdown text; ``line`` is the
    1-based line of the opening fence, ``skip_reason`` the reason of a ``<!-- no-test: ... -->``
    marker on the last non-blank line before it (None: the block must run; "" for a marker
    without a reason, which the tests refuse)."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = re.match(r"\s*(`{3,})\s*(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        ticks, lang = fence.group(1), fence.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(ticks)), len(lines))
        if lang in ("python", "py"):
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            m = NO_TEST.fullmatch(prev.strip())
            out.append((i + 1, "\n".join(lines[i + 1:end]) + "\n", m.group(1) if m else None))
        i = end + 1
    return out


def _all_blocks():
    return [pytest.param(p, line, code, skip, id=f"{p.relative_to(ROOT)}:{line}")
            for p in DOCS for line, code, skip in python_blocks(p.read_text(encoding="utf-8"))]


def test_block_extraction_honours_the_marker():
    md = "\n".join(["text", "```python", "a = 1", "```", "", "<!-- no-test: needs a GPU -->", "", "```python",
                    "b = 2", "```", "```bash", "echo", "```", "<!-- no-test: -->", "```py", "c = 3", "```",
                    "```text", "<!-- no-test: x -->", "```", "```python", "d = 4", "```"])
    assert python_blocks(md) == [(2, "a = 1\n", None), (8, "b = 2\n", "needs a GPU"), (15, "c = 3\n", ""),
                                 (21, "d = 4\n", None)]
    assert len(_all_blocks()) >= 3  # README's three blocks at least


@pytest.mark.parametrize("path,line,code,skip", _all_blocks())
def test_python_block_runs_as_written(path, line, code, skip, tmp_path, monkeypatch, one_thread):
    if skip is not None:
        assert skip, f"{path.name}:{line}: a no-test marker must give its reason"
        pytest.skip(f"{path.name}:{line} marked no-test: {skip}")
    monkeypatch.chdir(tmp_path)  # blocks write their checkpoints here
    exec(compile(code, f"{path.name}:{line}", "exec"), {"__name__": "__docs__"})


def test_demo_time_estimate_is_stated_once():
    """The estimates come from one constant; README.md and docs/DEMO.md state no other."""
    from flexmoe_training.demo.pipeline import MINUTES_ON_2_CORE_CPU, estimate

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    demo = (ROOT / "docs" / "DEMO.md").read_text(encoding="utf-8")
    for size in ("default", "quick"):
        assert estimate(size) in readme.lower(), size
        assert estimate(size) in demo.lower(), size
    # every "about N min..." in either file is one of the stated estimates
    stated = set(MINUTES_ON_2_CORE_CPU.values())
    for name, text in (("README.md", readme), ("docs/DEMO.md", demo)):
        for m in re.finditer(r"(?:about|~)\s*([\d.\-]+)\s*min", text, re.I):
            assert m.group(1).isdigit() and int(m.group(1)) in stated, (name, m.group(0))


# What the benchmarks tell their users names no internal issue number and none of the
# development environment's device tool (its procedure is docs/GPU_SESSION.md, for developers).
INTERNAL = re.compile(r"\bissues? \d|device tool|give_back|files_at|budget_left_s", re.I)


def _internal(text: str) -> list:
    return [text[max(0, m.start() - 40):m.end() + 40] for m in INTERNAL.finditer(text)]


def test_benchmark_texts_speak_to_users(tmp_path, monkeypatch, capsys):
    """benchmarks/README.md, the ``--targets`` report, the prepared GPU session's printed plan
    (``bash benchmarks/gpu_session.sh --dry-run``, run in-process without recording the sweep's
    inventory) and its ``--help``, and the benchmarks' sources: no "issue <n>", no device tool."""
    import argparse
    import json
    import subprocess
    import sys

    from benchmarks import gpu_session as gs

    readme = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    assert not _internal(readme), _internal(readme)
    assert "(../docs/GPU_SESSION.md)" in readme and (ROOT / "docs" / "GPU_SESSION.md").is_file()
    assert "bash benchmarks/gpu_session.sh OUT_DIR" in readme and "--dry-run" in readme

    for src in sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.sh")):
        found = [s for s in _internal(src.read_text(encoding="utf-8")) if re.search(r"issues? \d", s, re.I)]
        assert not found, (src.name, found)

    rows = [dict(bench="layer", preset="flexolmo-7x7b", provider=p, mode="fwd", mask="none", T=8192, ms=ms,
                 tflops=tf, status="ok") for p, ms, tf in (("triton", 1.0, 720.0), ("cublas_gemm", 0.9, 800.0))]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"meta": {"device": "cpu", "meaningless_cpu_numbers": True}, "rows": rows}))
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--targets", str(results)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "PASS" in r.stdout and "NOT MEASURED" in r.stdout, r.stderr
    assert not _internal(r.stdout), _internal(r.stdout)

    monkeypatch.setattr(gs, "load_inventory", lambda *a, **k: {})  # the plan's assumed figures: no recording
    gs.cmd_plan(argparse.Namespace(check=False))
    plan = capsys.readouterr().out
    assert plan.startswith("Prepared GPU session: bash benchmarks/gpu_session.sh OUT_DIR")
    assert "docs/GPU_SESSION.md" in plan and not _internal(plan), _internal(plan)
    helps = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--help"], capture_output=True,
                           text=True, timeout=30).stdout
    helps += subprocess.run([sys.executable, "-m", "benchmarks.gpu_session", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60).stdout
    assert "gpu_session.sh" in helps and not _internal(helps), _internal(helps)
