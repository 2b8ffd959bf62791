"""The demo's progress lines: what a child process says about its steps becomes a line with the
step, the loss and the time left; the ticker speaks while a child or an in-process stage runs."""
from __future__ import annotations

import sys
import threading
import time

import pytest

pytest.importorskip("flexmoe_training")

from flexmoe_training.demo import runner  # noqa: E402
from flexmoe_training.demo.pipeline import DemoSettings, settings_table  # noqa: E402


def test_trainer_step_lines_give_step_loss_and_time_left():
    p = runner.Progress()
    p.started("train-public", "/run/logs/train-public.log")
    assert p.lines() == [p.lines()[0]] and "running" in p.lines()[0] and "train-public.log" in p.lines()[0]
    t0 = time.time()
    p.line("train-public", "[public] step 10/200 loss 4.5000 lr 1.00e-03 tok/s 900")
    p._running["train-public"]["first"] = (10, t0 - 20.0)       # 10 steps took 20 s before this one
    p.line("train-public", "[public] step 20/200 loss 3.2500 lr 1.00e-03 tok/s 900")
    (line,) = p.lines(now=p._running["train-public"]["t_step"])
    assert line.startswith("train-public: step 20/200, loss 3.2500")
    # (20 s for 10 steps) * 180 steps left = 360 s = 6 min
    assert "about 6 min 00 s left" in line, line
    # lines that arrive in one burst (a loaded machine): the pace since the process started
    q = runner.Progress()
    q.started("x", "x.log")
    q._running["x"]["t_start"] -= 30.0                      # started 30 s ago
    q.line("x", "[public] step 10/40 loss 1.0")
    q.line("x", "[public] step 20/40 loss 0.9")             # 0 s after the first: no pace from these two
    (line,) = q.lines(now=q._running["x"]["t_step"])
    assert "about 30 s left" in line, line                  # 30 s for 20 steps, 20 left
    p.finished("train-public")
    assert p.lines() == []


def test_tqdm_bars_are_read_too():
    p = runner.Progress()
    p.started("train-expert-code", "x.log")
    p.line("train-expert-code", "expert:  15%|#5        | 30/200 [00:12<01:08,  2.49step/s, loss=2.9876, tok_s=812]")
    assert "step 30/200, loss 2.9876" in p.lines()[0]


def test_run_module_reports_child_progress_while_it_runs(tmp_path):
    """A real child process: its step lines reach the progress record before it exits."""
    script = tmp_path / "child.py"
    script.write_text("import time\nfor i in range(1, 4):\n"
                      "    print(f'[toy] step {i}/3 loss {1.0 / i:.4f}', flush=True)\n    time.sleep(0.4)\n"
                      "time.sleep(1.0)\n")
    seen = []

    def watch():
        for _ in range(50):
            seen.extend(runner.RUNNING.lines())
            time.sleep(0.05)

    th = threading.Thread(target=watch)
    th.start()
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    runner.run_module("child", [], str(tmp_path / "toy-run.log"), False, env)
    th.join()
    assert any("toy-run: step 3/3, loss 0.3333" in s for s in seen), seen
    assert runner.RUNNING.lines() == []                      # finished children are forgotten
    assert "[toy] step 3/3" in (tmp_path / "toy-run.log").read_text()


def test_ticker_logs_at_least_every_period_child_or_stage():
    p = runner.Progress()
    out = []
    with runner.progress_ticker(out.append, every=0.1, progress=p, idle=lambda: "evaluate: running 3 s"):
        time.sleep(0.35)
        p.started("merge", "merge.log")
        time.sleep(0.3)
    assert any("evaluate: running" in s for s in out) and any(s.startswith("   .. merge: running") for s in out), out
    assert len(out) >= 4


def test_settings_table_shows_resolved_top_k():
    lines = settings_table(DemoSettings(num_owners=3))
    assert lines[0] == "settings:"
    (row,) = [ln for ln in lines if ln.strip().startswith("top_k")]
    assert "3 (0 = the number of owners)" in row
    assert not any("{" in ln for ln in lines)                # a table, not a JSON dump
