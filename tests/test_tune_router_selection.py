"""Router tuning that cannot make the model worse: tune-router validates the untuned router,
then every --eval-every steps with the saved top-k, writes the router of the best validation
(the untuned one when nothing improved on it) and stops after --patience validations without
improvement; a paused run resumes its selection exactly."""
from __future__ import annotations

import json

import pytest
import torch

from test_training_common import import_training, run_cli

pytest.importorskip("deepspeed")
import_training()

from flexmoe_kernels.models import FlexOlmoForCausalLM  # noqa: E402
from flexmoe_kernels.models.checkpoint import load_state_dict  # noqa: E402
from test_training import FAST, recipe  # noqa: E402,F401  (the module-scoped fixture)


def _routers(d) -> dict:
    return {k: v for k, v in load_state_dict(d).items() if ".gate." in k}


def _val_loss(model_dir, data_dir, top_k: int) -> float:
    """Mean cross-entropy of the saved model with ``top_k`` experts on every token of ``data_dir``
    in windows of 32 + 1 (the test's --seq-len), the way the trainer validates with --val-data."""
    from flexmoe_training.data import DataDir, eval_windows

    m = FlexOlmoForCausalLM.from_pretrained(str(model_dir)).eval()
    m.set_top_k(top_k)
    w = eval_windows([DataDir(data_dir)], 32, 4, splits=("train", "val"))
    with torch.no_grad():
        logits = m(w[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)))


def test_tuning_that_hurts_keeps_the_untuned_router(recipe, tmp_path):  # noqa: F811
    """A learning rate that wrecks the router: --keep-best writes the untuned router (bit for bit,
    up to the positive-bias clamp, which changes no output); --no-keep-best writes the wrecked one,
    which validates worse (so this test can fail)."""
    common = ["--model", recipe / "merged", "--data", recipe / "data_pub", "--val-data", recipe / "data_a",
              "--steps", "6", "--eval-every", "2", "--lr", "30", "--warmup-steps", "1", *FAST]
    assert run_cli(["tune-router", *common, "--out", tmp_path / "kept", "--patience", "0"]) == 0
    assert run_cli(["tune-router", *common, "--out", tmp_path / "last", "--no-keep-best"]) == 0
    untuned, kept, last = _routers(recipe / "merged"), _routers(tmp_path / "kept"), _routers(tmp_path / "last")
    for k, v in untuned.items():
        want = v.clamp(max=0) if k.endswith("expert_bias") else v
        assert torch.equal(kept[k], want), k
    assert any(not torch.equal(last[k], untuned[k]) for k in untuned)
    sel = json.loads((tmp_path / "kept" / "run.json").read_text())["selection"]
    assert sel["best_step"] == 0 and sel["kept"].startswith("start") and sel["eval_top_k"] == 2
    assert [h[0] for h in sel["history"]] == [0, 2, 4, 6]
    assert all(h[1] >= sel["start_val_loss"] for h in sel["history"][1:])
    # the recorded start loss is the untuned model's own validation loss at the saved top-k
    assert sel["start_val_loss"] == pytest.approx(_val_loss(recipe / "merged", recipe / "data_a", 2), rel=1e-4)
    assert _val_loss(tmp_path / "last", recipe / "data_a", 2) > sel["start_val_loss"]


def test_tuning_that_helps_is_kept_and_a_plateau_stops_early(recipe, tmp_path):  # noqa: F811
    """Validating on the tuning data's own held-out split with a sane learning rate improves on
    the untuned router: the best step's router is written (not the untuned one), and its
    validation loss is the best recorded. With --patience 1 and a wrecking learning rate the run
    stops at its first validation and finishes (not paused) with the untuned router."""
    out = tmp_path / "tuned"
    assert run_cli(["tune-router", "--model", recipe / "merged", "--data", recipe / "data_pub", "--out", out,
                    "--steps", "8", "--eval-every", "2", "--lr", "3e-2", "--warmup-steps", "1", *FAST]) == 0
    run = json.loads((out / "run.json").read_text())
    sel = run["selection"]
    assert sel["best_val_loss"] == min(h[1] for h in sel["history"])
    assert sel["best_step"] > 0 and sel["kept"] == "trained" and sel["improvement"] > 0, sel
    assert run["final_val_loss"] == sel["best_val_loss"]
    assert any(not torch.equal(a, b) for a, b in zip(_routers(recipe / "merged").values(), _routers(out).values()))

    early = tmp_path / "early"
    assert run_cli(["tune-router", "--model", recipe / "merged", "--data", recipe / "data_pub", "--out", early,
                    "--steps", "8", "--eval-every", "2", "--lr", "30", "--warmup-steps", "1", "--patience", "1",
                    *FAST]) == 0
    run = json.loads((early / "run.json").read_text())
    assert run["status"] == "finished" and run["step"] == 2 and run["selection"]["stopped_early_at"] == 2


def test_paused_tuning_resumes_its_selection(recipe, tmp_path):  # noqa: F811
    args = ["tune-router", "--model", recipe / "merged", "--data", recipe / "data_pub", "--steps", "6",
            "--eval-every", "2", "--lr", "3e-2", "--warmup-steps", "1", *FAST]
    assert run_cli(args + ["--out", tmp_path / "full"]) == 0
    assert run_cli(args + ["--out", tmp_path / "part", "--max-steps-this-run", "3"]) == 0
    assert (tmp_path / "part.inprogress" / "selection.json").is_file()
    assert run_cli(args + ["--out", tmp_path / "part"]) == 0
    a = json.loads((tmp_path / "full" / "run.json").read_text())["selection"]
    b = json.loads((tmp_path / "part" / "run.json").read_text())["selection"]
    assert a["history"] == b["history"] and a["best_step"] == b["best_step"]
    for k, v in _routers(tmp_path / "full").items():
        assert torch.equal(v, _routers(tmp_path / "part")[k]), k
    # a selection file from another step than the resumable state is refused, naming --restart
    assert run_cli(args + ["--out", tmp_path / "p2", "--max-steps-this-run", "3"]) == 0
    meta = tmp_path / "p2.inprogress" / "selection.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), saved_at_step=1)))
    assert run_cli(args + ["--out", tmp_path / "p2"]) == 2
