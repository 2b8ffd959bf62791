"""Checkpoints: Hugging Face layout both ways, per-expert legacy layout, shards, atomic writes,
clear errors for mismatched tensors, and the tensor hash used to pin the anchor model.

transformers is a test-only dependency, imported inside the tests that need it.
"""
import json
import os

import pytest
import torch
from helpers import tiny_flexolmo, tol
from safetensors.torch import load_file, save_file

from flexmoe_kernels.models import CheckpointError, FlexOlmoForCausalLM, tensors_sha256
from flexmoe_kernels.models import checkpoint as ckpt
from flexmoe_kernels.utils import fs

F32 = tol(torch.float32)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(**kw):
    """A randomised 3-expert model with expert names (the checkpoint tests' size)."""
    base = dict(vocab_size=53, hidden_size=16, intermediate_size=12, num_experts=3, initializer_range=0.3,
                expert_names=["public", "news", "code"])
    base.update(kw)
    return tiny_flexolmo(**base)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied,bias", [(False, True), (True, False)])
def test_roundtrip_ours(tmp_path, seed, tied, bias):
    model = make_model(tie_word_embeddings=tied, expert_bias=bias, extra={"anchor_sha256": "abc", "step": 7})
    d = tmp_path / "ck"
    model.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "flex_olmo" and cfg["architectures"] == ["FlexOlmoForCausalLM"]
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["expert_names"] == ["public", "news", "code"] and cfg["expert_bias"] is bias
    assert cfg["extra"] == {"anchor_sha256": "abc", "step": 7}
    assert cfg["num_experts"] == 3 and cfg["num_experts_per_tok"] == 2
    stored = load_file(d / "model.safetensors")
    assert ("lm_head.weight" in stored) is (not tied)
    assert stored["model.layers.0.mlp.experts.gate_up_proj"].shape == (3, 24, 16)
    assert stored["model.layers.0.mlp.experts.down_proj"].shape == (3, 16, 12)
    loaded = FlexOlmoForCausalLM.from_pretrained(d)
    assert_same_weights(model, loaded)
    assert loaded.config == model.config
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 53, (2, 6))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)
    assert [p for p in os.listdir(tmp_path) if p != "ck"] == []  # no temp dirs left


def test_from_pretrained_dtype_device_and_overrides(tmp_path, seed):
    model = make_model()
    model.save_pretrained(tmp_path)
    bf = FlexOlmoForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu", moe_backend="auto")
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert bf.config.moe_backend == "auto" and bf.moe_layers()[0].backend == "auto"
    assert torch.isfinite(logits(bf, torch.randint(0, 53, (1, 4))).float()).all()
    bf.save_pretrained(tmp_path / "bf")
    again = FlexOlmoForCausalLM.from_pretrained(tmp_path / "bf")  # dtype None keeps the stored dtype
    assert again.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="unknown FlexOlmoConfig fields"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path, moe_backnd="torch")


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_ours(tmp_path, seed, tied):
    transformers = pytest.importorskip("transformers")
    model = make_model(tie_word_embeddings=tied, head_dim=6)
    model.save_pretrained(tmp_path)
    hf = transformers.FlexOlmoForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 53, (2, 7))
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, logits(model, ids), **F32)
    assert hf.config.num_experts == 3 and hf.config.head_dim == 6


def test_ours_loads_transformers_checkpoint(tmp_path, seed):
    transformers = pytest.importorskip("transformers")
    hc = transformers.FlexOlmoConfig(
        vocab_size=53, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, num_experts=4, num_experts_per_tok=3, norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1234.0}, pad_token_id=0, eos_token_id=1,
        initializer_range=0.3, tie_word_embeddings=False,
    )
    hf = transformers.FlexOlmoForCausalLM(hc).eval()
    hf.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    layouts = {"fused" if k.endswith("gate_up_proj") else "per-expert" for k in stored if ".experts." in k}
    ours = FlexOlmoForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_theta == 1234.0 and ours.config.num_key_value_heads == 1
    assert ours.config.norm_topk_prob and ours.config.eos_token_id == 1
    assert ours.expert_names == [f"expert_{i}" for i in range(4)]
    ids = torch.randint(0, 53, (2, 7))
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(logits(ours, ids), theirs, **F32)
    assert layouts  # whichever layout this transformers version writes, it loaded


