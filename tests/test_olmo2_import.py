"""Issue 25 item 1: start from the paper's checkpoints. A Hugging Face ``olmo2`` checkpoint (the
public model FlexOlmo starts from) converts exactly into our dense model and is taken as
``--public`` directly; a released-style FlexOlmo MoE (with or without our expert bias) is a public
anchor for train-expert and merge (adding a new owner to an existing FlexOlmo model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flexmoe_kernels.models import FlexOlmoConfig, FlexOlmoForCausalLM  # noqa: E402
from flexmoe_kernels.models.checkpoint import load_state_dict  # noqa: E402


def _olmo2(path: Path, tied: bool, dtype=torch.float32, vocab: int = 300, seed: int = 0) -> Path:
    cfg = transformers.Olmo2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=1,
                                   bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    m = transformers.Olmo2ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # norms away from 1, so that a missing / mis-mapped norm shows in the logits
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    m.save_pretrained(path)
    return path


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    m = transformers.Olmo2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def _cli(args) -> int:
    from test_training_common import run_cli

    return run_cli(args)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_convert_olmo2_logits_equal_transformers(tmp_path, tied):
    src = _olmo2(tmp_path / "olmo2", tied)
    assert json.loads((src / "config.json").read_text())["model_type"] == "olmo2"
    ids = torch.randint(0, 300, (2, 17))
    ref = _hf_logits(src, ids)
    assert _cli(["convert", "--to", "hf", "--input", src, "--out", tmp_path / "ours"]) == 0
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["model_type"] == "flex_olmo" and cfg["num_experts"] == 1 and cfg["expert_names"] == ["public"]
    assert cfg["tie_word_embeddings"] is tied
    ours = FlexOlmoForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    with torch.no_grad():
        got = ours(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    # the olmo2 directory also loads directly (converted on load), same logits
    direct = FlexOlmoForCausalLM.from_pretrained(src).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(direct(ids).logits, ref, atol=2e-5, rtol=1e-5)
    # the stored tensors are the olmo2 ones, exactly (no copy of the tied head)
    sd, theirs = load_state_dict(tmp_path / "ours"), load_state_dict(src)
    assert ("lm_head.weight" in sd) is (not tied)
    assert torch.equal(sd["model.layers.1.mlp.experts.gate_up_proj"][0],
                       torch.cat([theirs["model.layers.1.mlp.gate_proj.weight"],
                                  theirs["model.layers.1.mlp.up_proj.weight"]], 0))
    assert torch.equal(sd["model.layers.0.self_attn.q_norm.weight"], theirs["model.layers.0.self_attn.q_norm.weight"])


def test_convert_olmo2_bf16_streams_and_shards(tmp_path):
    src = _olmo2(tmp_path / "olmo2", False, dtype=torch.bfloat16)
    assert _cli(["convert", "--to", "hf", "--input", src, "--out", tmp_path / "ours", "--max-shard-size", "20KB"]) == 0
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    sd, theirs = load_state_dict(tmp_path / "ours"), load_state_dict(src)
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(sd["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])


def test_olmo2_refused_with_a_hint(tmp_path):
    src = _olmo2(tmp_path / "olmo2", False)
    with pytest.raises(ValueError, match="flexmoe convert --to hf"):
        FlexOlmoConfig.from_pretrained(src)


def test_olmo2_lazy_source_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    from flexmoe_kernels.models import checkpoint as ck
    from flexmoe_kernels.models.olmo2 import open_olmo2

    src = _olmo2(tmp_path / "olmo2", False)
    cfg, lazy = open_olmo2(src)
    reads = []
    orig = ck.LazyStateDict._read
    monkeypatch.setattr(ck.LazyStateDict, "_read", lambda self, k: reads.append(k) or orig(self, k))
    v = lazy["model.layers.0.mlp.experts.gate_up_proj"]
    assert v.shape == (1, 96, 32) and lazy.shape("model.layers.0.mlp.experts.gate_up_proj") == (1, 96, 32)
    assert sorted(reads) == ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    pytest.importorskip("deepspeed")
    from test_training_common import seeded_rng, write_corpus

    root = tmp_path_factory.mktemp("olmo2data")
    _, rng = seeded_rng()
    write_corpus(root / "text", 12, rng)
    assert _cli(["prepare-data", "--input", root / "text", "--out", root / "data", "--no-progress"]) == 0
    return root


def _fast():
    from test_training_common import fast_flags

    return fast_flags(eval_batches=1)


def test_olmo2_public_trains_an_expert_and_merges(data, tmp_path):
    """A tiny transformers olmo2 checkpoint is --public of train-expert (converted on access) and of merge."""
    src = _olmo2(tmp_path / "olmo2", True)
    assert _cli(["train-expert", "--public", src, "--data", data / "data", "--name", "alpha",
                 "--out", tmp_path / "owner", "--steps", "2", "--lr", "3e-3", *_fast()]) == 0
    assert _cli(["merge", "--public", src, "--owner", tmp_path / "owner", "--out", tmp_path / "merged"]) == 0
    merged = FlexOlmoForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    assert merged.config.expert_names == ["public", "alpha"]
    ids = torch.randint(0, 250, (2, 9))
    merged.set_top_k(1)  # one allowed expert: the dense public model, exactly
    with torch.no_grad():
        only_public = merged(ids, allowed_experts=["public"]).logits
    torch.testing.assert_close(only_public, _hf_logits(src, ids), atol=2e-5, rtol=1e-5)


def _released_flexolmo(path: Path, expert_bias: bool, names=("public", "math", "code")) -> Path:
    """A FlexOlmo MoE as released (experts named, expert 0 public), with or without our router bias."""
    cfg = FlexOlmoConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         num_experts=len(names), num_experts_per_tok=2, expert_names=list(names),
                         expert_bias=expert_bias, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(1)
    m = FlexOlmoForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("expert_bias"):
                p.copy_(torch.tensor([0.0] + [-0.3] * (len(names) - 1)))
    m.save_pretrained(path)
    return path


@pytest.mark.parametrize("expert_bias", [False, True], ids=["released", "with_bias"])
def test_new_owner_merged_into_a_3_expert_model(data, tmp_path, expert_bias):
    base = _released_flexolmo(tmp_path / "flexolmo", expert_bias)
    assert _cli(["train-expert", "--public", base, "--data", data / "data", "--name", "legal",
                 "--out", tmp_path / "owner", "--steps", "2", "--lr", "3e-3", *_fast()]) == 0
    owner = load_state_dict(tmp_path / "owner")
    old = load_state_dict(base)
    for i in range(2):  # the owner's public expert is the released model's expert 0
        k = f"model.layers.{i}.mlp.experts.down_proj"
        assert torch.equal(owner[k][0], old[k][0])
    assert _cli(["merge", "--public", base, "--owner", tmp_path / "owner", "--out", tmp_path / "merged",
                 "--top-k", "2"]) == 0
    new = FlexOlmoForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    assert new.config.expert_names == ["public", "math", "code", "legal"]
    sd = load_state_dict(tmp_path / "merged")
    for i in range(2):
        for f in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            k = f"model.layers.{i}.mlp.{f}"
            assert torch.equal(sd[k][:3], old[k]) and torch.equal(sd[k][3], owner[k][1])
        kb = f"model.layers.{i}.mlp.gate.expert_bias"
        want = old[kb] if expert_bias else torch.zeros(3)
        assert torch.equal(sd[kb][:3], want.to(sd[kb].dtype))
    # opting the new expert out gives the old model exactly
    ids = torch.randint(0, 250, (2, 9))
    ref = FlexOlmoForCausalLM.from_pretrained(base).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(new(ids, allowed_experts=["public", "math", "code"]).logits, ref(ids).logits,
                                   atol=1e-5, rtol=1e-5)
    # a name already in the model is refused, naming it
    assert _cli(["merge", "--public", base, "--owner", tmp_path / "owner", "--owner", tmp_path / "owner",
                 "--out", tmp_path / "merged2"]) == 2


def test_transformers_written_flexolmo_is_a_public_anchor(data, tmp_path):
    """A FlexOlmo checkpoint as transformers writes it (the released format: no expert names, no
    bias, transformers' tensor layout) anchors a new owner, and the merge keeps its experts."""
    cfg = transformers.FlexOlmoConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      num_experts=3, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=None)
    torch.manual_seed(2)
    hf = transformers.FlexOlmoForCausalLM(cfg).float().eval()
    hf.save_pretrained(tmp_path / "released")
    assert _cli(["train-expert", "--public", tmp_path / "released", "--data", data / "data", "--name", "legal",
                 "--out", tmp_path / "owner", "--steps", "2", "--lr", "3e-3", *_fast()]) == 0
    assert _cli(["merge", "--public", tmp_path / "released", "--owner", tmp_path / "owner",
                 "--out", tmp_path / "merged"]) == 0
    new = FlexOlmoForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    assert new.config.expert_names[3] == "legal" and new.config.num_experts == 4
    ids = torch.randint(0, 250, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(new(ids, allowed_experts=new.config.expert_names[:3]).logits, hf(ids).logits,
                                   atol=2e-5, rtol=1e-5)


def test_olmo2_public_for_init_router_and_train_moe(data, tmp_path):
    src = _olmo2(tmp_path / "olmo2", False)
    assert _cli(["init-router", "--public", src, "--data", data / "data", "--out", tmp_path / "r.safetensors",
                 "--embedder", "hidden", "--num-docs", "4"]) == 0
    from safetensors.torch import load_file

    r = load_file(tmp_path / "r.safetensors")["router_embedding"]
    assert torch.isfinite(r).all() and float(r.norm()) > 0  # the public rows are 0: a fresh row's norm
    assert _cli(["train-expert", "--public", src, "--data", data / "data", "--name", "alpha", "--router-init",
                 tmp_path / "r.safetensors", "--out", tmp_path / "owner", "--steps", "1", *_fast()]) == 0
    assert _cli(["train-moe", "--public", src, "--data", data / "data", "--num-experts", "2", "--top-k", "1",
                 "--out", tmp_path / "moe", "--steps", "1", *_fast()]) == 0
