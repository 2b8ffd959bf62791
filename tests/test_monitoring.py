"""Issue 25 item 3: runs you can watch. DeepSpeed's own monitor gets loss, lr, tokens/s, TFLOP/s
per GPU, MFU and memory per step: CSV always (OUT/monitor/csv/), TensorBoard with --tensorboard
(read back from the event files), W&B with --wandb-project; metrics.jsonl carries the same
figures (``flexmoe plan --measured-tflops`` reads it); --log-level info logs a line per step."""
from __future__ import annotations

import csv
import json
import logging

import pytest

from test_training_common import data_and_model_config, fast_flags, import_training, run_cli

pytest.importorskip("deepspeed")
import_training()

STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return data_and_model_config(tmp_path_factory.mktemp("monitor"), 10)


def _train(root, out, *extra):
    return run_cli(["train-public", "--data", root / "data", "--model-config", root / "model.json", "--out", out,
                    "--steps", str(STEPS), *fast_flags(eval_batches=1), *extra])


def _metrics(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_tensorboard_and_csv_monitor_read_back(setup, tmp_path, caplog):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard; in the "
                                              "test extra): the event files cannot be read back")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "out", tmp_path / "tb"
    with caplog.at_level(logging.INFO, logger="flexmoe_training.train"):
        assert _train(setup, out, "--tensorboard", tb, "--peak-tflops", "2", "--log-level", "info") == 0
    recs = _metrics(out)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        assert r["tflops_per_gpu"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 2) and r["memory_gib"] > 0
    files = list((tb / "public").glob("events.out.tfevents.*"))
    assert files, list(tb.rglob("*"))
    acc = EventAccumulator(str(tb / "public"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("loss", "lr", "tokens_per_s", "tflops_per_gpu", "mfu", "memory_gib"):
        assert f"Train/{name}" in tags, tags
        ev = acc.Scalars(f"Train/{name}")
        assert [e.step for e in ev] == list(range(1, STEPS + 1))
        for e, r in zip(ev, recs):
            assert e.value == pytest.approx(r[name], rel=1e-5)
    # the CSV monitor, always on, kept in the checkpoint directory
    with open(out / "monitor" / "csv" / "Train_loss.csv") as fh:
        rows = list(csv.reader(fh))
    assert [float(v) for _, v in rows[1:]] == pytest.approx([r["loss"] for r in recs])
    assert sum("step 2/3" in m and "MFU" in m for m in caplog.messages) == 1


def test_csv_monitor_always_and_no_mfu_without_a_peak(setup, tmp_path):
    out = tmp_path / "out"
    assert _train(setup, out) == 0
    assert (out / "monitor" / "csv" / "Train_tokens_per_s.csv").is_file()
    assert all(r["mfu"] is None and r["tflops_per_gpu"] > 0 for r in _metrics(out))  # CPU: no known peak


def test_wandb_without_the_package_is_an_error_naming_the_flag(setup, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    assert _train(setup, tmp_path / "out", "--wandb-project", "x") == 2
    err = capsys.readouterr().err
    assert "--wandb-project" in err and "pip install wandb" in err
    assert not (tmp_path / "out").exists()


def test_plan_reads_measured_tflops_from_a_runs_metrics(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(setup, out) == 0
    capsys.readouterr()
    assert run_cli(["plan", "--model-config", "olmo2-7b", "--gpus", "8", "--zero-stage", "3",
                    "--measured-tflops", out / "metrics.jsonl", "--json"]) == 0
    t = json.loads(capsys.readouterr().out)["throughput"]
    assert "measured" in t["source"] and t["tflops_per_gpu"] > 0