def per_expert_layout(sd, E, Fw):
    """The older Hugging Face layout: mlp.experts.{e}.{gate,up,down}_proj.weight."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len(".gate_up_proj")]
            for e in range(E):
                out[f"{p}.{e}.gate_proj.weight"] = v[e, :Fw].clone()
                out[f"{p}.{e}.up_proj.weight"] = v[e, Fw:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len(".down_proj")]
            for e in range(E):
                out[f"{p}.{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def test_per_expert_layout_loads(tmp_path, seed):
    model = make_model(expert_bias=True)
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    legacy = per_expert_layout(sd, 3, 12)
    assert "model.layers.1.mlp.experts.2.up_proj.weight" in legacy
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = FlexOlmoForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(model, loaded)
    # a missing piece is named
    del legacy["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)


def test_sharded_checkpoint(tmp_path, seed):
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size=4000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = FlexOlmoForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(model, loaded)
    # overwriting with a single file removes the stale shards
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    # a shard listed in the index but absent is named
    model.save_pretrained(tmp_path / "s", max_shard_size=4000)
    os.remove(tmp_path / "s" / shards[1])
    with pytest.raises(FileNotFoundError, match=shards[1]):
        FlexOlmoForCausalLM.from_pretrained(tmp_path / "s")


def test_transformers_loads_our_shards(tmp_path, seed):
    transformers = pytest.importorskip("transformers")
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size=4000)
    hf = transformers.FlexOlmoForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 53, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, logits(model, ids), **F32)


# ---------------------------------------------------------------------------- atomic writes
def test_crash_mid_save_leaves_old_checkpoint(tmp_path, seed, monkeypatch):
    d = tmp_path / "ck"
    old = make_model()
    old.save_pretrained(d)
    (d / "run.json").write_text('{"step": 1}')
    before = {p: (d / p).read_bytes() for p in os.listdir(d)}

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    new = make_model()
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="simulated"):
        new.save_pretrained(d)
    assert {p: (d / p).read_bytes() for p in os.listdir(d)} == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # the temp dir was cleaned up
    assert_same_weights(FlexOlmoForCausalLM.from_pretrained(d), old)

    # a successful overwrite replaces the weights and keeps files it does not own
    monkeypatch.undo()
    new.save_pretrained(d)
    assert_same_weights(FlexOlmoForCausalLM.from_pretrained(d), new)
    assert (d / "run.json").read_text() == '{"step": 1}'
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_overwrite_without_renameat2(tmp_path, seed, monkeypatch):
    # Where the atomic exchange is unavailable, the fallback (two renames) still replaces cleanly.
    d = tmp_path / "ck"
    make_model().save_pretrained(d)
    monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    new = make_model()
    new.save_pretrained(d)
    assert_same_weights(FlexOlmoForCausalLM.from_pretrained(d), new)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_save_into_new_nested_directory(tmp_path, seed):
    model = make_model()
    model.save_pretrained(tmp_path / "a" / "b")
    assert_same_weights(FlexOlmoForCausalLM.from_pretrained(tmp_path / "a" / "b"), model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        model.save_pretrained(tmp_path / "file")


# ---------------------------------------------------------------------------- errors
def _rewrite(d, edit):
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_mismatch_errors_name_tensors(tmp_path, seed):
    model = make_model()
    model.save_pretrained(tmp_path)
    good = load_file(tmp_path / "model.safetensors")

    _rewrite(tmp_path, lambda sd: sd.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_norm\.weight"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)

    save_file(dict(good, **{"model.layers.9.mlp.gate.weight": torch.zeros(3, 16)}), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.9\.mlp\.gate\.weight"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)

    bad = dict(good)
    bad["model.layers.0.mlp.experts.down_proj"] = torch.zeros(3, 16, 11)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.layers\.0\.mlp\.experts\.down_proj: "
                                              r"checkpoint \(3, 16, 11\) vs model \(3, 16, 12\)"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)

    # config says 4 experts, file has 3
    save_file(good, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_experts=4, expert_names=None)))
    with pytest.raises(CheckpointError, match="mlp.gate.weight: checkpoint \\(3, 16\\) vs model \\(4, 16\\)"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ValueError, match="model_type must be 'flex_olmo'"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_experts_per_tok=5)))
    with pytest.raises(ValueError, match="num_experts_per_tok=5 is larger than num_experts=3"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)


def test_tied_checkpoint_with_conflicting_head_is_refused(tmp_path, seed):
    model = make_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda sd: sd.update({"lm_head.weight": torch.randn(53, 16)}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)


def test_pickles_are_refused(tmp_path, seed):
    model = make_model()
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are refused"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "shard"])
def test_corrupt_safetensors_error_names_the_file(tmp_path, seed, damage):
    """Issue 12 item 6a: a truncated or corrupt weights file gives a one-line CheckpointError
    naming the file and why, not safetensors' bare header message."""
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size=4096 if damage == "shard" else None)
    name = "model-00002-of-" if damage == "shard" else "model.safetensors"
    path = next(tmp_path / f for f in sorted(os.listdir(tmp_path)) if f.startswith(name))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"garbage" * 9, "empty": b"",
                      "shard": data[: len(data) - 10]}[damage])
    with pytest.raises(CheckpointError) as info:
        FlexOlmoForCausalLM.from_pretrained(tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    assert ("truncated" in msg or "corrupt" in msg) and "safetensors" in msg


@pytest.mark.parametrize("which", ["config.json", "model.safetensors.index.json"])
def test_invalid_json_names_file_line_and_column(tmp_path, seed, which):
    """Issue 12 item 6b: invalid JSON in config.json (or the shard index) is a CheckpointError
    naming the file, line and column (not a raw JSONDecodeError)."""
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size=4096)
    (tmp_path / which).write_text('{\n  "vocab_size": 53,\n  "hidden_size": ,\n}\n')
    with pytest.raises(CheckpointError) as info:
        FlexOlmoForCausalLM.from_pretrained(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / which) in msg and "line 3" in msg and "column 18" in msg and "\n" not in msg
    (tmp_path / which).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)
    (tmp_path / which).write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="UTF-8"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- hashing
