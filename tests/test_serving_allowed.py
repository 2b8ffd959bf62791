"""The serving plugin's parser of per-request allowed sets (pure Python: runs in the main suite;
the vLLM tests themselves are in tests/serving/, run in the serve venv)."""
from __future__ import annotations

import pytest

from flexmoe_kernels.integrations.vllm.allowed import (AllowedExpertsError, cache_salt, decode_canonical,
                                                       encode_canonical, parse_allowed_experts)

NAMES = ["public", "news", "code", "medical"]


@pytest.mark.parametrize("value, want", [
    (None, None),
    (["public", "code"], (0, 2)),
    ([3, 1], (1, 3)),
    (["medical", 0], (0, 3)),
    ("news, code,medical", (1, 2, 3)),
    ("2,0", (0, 2)),
    (["public", "news", "code", "medical"], None),  # every expert = no restriction
    ((0, 1), (0, 1)),
])
def test_valid_sets_are_canonical(value, want):
    assert parse_allowed_experts(value, NAMES, 2) == want


@pytest.mark.parametrize("value, why", [
    (["public", "nope"], "unknown expert name 'nope'"),
    ([0, 4], "index 4 is out of range [0, 4)"),
    ("-1,2", "index -1 is out of range"),
    (["code", 2], "given twice"),
    ("news,news", "given twice"),
    (["code"], "allows 1 expert(s) but the model routes each token to top-k=2"),
    ([], "allows 0 expert(s)"),
    (3, "must be a list"),
    ({"public": 1}, "must be a list"),
    ([True, 1], "neither an expert name nor an index"),
    ([1.0, 2], "neither an expert name nor an index"),
    ("", "not a comma-separated list"),
    ("public,,code", "not a comma-separated list"),
])
def test_invalid_sets_name_the_field_and_value(value, why):
    with pytest.raises(AllowedExpertsError) as ei:
        parse_allowed_experts(value, NAMES, 2)
    msg = str(ei.value)
    assert msg.startswith("allowed_experts") and why in msg, msg
    assert ei.value.parameter == "allowed_experts" and ei.value.value == value


def test_canonical_round_trip_and_salt():
    assert decode_canonical(encode_canonical((0, 2)), 4) == (0, 2)
    assert encode_canonical(None) is None and decode_canonical(None, 4) is None
    for bad in ("0,2", ["0"], "flexmoe-allowed:0,9"):
        with pytest.raises(ValueError):
            decode_canonical(bad, 4)
    # one salt per set; the user's salt is kept; unrestricted requests keep theirs (or none)
    assert cache_salt((0, 2)) != cache_salt((0, 3))
    assert cache_salt((0, 2)) == cache_salt(parse_allowed_experts(["code", "public"], NAMES, 2))
    assert cache_salt((0, 2), "u1").startswith("u1|") and cache_salt((0, 2), "u1") != cache_salt((0, 2), "u2")
    assert cache_salt(None) is None and cache_salt(None, "u1") == "u1"


def test_serve_refuses_a_model_that_is_not_flexolmo(tmp_path, capsys):
    import json

    from flexmoe_training.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert main(["serve", str(tmp_path), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "is not a FlexOlmo checkpoint" in err and "'llama'" in err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "MODEL" in capsys.readouterr().err
    (tmp_path / "data").mkdir()                           # a directory that is no checkpoint
    assert main(["serve", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "MODEL" in err and "has no config.json" in err and "Errno" not in err


def test_serve_example_request_allows_top_k_experts():
    import json
    import shlex

    from flexmoe_training.commands.serve import _pop_option, example_request

    text = example_request("http://127.0.0.1:8000/v1", "m", NAMES, 2)
    body = json.loads(shlex.split(text.split("-d ", 1)[1])[0])
    assert body["vllm_xargs"] == {"allowed_experts": "public,news"} and body["model"] == "m"
    args = ["--dtype", "float32", "--port=9000", "--host", "0.0.0.0", "--port", "9001"]
    assert _pop_option(args, "--port", "8000") == "9001" and _pop_option(args, "--host", None) == "0.0.0.0"
    assert args == ["--dtype", "float32"]
