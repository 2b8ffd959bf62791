"""``flexmoe eval`` parts that need no lm-eval: runs in the main test environment too."""
from __future__ import annotations

import importlib.util

import pytest

from flexmoe_training import lm_eval_sweep as sweep
from flexmoe_training.cli import main as flexmoe_main


def test_help_lists_the_configurations(capsys):
    with pytest.raises(SystemExit) as e:
        flexmoe_main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: flexmoe eval" in out and "--opt-out-sweep" in out and "--allowed-experts" in out


def test_sweep_configurations():
    confs = sweep.sweep_configurations(["public", "math", "news", "code"], 3)
    assert [(c["name"], c["top_k"], c["top_k_lowered_from"]) for c in confs] == [
        ("all", 3, None), ("no-math", 3, None), ("no-news", 3, None), ("no-code", 3, None), ("public-only", 1, 3)]
    assert confs[2]["opted_out"] == ["news"] and confs[2]["allowed_experts"] == ["public", "math", "code"]
    # 2 experts, top-2 (Ai2's 2x7B): the opt-out leaves 1 expert, so its top-k is lowered too
    two = sweep.sweep_configurations(["public", "math"], 2)
    assert [(c["name"], c["top_k"], c["top_k_lowered_from"]) for c in two] == [
        ("all", 2, None), ("no-math", 1, 2), ("public-only", 1, 2)]
    # no expert named public: expert 0 is the public one
    assert sweep.sweep_configurations(["a", "b", "c"], 1)[-1]["name"] == "a-only"
    with pytest.raises(ValueError, match="--opt-out-sweep: the model has 1 expert"):
        sweep.sweep_configurations(["public"], 1)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed here")
def test_without_lm_eval_one_line(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    rc = flexmoe_main(["eval", "--model", str(tmp_path / "model"), "--tasks", "x", "--opt-out-sweep", "--out",
                       str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs lm-evaluation-harness" in err[0] and "pip install" in err[0]