def test_tensors_sha256(seed):
    model = make_model()
    sd = model.state_dict()
    h = tensors_sha256(sd)
    assert len(h) == 64 and h == tensors_sha256(dict(reversed(list(sd.items()))))
    assert h == tensors_sha256({k: v.clone() for k, v in sd.items()})
    frozen = [k for k in sd if ".experts." not in k and ".gate." not in k]
    hf = tensors_sha256(sd, frozen)
    # changing an expert does not change the hash of the frozen tensors, but does change the full hash
    sd2 = {k: v.clone() for k, v in sd.items()}
    sd2["model.layers.0.mlp.experts.down_proj"][1, 0, 0] += 1.0
    assert tensors_sha256(sd2, frozen) == hf and tensors_sha256(sd2) != h
    # a one-bit change of a frozen tensor changes it
    sd2["model.norm.weight"].view(torch.int32)[3] ^= 1
    assert tensors_sha256(sd2, frozen) != hf
    # dtype and shape are part of the hash; bf16 works
    assert tensors_sha256({"a": torch.zeros(4)}) != tensors_sha256({"a": torch.zeros(2, 2)})
    assert tensors_sha256({"a": torch.zeros(4)}) != tensors_sha256({"a": torch.zeros(4, dtype=torch.bfloat16)})
    assert tensors_sha256({"a": torch.ones(3, dtype=torch.bfloat16)}) == tensors_sha256(
        {"a": torch.ones(3, dtype=torch.bfloat16)})
    with pytest.raises(KeyError, match="model.nope"):
        tensors_sha256(sd, ["model.nope"])


_KILLED_SAVE = r"""
import os, signal, sys
import torch
from flexmoe_kernels.models import FlexOlmoConfig, FlexOlmoForCausalLM
from flexmoe_kernels.models import checkpoint as ckpt
cfg = FlexOlmoConfig(vocab_size=53, hidden_size=16, intermediate_size=12, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2)
real = ckpt.save_file
def dying(tensors, path, *a, **k):
    real(tensors, path, *a, **k)          # the full-size weights are written...
    os.kill(os.getpid(), signal.SIGKILL)  # ...then the process dies before the swap
ckpt.save_file = dying
FlexOlmoForCausalLM(cfg).save_pretrained(sys.argv[1])
"""


@pytest.mark.parametrize("then", ["save", "load"])
def test_killed_save_leaves_no_temporary_after_next_save_or_load(tmp_path, then):
    """issue 12 item 5: a save killed mid-way leaked a full-size ``.NAME.tmp-*`` folder that
    nothing removed; the next save to the same target, or a load of it, removes it."""
    import subprocess
    import sys

    target = tmp_path / "ckpt"
    model = make_model()
    model.save_pretrained(target)
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(target)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    leaked = [n for n in os.listdir(tmp_path) if n.startswith(".ckpt.tmp-")]
    assert len(leaked) == 1 and (tmp_path / leaked[0] / "model.safetensors").is_file()
    if then == "save":
        model.save_pretrained(target)
    else:
        FlexOlmoForCausalLM.from_pretrained(target)
    assert os.listdir(tmp_path) == ["ckpt"]


