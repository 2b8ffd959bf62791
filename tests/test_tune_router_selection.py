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


def test_selection_rule_keeps_the_start_unless_a_step_beats_it():
    """The rule itself, on given losses: a validation that is not better than the best by more
    than min_delta is not kept; patience counts such validations in a row."""
    from flexmoe_training.selection import BestSelection, SelectionState

    rule = BestSelection(patience=2, min_delta=0.01)
    st = SelectionState.start(5.0, {"w": torch.zeros(1)})
    assert not st.observe(2, 5.5, lambda: {"w": torch.ones(1)}, rule)                  # worse: bad 1
    assert not st.observe(4, 4.5, lambda: {"w": torch.full((1,), 4.0)}, rule)          # better: kept, bad 0
    assert st.best_step == 4 and st.kept_trained and float(st.values["w"]) == 4.0
    assert not st.observe(6, 4.495, lambda: {"w": torch.full((1,), 6.0)}, rule)        # within min_delta: bad 1
    assert st.observe(8, float("nan"), lambda: {"w": torch.full((1,), 8.0)}, rule)      # NaN never wins: stop
    assert st.best_step == 4 and float(st.values["w"]) == 4.0 and st.stopped_early_at == 8
    rec = st.record(rule)
    assert rec["kept"] == "trained" and rec["history"][0] == [0, 5.0] and rec["improvement"] == 0.5
    st = SelectionState.start(5.0, {"w": torch.zeros(1)})
    for step, loss in ((2, 5.2), (4, 5.1), (6, 5.0)):
        st.observe(step, loss, lambda: {"w": torch.ones(1)}, BestSelection())
    assert st.best_step == 0 and not st.kept_trained and float(st.values["w"]) == 0.0   # ties keep the start
    with pytest.raises(ValueError, match="--patience"):
        BestSelection(patience=-1)


def test_nothing_better_keeps_the_untuned_router(recipe, tmp_path):  # noqa: F811
    """When no validation beats the untuned router (here by construction: --min-delta larger than
    any loss), the written router is the untuned one bit for bit (up to the positive-bias clamp,
    which changes no output); --no-keep-best writes the last, trained router. With --patience 1 the
    run stops at its first validation and finishes (not paused)."""
    common = ["--model", recipe / "merged", "--data", recipe / "data_pub", "--val-data", recipe / "data_a",
              "--steps", "6", "--eval-every", "2", "--lr", "1e-1", "--warmup-steps", "1", *FAST]
    assert run_cli(["tune-router", *common, "--out", tmp_path / "kept", "--patience", "0", "--min-delta", "100"]) == 0
    assert run_cli(["tune-router", *common, "--out", tmp_path / "last", "--no-keep-best"]) == 0
    untuned, kept, last = _routers(recipe / "merged"), _routers(tmp_path / "kept"), _routers(tmp_path / "last")
    for k, v in untuned.items():
        want = v.clamp(max=0) if k.endswith("expert_bias") else v
        assert torch.equal(kept[k], want), k
    assert any(not torch.equal(last[k], untuned[k]) for k in untuned)
    assert "selection" not in json.loads((tmp_path / "last" / "run.json").read_text())
    sel = json.loads((tmp_path / "kept" / "run.json").read_text())["selection"]
    assert sel["best_step"] == 0 and sel["kept"].startswith("start") and sel["eval_top_k"] == 2
    assert [h[0] for h in sel["history"]] == [0, 2, 4, 6]
    # the recorded start loss is the untuned model's own validation loss at the saved top-k
    assert sel["start_val_loss"] == pytest.approx(_val_loss(recipe / "merged", recipe / "data_a", 2), rel=1e-4)

    early = tmp_path / "early"
    assert run_cli(["tune-router", *common, "--out", early, "--patience", "1", "--min-delta", "100"]) == 0
    run = json.loads((early / "run.json").read_text())
    assert run["status"] == "finished" and run["step"] == 2 and run["selection"]["stopped_early_at"] == 2


def test_the_written_router_is_the_best_validated_one(recipe, tmp_path):  # noqa: F811
    """Whatever the seed: the written model's validation loss (recomputed here from the files) is
    the lowest in the history, and it is trained iff a step beat the untuned router."""
    out = tmp_path / "tuned"
    assert run_cli(["tune-router", "--model", recipe / "merged", "--data", recipe / "data_pub", "--val-data",
                    recipe / "data_a", "--out", out, "--steps", "8", "--eval-every", "2", "--lr", "3e-2",
                    "--warmup-steps", "1", *FAST]) == 0
    run = json.loads((out / "run.json").read_text())
    sel = run["selection"]
    assert sel["best_val_loss"] == min(h[1] for h in sel["history"]) == run["final_val_loss"]
    assert _val_loss(out, recipe / "data_a", 2) == pytest.approx(sel["best_val_loss"], rel=1e-4)
    moved = any(not torch.equal(a, b) for a, b in zip(_routers(recipe / "merged").values(), _routers(out).values()))
    assert moved == (sel["best_step"] > 0) == (sel["kept"] == "trained")


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


