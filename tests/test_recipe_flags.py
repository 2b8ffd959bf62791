"""Issue 25 item 3: ``--recipe FILE`` on every training command (command-line flags win; a key
that is not a flag is an error naming it), one spelling of ``--dtype`` (fp32 | bf16 | fp16 and
torch's long names), ``--log-level`` with Python logging."""
from __future__ import annotations

import json
import logging

import pytest

from test_training_common import import_training

import_training()
from flexmoe_training.cli import main, parse_args  # noqa: E402
from flexmoe_training.modeling import PRESET_DIR  # noqa: E402

RECIPE = PRESET_DIR / "recipe_flexolmo_7b.json"
EXPERT = ["train-expert", "--public", "pub", "--data", "d", "--name", "n", "--out", "o"]


def test_shipped_recipe_sets_the_paper_flags_and_the_command_line_wins():
    a = parse_args(EXPERT + ["--recipe", RECIPE])
    assert (a.lr, a.warmup_steps, a.clip, a.seq_len, a.zero_stage, a.activation_checkpointing) == \
        (9e-4, 2000, 1.0, 4096, 3, True)
    a = parse_args(EXPERT + ["--recipe", RECIPE, "--lr", "1e-4", "--zero-stage", "2"])
    assert a.lr == 1e-4 and a.zero_stage == 2 and a.seq_len == 4096
    a = parse_args(["train-public", "--data", "d", "--out", "o", f"--recipe={RECIPE}"])
    assert a.model_config == "olmo2-7b" and a.zero_stage == 3
    a = parse_args(["tune-router", "--model", "m", "--data", "d", "--out", "o", "--recipe", RECIPE])
    assert a.lr == 6e-4
    a = parse_args(["merge", "--public", "p", "--owner", "o1", "--out", "o", "--recipe", RECIPE])
    assert a.top_k == 5


def test_recipe_gives_a_required_flag_and_switches(tmp_path):
    r = tmp_path / "r.json"
    r.write_text(json.dumps({"_comment": "x", "train-expert": {"public": "P", "no-progress": True, "steps": 7,
                                                                "data": "D"}}))
    a = parse_args(["train-expert", "--name", "n", "--out", "o", "--recipe", r])
    assert a.public == "P" and a.progress is False and a.steps == 7 and a.data == "D"


@pytest.mark.parametrize("section,msg", [
    ({"train-expert": {"learning-rate": 1}}, "'learning-rate': not a flag of `flexmoe train-expert`"),
    ({"train-expert": {"steps": "many"}}, "'steps'"),
    ({"train-expert": {"zero-stage": 5}}, "'zero-stage'"),
    ({"train-expert": {"activation-checkpointing": "yes"}}, "true or false"),
    ({"train-public": {}}, "no 'train-expert' section"),
])
def test_recipe_errors_name_the_file_and_key(tmp_path, capsys, section, msg):
    r = tmp_path / "r.json"
    r.write_text(json.dumps(section))
    assert main(EXPERT + ["--recipe", r]) == 2
    err = capsys.readouterr().err
    assert msg in err and str(r) in err


def test_recipe_missing_or_bad_json(tmp_path, capsys):
    assert main(EXPERT + ["--recipe", tmp_path / "nope.json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main(EXPERT + ["--recipe", tmp_path / "bad.json"]) == 2
    assert "invalid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("given,want", [("bf16", "bf16"), ("bfloat16", "bf16"), ("torch.float32", "fp32"),
                                        ("float", "fp32"), ("FP32", "fp32"), ("auto", "auto")])
def test_one_dtype_spelling_in_training(given, want):
    assert parse_args(EXPERT + ["--dtype", given]).dtype == want


def test_dtype_spelling_in_convert_and_demo(capsys):
    assert parse_args(["convert", "--to", "hf", "--input", "i", "--out", "o", "--dtype", "float16"]).dtype == "fp16"
    assert parse_args(["convert", "--to", "hf", "--input", "i", "--out", "o"]).dtype == "keep"
    assert parse_args(["demo", "--dtype", "bf16"]).dtype == "bf16"
    with pytest.raises(SystemExit):
        parse_args(EXPERT + ["--dtype", "fp16"])  # not a training dtype here: the error names the flag
    err = capsys.readouterr().err
    assert "--dtype 'fp16'" in err and "not supported" in err and "bf16 (bfloat16)" in err
    with pytest.raises(SystemExit):
        parse_args(EXPERT + ["--dtype", "int8"])
    assert "--dtype 'int8'" in capsys.readouterr().err


def test_log_level_configures_python_logging(tmp_path):
    # plan is a cheap command to run end to end
    assert main(["plan", "--model-config", "tiny", "--gpus", "1", "--zero-stage", "0", "--log-level", "DEBUG"]) == 0
    assert logging.getLogger("flexmoe_training").level == logging.DEBUG
    assert logging.getLogger("DeepSpeed").level == logging.DEBUG
    assert main(["plan", "--model-config", "tiny", "--gpus", "1", "--zero-stage", "0"]) == 0
    assert logging.getLogger("flexmoe_training").level == logging.WARNING