# ---------------------------------------------------------------------------- streamed, sharded writes and lazy reads
# (issue 16 item 3) A trainer exports one gathered tensor at a time: save_state_dict consumes a
# generator into shards of at most max_shard_size (one larger tensor gets a shard of its own),
# with Hugging Face's index; LazyStateDict reads single files and shards one tensor at a time.
def test_streamed_sharded_save_and_lazy_read(tmp_path, seed):
    model = make_model(expert_bias=True)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    consumed = []

    def one_at_a_time():
        for k, v in sd.items():
            consumed.append(k)
            yield k, v.clone()

    ckpt.save_state_dict(model.config, one_at_a_time(), tmp_path / "s", max_shard_size="3KB")
    assert consumed == list(sd)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    for f in files:
        shard = load_file(tmp_path / "s" / f)
        assert sum(v.numel() * v.element_size() for v in shard.values()) <= 3000 or len(shard) == 1, f
    assert_same_weights(FlexOlmoForCausalLM.from_pretrained(tmp_path / "s"), model)
    lazy = ckpt.lazy_state_dict(tmp_path / "s", 3)
    assert sorted(lazy) == sorted(sd) and len(lazy) == len(sd) and "nope" not in lazy
    for k, v in sd.items():
        assert torch.equal(lazy[k], v) and lazy.shape(k) == tuple(v.shape) and lazy.dtype(k) == v.dtype, k
    with pytest.raises(KeyError):
        lazy["nope"]
    # one shard only: a single model.safetensors, no index
    ckpt.save_state_dict(model.config, sd, tmp_path / "one", max_shard_size="5GB")
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]


def test_lazy_state_dict_fuses_per_expert_shards(tmp_path, seed):
    model = make_model(expert_bias=True)
    model.save_pretrained(tmp_path / "fused")
    legacy = per_expert_layout(load_file(tmp_path / "fused" / "model.safetensors"), 3, 12)
    half = sorted(legacy)[: len(legacy) // 2]
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "fused" / "config.json").read_text())
    parts = {"model-00001-of-00002.safetensors": {k: legacy[k] for k in half},
             "model-00002-of-00002.safetensors": {k: v for k, v in legacy.items() if k not in half}}
    for name, part in parts.items():
        save_file(part, d / name, metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, part in parts.items() for k in part}}))
    lazy, eager = ckpt.lazy_state_dict(d, 3), ckpt.load_state_dict(tmp_path / "fused")
    assert set(lazy) == set(eager)
    for k, v in eager.items():
        assert torch.equal(lazy[k], v) and lazy.shape(k) == tuple(v.shape), k


@pytest.mark.parametrize("text,n", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("64KiB", 65536), ("2kb", 2000),
                                    ("1234", 1234), (77, 77)])
def test_parse_size(text, n):
    assert ckpt.parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "5 parsecs", "0", -3, True, 1.5])
def test_parse_size_refuses_and_names_the_flag(bad):
    with pytest.raises(ValueError, match="--max-shard-size"):
        ckpt.parse_size(bad, "--max-shard-size")


# ---------------------------------------------------------------------------- issue 21: the shard index
def _sharded(tmp_path):
    """A 3+-shard checkpoint; (directory, index path, index dict, shard names)."""
    make_model().save_pretrained(tmp_path, max_shard_size=4000)
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    return tmp_path, path, index, sorted(set(index["weight_map"].values()))


@pytest.mark.parametrize("value", [7, None, ["model-00001-of-00004.safetensors"], {"a": 1}])
def test_index_value_not_a_string_is_named(tmp_path, seed, value):
    """Item 13: a weight_map value that is not a string names the index file, the key and the value
    (was 'unhashable type' or a TypeError from os.path)."""
    d, path, index, _ = _sharded(tmp_path)
    key = sorted(index["weight_map"])[3]
    index["weight_map"][key] = value
    path.write_text(json.dumps(index))
    for load in (ckpt.load_state_dict, ckpt.lazy_state_dict):
        with pytest.raises(CheckpointError) as info:
            load(d)
        msg = str(info.value)
        assert str(path) in msg and repr(key) in msg and repr(value) in msg and "\n" not in msg


@pytest.mark.parametrize("damage", ["wrong_shard", "absent", "unlisted"])
def test_index_checked_against_shard_headers(tmp_path, seed, damage):
    """Item 15: the index is checked against the shards' headers: a key mapped to a shard that does
    not hold it (naming where it is), a key no shard holds, a shard tensor the index does not list."""
    d, path, index, files = _sharded(tmp_path)
    wm = index["weight_map"]
    held = [f for f in files if list(wm.values()).count(f) > 1]  # a shard still listed after the edit
    key = next(k for k, f in sorted(wm.items()) if f == held[0])
    if damage == "wrong_shard":
        other = next(f for f in files if f != held[0])
        wm[key] = other
        want = [repr(key), other, held[0]]
    elif damage == "absent":
        key = "model.layers.7.mlp.gate.weight"
        wm[key] = files[1]
        want = [repr(key), files[1], "no shard"]
    else:
        del wm[key]
        want = [repr(key), held[0], "not list"]
    path.write_text(json.dumps(index))
    for load in (ckpt.load_state_dict, ckpt.lazy_state_dict, FlexOlmoForCausalLM.from_pretrained):
        with pytest.raises(CheckpointError) as info:
            load(d)
        msg = str(info.value)
        assert all(w in msg for w in want) and str(path) in msg and "\n" not in msg, msg
