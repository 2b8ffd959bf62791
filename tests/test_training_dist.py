"""Training in separate processes: 2 ranks over gloo (torch.distributed.run), pause and exact resume with 2
ranks for every ZeRO stage, resume after SIGKILL, and the refusal of a per-rank state saved by another
number of processes or at another ZeRO stage."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_training_common import (
    assert_same_run, data_and_model_config, fast_flags, import_training, losses, pause_args, run_cli, run_torchrun,
    run_torchrun_serial, subprocess_env,
)

pytest.importorskip("deepspeed")
import_training()

FAST = fast_flags(eval_batches=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = data_and_model_config(tmp_path_factory.mktemp("dist"), 16)
    assert run_cli(["train-public", "--data", root / "data", "--out", root / "public", "--model-config",
                    root / "model.json", "--steps", "2", *FAST]) == 0
    return root


def test_two_ranks_gloo_equal_one_rank(setup, tmp_path):
    """2 ranks x micro-batch 2 == 1 rank x 2 micro-steps of 2: same global batch, same losses."""
    common = ["train-expert", "--public", setup / "public", "--data", setup / "data", "--name", "owner",
              "--steps", "3", "--zero-stage", "2", *FAST]
    r = run_torchrun(common + ["--out", tmp_path / "two"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["world_size"] == 2 and run["status"] == "finished"
    assert run_cli(common + ["--grad-accum", "2", "--out", tmp_path / "one"]) == 0
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-5)


ZERO_STAGES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def straight_two_ranks(setup, tmp_path_factory):
    """The uninterrupted 2-rank run of every ZeRO stage (one torchrun launch for all): zero -> out dir."""
    root = tmp_path_factory.mktemp("straight2")
    outs = {z: root / f"zero{z}" for z in ZERO_STAGES}
    r = run_torchrun_serial([pause_args(setup, z) + ["--out", outs[z]] for z in ZERO_STAGES], root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return outs


@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_pause_then_resume_exact_two_ranks(setup, straight_two_ranks, tmp_path, zero):
    """2 ranks pause (both exit 0) and resume in a new launch to exactly the uninterrupted 2-rank run."""
    args = pause_args(setup, zero) + ["--out", tmp_path / "part"]
    work = tmp_path / "part.inprogress"
    r = run_torchrun(args + ["--max-steps-this-run", "2"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((work / "run.json").read_text())["status"] == "paused"
    saved = json.loads((work / "state" / "trainer_state.json").read_text())
    assert saved["step"] == 2 and saved["world_size"] == 2 and saved["zero_stage"] == zero
    r = run_torchrun(args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from step 2" in r.stdout and not work.exists()
    full, part = straight_two_ranks[zero], tmp_path / "part"
    assert json.loads((part / "run.json").read_text())["world_size"] == 2
    assert_same_run(full, part, 4)


def test_resume_after_sigkill(setup, tmp_path):
    args = ["train-public", "--data", setup / "data", "--model-config", setup / "model.json", "--steps", "24",
            "--seed", "3", *FAST]
    out = tmp_path / "killed"
    work = tmp_path / "killed.inprogress"
    cmd = [sys.executable, "-m", "flexmoe_training.cli", *map(str, args), "--out", str(out), "--save-every", "1"]
    proc = subprocess.Popen(cmd, env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    state = work / "state" / "trainer_state.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.is_file():
                try:
                    if json.loads(state.read_text())["step"] >= 2:
                        break
                except (json.JSONDecodeError, OSError, KeyError):
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and work.is_dir()
    killed_at = json.loads(state.read_text())["step"]
    assert 2 <= killed_at < 24
    # resume: the same command again
    assert run_cli(args + ["--out", out, "--save-every", "1"]) == 0
    assert run_cli(args + ["--out", tmp_path / "straight"]) == 0
    a, b = losses(tmp_path / "straight"), losses(out)
    assert len(a) == len(b) == 24
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-6, rtol=1e-6)
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] == killed_at
    assert not work.exists()


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_in_process_run_leaves_no_group_or_launcher_env(setup, tmp_path):
    """A run in this interpreter tears its 1-process group down and takes its launcher variables
    out of ``os.environ`` again, so a child started with this interpreter's environment as is
    (not cleaned as by ``subprocess_env``) trains on a port of its own instead of failing with
    "address already in use" on the in-process run's port."""
    import torch.distributed as dist

    before = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    args = ["train-public", "--data", setup / "data", "--model-config", setup / "model.json", "--steps", "1", *FAST]
    assert run_cli(args + ["--out", tmp_path / "here"]) == 0
    env = dict(os.environ, PYTHONPATH=subprocess_env(tmp_path)["PYTHONPATH"], DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "flexmoe_training.cli", *map(str, args), "--out", str(tmp_path / "child")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "child" / "run.json").read_text())["status"] == "finished"
    assert not dist.is_initialized()
    assert {k: os.environ.get(k) for k in LAUNCHER_VARS} == before
    # a second in-process run after the tear-down sets the group up again
    assert run_cli(args + ["--out", tmp_path / "again"]) == 0


def test_resume_refuses_another_world_size_or_stage(setup, tmp_path, capsys):
    """ZeRO 1-3 states are per rank (each rank wrote its own partition): a state saved by another
    number of processes, or at another stage, is refused with a message naming both (and
    --overwrite discards it); ZeRO-0 holds no partitions and is not refused for the world size."""
    args = pause_args(setup, 2) + ["--out", tmp_path / "part"]
    assert run_cli(args + ["--max-steps-this-run", "1"]) == 0
    meta_path = tmp_path / "part.inprogress" / "state" / "trainer_state.json"
    meta = json.loads(meta_path.read_text())
    assert meta["world_size"] == 1 and meta["zero_stage"] == 2
    meta_path.write_text(json.dumps(dict(meta, world_size=2)))
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert "saved by 2 process(es) at ZeRO stage 2, this run has 1 at stage 2" in err
    meta_path.write_text(json.dumps(meta))
    assert run_cli(pause_args(setup, 3) + ["--out", tmp_path / "part"]) == 2
    assert "ZeRO stage 2, this run has 1 at stage 3" in capsys.readouterr().err
    assert run_cli(pause_args(setup, 3) + ["--out", tmp_path / "part", "--overwrite"]) == 0
    assert json.loads((tmp_path / "part" / "run.json").read_text())["resumed_from_step"] is None
