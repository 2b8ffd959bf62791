"""Every ``flexmoe`` command that writes refuses an output that would destroy (or be written into) one of
its own inputs, before it touches anything (issue 21 item 6), and says so in one line naming both flags
and paths; an output path under an existing regular file is refused naming the flag (item 13).

The commands run in-process (``flexmoe_training.cli.main``); the inputs are tiny and nothing is
trained: every case must be refused before the command reads its inputs.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from test_training_common import import_training, run_cli, seeded_rng, write_corpus

import_training()

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """``root/in``: a text corpus, two data directories, a tiny public and owner checkpoint, a router
    file, a DeepSpeed config, a model config, a finished run's run.json and a tokenizer file."""
    import torch

    from flexmoe_kernels.models import FlexOlmoConfig, FlexOlmoForCausalLM

    root = tmp_path_factory.mktemp("cli_inputs")
    w = root / "in"
    _, rng = seeded_rng()
    write_corpus(w / "text", 8, rng, min_words=10, max_words=20)
    assert run_cli(["prepare-data", "--input", w / "text", "--out", w / "data", "--no-progress"]) == 0
    shutil.copytree(w / "data", w / "data2")
    shutil.copytree(w / "data", w / "out.inprogress")  # a data directory named like a partial run of --out out
    cfg = FlexOlmoConfig(vocab_size=258, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_experts=1, num_experts_per_tok=1,
                         expert_names=["public"], moe_backend="torch", eos_token_id=256, pad_token_id=257)
    torch.manual_seed(0)
    FlexOlmoForCausalLM(cfg).float().save_pretrained(w / "pub")
    meta = json.loads((w / "data" / "meta.json").read_text())["tokenizer"]
    (w / "pub" / "tokenizer_meta.json").write_text(json.dumps(meta))
    shutil.copytree(w / "pub", w / "owner")
    (w / "router").mkdir()
    from safetensors.torch import save_file

    save_file({"router_embedding": torch.ones(16)}, str(w / "router" / "r.safetensors"))
    (w / "ds").mkdir()
    (w / "ds" / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    (w / "mc").mkdir()
    (w / "mc" / "model.json").write_text(json.dumps({"hidden_size": 16, "intermediate_size": 24,
                                                     "num_hidden_layers": 1, "num_attention_heads": 2,
                                                     "num_key_value_heads": 1, "max_position_embeddings": 64}))
    (w / "run").mkdir()
    (w / "run" / "run.json").write_text(json.dumps({"status": "finished", "total_flops": 1e9}))
    (w / "tok").mkdir()
    (w / "tok" / "tok.json").write_text("{}")
    return w


def _snapshot(root: Path) -> dict:
    """Every file's bytes and every link's target under ``root`` (the inputs, byte for byte)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            snap[rel] = ("link", os.readlink(p)) if p.is_symlink() else (
                ("dir", None) if p.is_dir() else ("file", p.read_bytes()))
    return snap


FAST = ["--steps", "1", "--seq-len", "8", "--micro-batch-size", "1", "--no-progress", "--eval-batches", "0"]

# (id, argv with {w} = the input root, the input flag the error must name, the input path it must name)
CASES = [
    ("prepare-data-same", "prepare-data --input {w}/text --out {w}/text --overwrite --no-progress", "--input", "text"),
    ("prepare-data-inside", "prepare-data --input {w}/text --out {w}/text/sub --no-progress", "--input", "text"),
    ("prepare-data-parent", "prepare-data --input {w}/text --out {w} --overwrite --no-progress", "--input", "text"),
    ("prepare-data-tokenizer", "prepare-data --input {w}/text --tokenizer {w}/tok/tok.json --out {w}/tok "
                               "--overwrite --no-progress", "--tokenizer", "tok.json"),
    ("train-public-same", "train-public --data {w}/data --out {w}/data --overwrite", "--data", "data"),
    ("train-public-second-data", "train-public --data {w}/data --data {w}/data2 --out {w}/data2 --overwrite",
     "--data", "data2"),
    ("train-public-partial-run-dir", "train-public --data {w}/out.inprogress --out {w}/out --overwrite",
     "--data", "out.inprogress"),
    ("train-public-model-config", "train-public --data {w}/data --model-config {w}/mc/model.json --out {w}/mc "
                                  "--overwrite", "--model-config", "model.json"),
    ("train-public-symlink", "train-public --data {w}/data --out {w}/link --overwrite", "--data", "data"),
    ("train-expert-public", "train-expert --public {w}/pub --data {w}/data --name x --out {w}/pub --overwrite",
     "--public", "pub"),
    ("train-expert-data", "train-expert --public {w}/pub --data {w}/data --name x --out {w}/data --overwrite",
     "--data", "data"),
    ("train-expert-router-init", "train-expert --public {w}/pub --data {w}/data --name x --router-init "
                                 "{w}/router/r.safetensors --out {w}/router --overwrite", "--router-init", "r.safetensors"),
    ("train-dense-inside-data", "train-dense --data {w}/data --out {w}/data/sub", "--data", "data"),
    ("train-dense-match-active-of", "train-dense --data {w}/data --match-active-of {w}/pub --out {w}/pub --overwrite",
     "--match-active-of", "pub"),
    ("train-dense-match-flops-of", "train-dense --data {w}/data --match-flops-of {w}/run --out {w}/run --overwrite",
     "--match-flops-of", "run"),
    ("train-moe-public", "train-moe --data {w}/data --public {w}/pub --num-experts 2 --top-k 1 --out {w}/pub "
                         "--overwrite", "--public", "pub"),
    ("train-moe-deepspeed-config", "train-moe --data {w}/data --deepspeed-config {w}/ds/ds.json --out {w}/ds "
                                   "--overwrite", "--deepspeed-config", "ds.json"),
    ("merge-public", "merge --public {w}/pub --owner {w}/owner --out {w}/pub --overwrite", "--public", "pub"),
    ("merge-owner", "merge --public {w}/pub --owner {w}/owner --out {w}/owner --overwrite", "--owner", "owner"),
    ("init-router-inside-data", "init-router --public {w}/pub --data {w}/data --out {w}/data/r.safetensors "
                                "--embedder hidden", "--data", "data"),
    ("init-router-inside-public", "init-router --public {w}/pub --data {w}/data --out {w}/pub/r.safetensors "
                                  "--embedder hidden --overwrite", "--public", "pub"),
    ("tune-router-model", "tune-router --model {w}/owner --data {w}/data --out {w}/owner --overwrite", "--model", "owner"),
    ("tune-router-data", "tune-router --model {w}/owner --data {w}/data --out {w}/data --overwrite", "--data", "data"),
    ("convert-same", "convert --to olmo-core --input {w}/pub --out {w}/pub --overwrite", "--input", "pub"),
    ("convert-parent", "convert --to olmo-core --input {w}/pub --out {w} --overwrite", "--input", "pub"),
    ("convert-inside", "convert --to olmo-core --input {w}/pub --out {w}/pub/oc", "--input", "pub"),
    ("convert-config", "convert --to hf --input {w}/text --config {w}/mc/model.json --out {w}/mc --overwrite",
     "--config", "model.json"),
]
TRAINING = ("train-public", "train-expert", "train-dense", "train-moe", "tune-router")


@pytest.mark.parametrize("argv,flag,name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(template, tmp_path, capsys, argv, flag, name):
    w = tmp_path / "in"
    shutil.copytree(template, w, symlinks=True)
    (w / "link").symlink_to(w / "data", target_is_directory=True)
    before = _snapshot(w)
    args = argv.format(w=w).split()
    if args[0] in TRAINING:
        args += FAST
    capsys.readouterr()
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexmoe: error: --out ") and "\n" not in err, err
    assert f"input {flag} " in err and name in err, err
    assert _snapshot(w) == before, "an input was changed"
    assert sorted(os.listdir(tmp_path)) == ["in"], "something was written beside the inputs"


@pytest.mark.parametrize("argv", [
    "prepare-data --input {w}/text --out {w}/FILE/sub --no-progress",
    "train-public --data {w}/data --out {w}/FILE/sub",
    "train-expert --public {w}/pub --data {w}/data --name x --out {w}/FILE/sub",
    "merge --public {w}/pub --owner {w}/owner --out {w}/FILE/sub/deeper",
    "init-router --public {w}/pub --data {w}/data --out {w}/FILE/r.safetensors",
    "tune-router --model {w}/owner --data {w}/data --out {w}/FILE/sub",
    "convert --to olmo-core --input {w}/pub --out {w}/FILE/sub",
], ids=lambda a: a.split()[0])
def test_an_output_under_a_regular_file_names_the_flag_and_the_file(template, tmp_path, capsys, argv):
    """Issue 21 item 13, for every command: a regular file where a directory of --out must be."""
    w = tmp_path / "in"
    shutil.copytree(template, w, symlinks=True)
    (w / "FILE").write_text("keep me\n")
    before = _snapshot(w)
    args = argv.format(w=w).split()
    if args[0] in TRAINING:
        args += FAST
    capsys.readouterr()
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flexmoe: error: --out '{w}/FILE/") and f"'{w}/FILE' is a file" in err, err
    assert "a file is in the way" in err and "\n" not in err, err
    assert _snapshot(w) == before