def test_owner_check_scores_candidates_on_the_owners_validation_split(recipe, tmp_path):  # noqa: F811
    """Each owner's one number per candidate is that candidate's mean cross-entropy on the owner's
    own validation split at its saved top-k (recomputed here); the decision keeps the tuned
    router only when the mean over the domains falls."""
    from flexmoe_training.data import DataDir, eval_windows
    from flexmoe_training.demo import owner_check

    assert run_cli(["tune-router", "--model", recipe / "merged", "--data", recipe / "data_pub", "--out",
                    tmp_path / "tuned", "--steps", "4", "--lr", "3e-2", "--no-keep-best", *FAST]) == 0
    out = tmp_path / "scores.json"
    assert owner_check.main(["--data", str(recipe / "data_a"), "--model", str(recipe / "merged"),
                             "--model", str(tmp_path / "tuned"), "--seq-len", "32", "--max-windows", "4",
                             "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    w = eval_windows([DataDir(recipe / "data_a")], 32, 4)
    assert got["tokens"] == w.shape[0] * 32
    for path, loss in zip((recipe / "merged", tmp_path / "tuned"), got["losses"]):
        m = FlexOlmoForCausalLM.from_pretrained(str(path)).eval()
        with torch.no_grad():
            logits = m(w[:, :-1]).logits
        ref = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)))
        assert loss == pytest.approx(ref, rel=1e-5)
    d = owner_check.choose({"code": [3.0, 2.0], "licenses": [2.9, 4.5], "web": [4.4, 4.1]})
    assert not d["keep_tuned"] and d["mean_tuned"] == pytest.approx(10.6 / 3) and d["scores"]["licenses"]["tuned"] == 4.5
    assert owner_check.choose({"code": [3.0, 2.5], "web": [4.4, 4.3]})["keep_tuned"]
    assert owner_check.main(["--data", str(tmp_path / "nope"), "--model", str(recipe / "merged"),
                             "--out", str(tmp_path / "x.json")]) == 2


def _route_prob(model_dir, data_dir, expert: str) -> float:
    """Mean router probability (softmax over all experts, every layer) of ``expert`` on ``data_dir``."""
    from flexmoe_training.data import DataDir, eval_windows

    m = FlexOlmoForCausalLM.from_pretrained(str(model_dir)).eval()
    e = m.config.expert_names.index(expert)
    w = eval_windows([DataDir(data_dir)], 32, 4, splits=("train", "val"))
    with torch.no_grad():
        logits = m(w[:, :-1], output_router_logits=True).router_logits
    return float(torch.stack([lg.softmax(-1)[:, e].mean() for lg in logits]).mean())


def test_routing_loss_is_the_routers_cross_entropy_per_window(recipe):  # noqa: F811
    """The trainer's loss with ``route=(w, targets)``: next-token CE + w x the mean over layers of
    the router logits' cross-entropy against each window's expert, every token of the window
    (rows of the router logits are (b, s)); -1 windows have no target; all -1 adds nothing."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from flexmoe_training.data import DataDir, eval_windows
    from flexmoe_training.trainer import _loss

    m = FlexOlmoForCausalLM.from_pretrained(str(recipe / "merged")).eval()
    w = eval_windows([DataDir(recipe / "data_a")], 16, 3, splits=("train", "val"))
    opts = SimpleNamespace(z_loss_weight=0.0)
    targets = torch.tensor([0, -1, 2])
    with torch.no_grad():
        plain = _loss(m, w, opts, False)[0]
        routed = _loss(m, w, opts, False, (2.5, targets))[0]
        none = _loss(m, w, opts, False, (2.5, torch.full((3,), -1)))[0]
        out = m(w[:, :-1], output_router_logits=True)
    t = targets.repeat_interleave(16)
    want = sum(F.cross_entropy(lg.float(), t, ignore_index=-1) for lg in out.router_logits) / len(out.router_logits)
    assert float(routed - plain) == pytest.approx(2.5 * float(want), rel=1e-5) and float(want) > 0.1
    assert float(none) == float(plain)


def test_routing_supervision_moves_each_source_towards_its_expert(recipe, tmp_path):  # noqa: F811
    """tune-router --route-data: owner a's data -> "public" (next-token training alone moves these
    tokens away from the public expert: the owners' experts model them better). A few small steps
    from the same start, same data and seed: with --route-weight 10 owner a's tokens end with a
    higher public probability than with weight 0. run.json records the targets and the weight."""
    common = ["--model", recipe / "merged", "--steps", "5", "--lr", "1e-3", "--warmup-steps", "1",
              "--no-keep-best", *FAST]
    routed = ["--route-data", f"public={recipe / 'data_a'}", "--route-data", f"colors={recipe / 'data_b'}"]
    assert run_cli(["tune-router", *common, *routed, "--route-weight", "10", "--out", tmp_path / "sup"]) == 0
    assert run_cli(["tune-router", *common, *routed, "--route-weight", "0", "--out", tmp_path / "lm"]) == 0
    pub_sup, pub_lm = (_route_prob(tmp_path / n, recipe / "data_a", "public") for n in ("sup", "lm"))
    col_sup, col_lm = (_route_prob(tmp_path / n, recipe / "data_b", "colors") for n in ("sup", "lm"))
    assert pub_sup > pub_lm and col_sup > col_lm, (pub_sup, pub_lm, col_sup, col_lm)
    rec = json.loads((tmp_path / "sup" / "run.json").read_text())
    assert rec["inputs"]["--route-data"] == ["public", "colors"] and rec["inputs"]["--route-weight"] == 10.0


@pytest.mark.parametrize("args, match", [
    (["--route-data", "alpha"], "--route-data must be EXPERT=DIR"),
    (["--route-data", "nobody={d}"], "'nobody' is not an expert of --model"),
    (["--route-data", "alpha={d}", "--route-weight", "nan"], "--route-weight must be a finite number"),
    ([], "give --data"),
    (["--data", "{d}", "--route-weight", "2"], "--route-weight needs --route-data"),
])
def test_route_data_errors_name_the_flag(recipe, tmp_path, capsys, args, match):  # noqa: F811
    argv = ["tune-router", "--model", recipe / "merged", "--out", tmp_path / "o", "--steps", "1", *FAST,
            *[a.format(d=recipe / "data_a") for a in args]]
    assert run_cli(argv) == 2
    assert match in capsys.readouterr().err
