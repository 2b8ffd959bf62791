"""``flexmoe convert`` (training/commands/convert.py, flexmoe_kernels/models/olmo_core.py): OLMo-core
FlexOlmo checkpoints <-> our HF layout, keeping the router expert bias (issue 16 item 6).

Without ``olmo_core`` the OLMo-core side is written here from the documented key names and layouts
(OLMo-core's MoEMLP / DroplessMoEMLP, FlexOlmo's MoELinearRouterWithExpertBias) and the MoE FFN is
checked against a readable reference of OLMo-core's semantics computed from those tensors. With
``olmo_core`` importable, :func:`test_written_by_olmo_core` also builds the tiny model with
OLMo-core's own classes, saves it with OLMo-core's own writers and compares full-model logits
against a forward composed of OLMo-core's own modules.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from test_training_common import import_training

import_training()
from flexmoe_training.cli import main  # noqa: E402

from flexmoe_kernels.models import FlexOlmoConfig, FlexOlmoForCausalLM  # noqa: E402
from flexmoe_kernels.models.checkpoint import load_state_dict  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
L, E, D, FF, H, HKV, V = 2, 3, 16, 24, 4, 2, 64
HD = D // H


def _config(**kw) -> FlexOlmoConfig:
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=H,
                num_key_value_heads=HKV, num_experts=E, num_experts_per_tok=2, expert_bias=True,
                expert_names=["public", "math", "code"], moe_backend="torch", rope_theta=10000.0)
    base.update(kw)
    return FlexOlmoConfig(**base)


def _ours(path, gen, **kw) -> FlexOlmoForCausalLM:
    """Our model with N(0, 1) weights (fresh per call), expert_bias[1:] negative, [0] = 0, saved to ``path``."""
    model = FlexOlmoForCausalLM(_config(**kw)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "norm" not in name else 1.0))
            if name.endswith("expert_bias"):
                p.copy_(-torch.rand(p.shape, generator=gen) - 0.1)
                p[0] = 0.0
    model.save_pretrained(path)
    return model.eval()


def _olmo_core_sd(gen, layout="mlp", bias=True, tied=False, e=E, d=D, f=FF) -> dict:
    """An OLMo-core FlexOlmo state dict written from the documented key names and shapes."""
    r = lambda *s: torch.randn(*s, generator=gen) * 0.3  # noqa: E731
    sd = {"embeddings.weight": r(V, d), "lm_head.norm.weight": 1 + r(d)}
    if not tied:
        sd["lm_head.w_out.weight"] = r(V, d)
    for i in range(L):
        a, p = f"blocks.{i}.attention.", f"blocks.{i}.feed_forward_moe."
        sd.update({a + "w_q.weight": r(H * HD, d), a + "w_k.weight": r(HKV * HD, d), a + "w_v.weight": r(HKV * HD, d),
                   a + "w_out.weight": r(d, H * HD), a + "q_norm.weight": 1 + r(H * HD), a + "k_norm.weight": 1 + r(HKV * HD),
                   f"blocks.{i}.attention_norm.weight": 1 + r(d), f"blocks.{i}.feed_forward_norm.weight": 1 + r(d),
                   p + "router.weight": r(e * d), p + "experts.mlp.w2": r(e * f, d)})
        shape13 = (e * d, f) if layout == "mlp" else (e * f, d)
        sd[p + "experts.mlp.w1"], sd[p + "experts.mlp.w3"] = r(*shape13), r(*shape13)
        if bias:
            sd[p + "router.expert_bias"] = -torch.rand(e - 1, 1, generator=gen) - 0.1
    return sd


def _trainer_config(top_k=2) -> dict:
    """The part of OLMo-core's trainer config.json that convert reads (newer key: sequence_mixer)."""
    return {"model": {"d_model": D, "n_layers": L, "block": {
        "sequence_mixer": {"n_heads": H, "n_kv_heads": HKV, "rope": {"theta": 10000}},
        "layer_norm": {"eps": 1e-6}, "feed_forward_moe": {"router": {"top_k": top_k}}}}}


def _write_olmo_core(sd, directory, fmt, config=None) -> str:
    os.makedirs(directory, exist_ok=True)
    if fmt == "pt":
        torch.save(sd, os.path.join(directory, "model.pt"))
    elif fmt == "safetensors":  # OLMo-core's unshard_checkpoint(use_safetensors=True)
        from safetensors.torch import save_file

        save_file(sd, os.path.join(directory, "model.safetensors"))
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": sd}, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    if config is not None:
        with open(os.path.join(directory, "config.json"), "w") as fh:
            json.dump(config, fh)
    return str(directory)


def _convert(*argv) -> int:
    return main(["convert", *map(str, argv)])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", ["pt", "dcp"])
@pytest.mark.parametrize("bias,tied", [(True, False), (False, True)])
def test_round_trip_ours_olmo_core_ours(tmp_path, fmt, bias, tied):
    gen = torch.Generator().manual_seed(1)
    model = _ours(tmp_path / "ours", gen, expert_bias=bias, tie_word_embeddings=tied)
    assert _convert("--to", "olmo-core", "--input", tmp_path / "ours", "--out", tmp_path / "oc", "--format", fmt) == 0
    assert _convert("--to", "hf", "--input", tmp_path / "oc", "--out", tmp_path / "back") == 0
    _assert_same_tensors(load_state_dict(tmp_path / "ours"), load_state_dict(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == \
        json.loads((tmp_path / "ours" / "config.json").read_text())
    ids = torch.randint(0, V, (2, 7), generator=gen)
    back = FlexOlmoForCausalLM.from_pretrained(tmp_path / "back")
    assert torch.equal(_logits(model, ids), _logits(back, ids))
    if fmt == "pt":  # the OLMo-core side holds FlexOlmo's bias (E-1, 1) for experts 1..E-1, as stored
        oc = torch.load(tmp_path / "oc" / "model.pt", weights_only=True)
        assert torch.equal(oc["lm_head.w_out.weight"], oc["embeddings.weight"]) == tied  # OLMo-core stores both
        for i in range(L):
            key = f"blocks.{i}.feed_forward_moe.router.expert_bias"
            if bias:
                want = model.model.layers[i].mlp.gate.expert_bias.detach()[1:]
                assert oc[key].shape == (E - 1, 1) and torch.equal(oc[key][:, 0], want) and (want < 0).all()
            else:
                assert key not in oc


@pytest.mark.parametrize("fmt,layout", [("pt", "mlp"), ("dcp", "mlp"), ("dcp", "dropless"), ("safetensors", "mlp")])
def test_round_trip_olmo_core_ours_olmo_core(tmp_path, fmt, layout):
    gen = torch.Generator().manual_seed(2)
    sd = _olmo_core_sd(gen, layout=layout)
    src = _write_olmo_core(sd, tmp_path / "run" / "step10", fmt, config=_trainer_config(top_k=2))
    assert _convert("--to", "hf", "--input", src, "--out", tmp_path / "hf") == 0
    cfg = FlexOlmoConfig.from_pretrained(tmp_path / "hf")
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts, cfg.num_experts_per_tok) == (H, HKV, E, 2)
    assert cfg.rope_theta == 10000 and cfg.expert_bias and not cfg.tie_word_embeddings
    hf = load_state_dict(tmp_path / "hf")
    for i in range(L):  # the bias survives: 0 for the public expert, FlexOlmo's values for the others
        b = hf[f"model.layers.{i}.mlp.gate.expert_bias"]
        assert b[0] == 0 and torch.equal(b[1:], sd[f"blocks.{i}.feed_forward_moe.router.expert_bias"][:, 0])
    fmt = "pt" if fmt == "safetensors" else fmt  # written back as model.pt
    assert _convert("--to", "olmo-core", "--input", tmp_path / "hf", "--out", tmp_path / "oc", "--format", fmt) == 0
    if fmt == "pt":
        back = torch.load(tmp_path / "oc" / "model.pt", weights_only=True)
    else:
        from flexmoe_kernels.models.olmo_core import read_olmo_core

        back = read_olmo_core(tmp_path / "oc")[0]
    _assert_same_tensors(sd, back)


@pytest.mark.parametrize("says_tied", [True, False])
def test_tied_head_stored_twice(tmp_path, says_tied):
    """OLMo-core stores a tied model's head under both keys: tied when its config says so (and the
    head equals the embedding), else an untied copy; either way the way back is bit-identical."""
    sd = _olmo_core_sd(torch.Generator().manual_seed(10))
    sd["lm_head.w_out.weight"] = sd["embeddings.weight"].clone()
    config = _trainer_config()
    config["model"]["tie_word_embeddings"] = says_tied
    src = _write_olmo_core(sd, tmp_path / "oc", "pt", config=config)
    assert _convert("--to", "hf", "--input", src, "--out", tmp_path / "hf") == 0
    assert FlexOlmoConfig.from_pretrained(tmp_path / "hf").tie_word_embeddings == says_tied
    assert ("lm_head.weight" in load_state_dict(tmp_path / "hf")) == (not says_tied)
    assert _convert("--to", "olmo-core", "--input", tmp_path / "hf", "--out", tmp_path / "back") == 0
    _assert_same_tensors(sd, torch.load(tmp_path / "back" / "model.pt", weights_only=True))


def _reference_moe(sd, i, x_TD, top_k, layout):
    """OLMo-core's FlexOlmo MoE FFN written from its modules' code, on OLMo-core tensors: router
    logits ``x @ W.view(E, D).T``, ``min(b, 0)`` added to experts 1..E-1, softmax, top-k (no
    renormalisation); expert e = ``(silu(x w1_e) * (x w3_e)) w2_e``, MoEMLP views w1 as (E, D, F),
    DroplessMoEMLP as (E, F, D) (used transposed); w2 is (E, F, D) in both."""
    p = f"blocks.{i}.feed_forward_moe."
    logits = x_TD @ sd[p + "router.weight"].view(E, D).T
    logits[:, 1:] += sd[p + "router.expert_bias"].clamp(max=0).T
    w_TK, idx_TK = logits.softmax(-1).topk(top_k, dim=-1)
    if layout == "mlp":
        w1, w3 = (sd[p + f"experts.mlp.{w}"].view(E, D, FF) for w in ("w1", "w3"))
    else:
        w1, w3 = (sd[p + f"experts.mlp.{w}"].view(E, FF, D).transpose(1, 2) for w in ("w1", "w3"))
    w2 = sd[p + "experts.mlp.w2"].view(E, FF, D)
    y_ETD = torch.stack([(F.silu(x_TD @ w1[e]) * (x_TD @ w3[e])) @ w2[e] for e in range(E)])
    out = torch.zeros_like(x_TD)
    for k in range(top_k):
        out += w_TK[:, k:k + 1] * y_ETD[idx_TK[:, k], torch.arange(x_TD.shape[0])]
    return out


@pytest.mark.parametrize("layout", ["mlp", "dropless"])
def test_moe_layer_matches_olmo_core_semantics(tmp_path, layout):
    """Our converted MoE layer computes what OLMo-core's FlexOlmo layer computes on its tensors
    (the transposes, the w1/w3 split and the bias on experts 1.. are right)."""
    gen = torch.Generator().manual_seed(3)
    sd = _olmo_core_sd(gen, layout=layout)
    _write_olmo_core(sd, tmp_path / "oc", "pt", config=_trainer_config(top_k=2))
    assert _convert("--to", "hf", "--input", tmp_path / "oc", "--out", tmp_path / "hf") == 0
    model = FlexOlmoForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x_TD = torch.randn(11, D, generator=gen)
    for i in range(L):
        with torch.no_grad():
            ours = model.model.layers[i].mlp(x_TD)
        ours = ours[0] if isinstance(ours, tuple) else ours
        torch.testing.assert_close(ours, _reference_moe(sd, i, x_TD, 2, layout), rtol=1e-5, atol=1e-5)


def test_config_flag_step_directory_shards_and_dtype(tmp_path):
    """A DCP in a trainer step directory (step/model_and_optim/), the config from --config (our
    config.json: heads, theta, names), sharded output with an index, --dtype bf16."""
    gen = torch.Generator().manual_seed(9)
    sd = _olmo_core_sd(gen, tied=True)
    _write_olmo_core(sd, tmp_path / "step7" / "model_and_optim", "dcp")
    ours = _config(num_experts_per_tok=1, expert_names=["public", "news", "law"], rope_theta=10000.0)
    (tmp_path / "cfg.json").write_text(ours.to_json_string())
    assert _convert("--to", "hf", "--input", tmp_path / "step7", "--out", tmp_path / "hf", "--config",
                    tmp_path / "cfg.json", "--dtype", "bf16", "--max-shard-size", "2KB") == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    cfg = FlexOlmoConfig.from_pretrained(tmp_path / "hf")
    assert cfg.expert_names == ["public", "news", "law"] and cfg.num_experts_per_tok == 1 and cfg.tie_word_embeddings
    hf = load_state_dict(tmp_path / "hf")
    assert all(v.dtype == torch.bfloat16 for v in hf.values()) and "lm_head.weight" not in hf
    assert torch.equal(hf["model.embed_tokens.weight"], sd["embeddings.weight"].bfloat16())


# ---------------------------------------------------------------------------- errors and atomicity
def _fails(capsys, *argv) -> str:
    """Run convert, expect exit status 2, return its one-line error."""
    capsys.readouterr()
    assert _convert(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexmoe: error: ") and "\n" not in err, err
    return err


def test_errors_name_the_argument(tmp_path, capsys):
    gen = torch.Generator().manual_seed(4)
    out = tmp_path / "out"
    err = _fails(capsys, "--to", "hf", "--input", tmp_path / "missing", "--out", out)
    assert "--input" in err and "missing" in err
    err = _fails(capsys, "--to", "olmo-core", "--input", tmp_path / "missing", "--out", out)
    assert "--input" in err
    (tmp_path / "empty").mkdir()
    assert "model.pt" in _fails(capsys, "--to", "hf", "--input", tmp_path / "empty", "--out", out)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert "junk.pt" in _fails(capsys, "--to", "hf", "--input", tmp_path / "junk.pt", "--out", out)

    sd = _olmo_core_sd(gen)
    sd["blocks.1.feed_forward_moe.shared_mlp.w1.weight"] = torch.zeros(4, D)
    src = _write_olmo_core(sd, tmp_path / "unknown", "pt", config=_trainer_config())
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", out)
    assert "--input" in err and "unknown tensors" in err and "shared_mlp.w1.weight" in err

    sd = _olmo_core_sd(gen)
    sd["blocks.1.feed_forward_moe.experts.mlp.w3"] = torch.zeros(E * D, FF + 1)
    src = _write_olmo_core(sd, tmp_path / "shape", "pt", config=_trainer_config())
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", out)
    assert "blocks.1.feed_forward_moe.experts.mlp.w3" in err and f"({E * D}, {FF + 1})" in err

    src = _write_olmo_core(_olmo_core_sd(gen), tmp_path / "noconfig", "pt")
    assert "--config" in _fails(capsys, "--to", "hf", "--input", src, "--out", out)
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", out, "--config", "no-such-preset")
    assert err.startswith("flexmoe: error: --config: 'no-such-preset'") and "presets" in err
    bad = {"model": {"block": {"sequence_mixer": {"n_heads": 3}}}}  # 3 heads do not divide the projections
    src = _write_olmo_core(_olmo_core_sd(gen), tmp_path / "badheads", "pt", config=bad)
    assert "3 heads" in _fails(capsys, "--to", "hf", "--input", src, "--out", out)

    sq = _olmo_core_sd(gen, f=D)  # D == F: both expert layouts fit the shapes
    src = _write_olmo_core(sq, tmp_path / "square", "pt", config=_trainer_config())
    assert "expert layout" in _fails(capsys, "--to", "hf", "--input", src, "--out", out)
    assert _convert("--to", "hf", "--input", src, "--out", out, "--expert-layout", "dropless") == 0
    assert "--out" in _fails(capsys, "--to", "hf", "--input", src, "--out", out)  # exists, no --overwrite
    assert "--format" in _fails(capsys, "--to", "hf", "--input", src, "--out", out, "--overwrite", "--format", "dcp")

    model = _ours(tmp_path / "ours", gen)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.expert_bias[0] = -0.5
    model.save_pretrained(tmp_path / "ours")
    err = _fails(capsys, "--to", "olmo-core", "--input", tmp_path / "ours", "--out", tmp_path / "oc")
    assert "model.layers.1.mlp.gate.expert_bias[0]" in err and "--input" in err
    assert not (tmp_path / "oc").exists()


@pytest.mark.parametrize("to", ["hf", "olmo-core"])
def test_output_is_atomic(tmp_path, monkeypatch, to):
    """A failure while writing leaves no --out (or the old one untouched with --overwrite) and no temporaries."""
    import flexmoe_kernels.models.checkpoint as ckpt
    import flexmoe_kernels.models.olmo_core as oc

    gen = torch.Generator().manual_seed(5)
    if to == "hf":
        src = _write_olmo_core(_olmo_core_sd(gen), tmp_path / "src", "pt", config=_trainer_config())
        real = ckpt.save_pretrained

        def broken(model, directory, **kw):
            real(model, directory, **kw)
            raise OSError("disk full")

        monkeypatch.setattr(ckpt, "save_pretrained", broken)
    else:
        _ours(tmp_path / "src", gen)
        src = tmp_path / "src"

        def broken(sd, directory, fmt):
            (open(os.path.join(directory, "model.pt"), "wb")).write(b"partial")
            raise OSError("disk full")

        monkeypatch.setattr(oc, "write_olmo_core", broken)
    with pytest.raises(OSError, match="disk full"):
        _convert("--to", to, "--input", src, "--out", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        _convert("--to", to, "--input", src, "--out", tmp_path / "out", "--overwrite")
    assert sorted(os.listdir(tmp_path)) == ["out", "src"] and os.listdir(tmp_path / "out") == ["keep.txt"]


def test_dcp_metadata_of_olmo_core_reads_without_olmo_core(tmp_path, capsys):
    """OLMo-core's DCP writer pickles its own ``_StorageInfo`` class into ``.metadata``: it reads
    without ``olmo_core`` (mapped to torch's); any other global in the pickle is refused."""
    import pickle

    gen = torch.Generator().manual_seed(8)
    sd = _olmo_core_sd(gen)
    src = _write_olmo_core(sd, tmp_path / "oc", "dcp", config=_trainer_config())
    with open(os.path.join(src, ".metadata"), "rb") as fh:
        meta = pickle.load(fh)
    raw = pickle.dumps(meta, protocol=2)  # protocol 2: globals are plain text lines
    theirs = raw.replace(b"ctorch.distributed.checkpoint.filesystem\n_StorageInfo\n",
                         b"colmo_core.distributed.checkpoint.filesystem\n_StorageInfo\n")
    assert theirs != raw
    with open(os.path.join(src, ".metadata"), "wb") as fh:
        fh.write(theirs)
    from flexmoe_kernels.models.olmo_core import read_olmo_core

    _assert_same_tensors(sd, read_olmo_core(src)[0])
    with open(os.path.join(src, ".metadata"), "wb") as fh:
        fh.write(b"cos\nsystem\n(S'echo pwned'\ntR.")
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", tmp_path / "out")
    assert "--input" in err and "refusing to load os.system" in err


# ---------------------------------------------------------------------------- written by OLMo-core itself
def _olmo_core_or_skip():
    try:
        from olmo_core.nn.transformer import TransformerConfig
    except Exception as exc:  # not installed, or installed without its dependencies (cached_path, ...)
        pytest.skip(f"olmo_core is not importable ({type(exc).__name__}: {exc}); `pip install ai2-olmo-core` "
                    "runs this test (the tests above write OLMo-core's format from its documented key names)")
    return TransformerConfig


def _olmo_core_model(layout: str, tied: bool = False):
    """A tiny FlexOlmo model built by OLMo-core (moe_reordered_norm blocks, QK-norm), N(0, 0.3) weights,
    with FlexOlmo's router bias (MoELinearRouterWithExpertBias.expert_bias, (E-1, 1), negative) added
    to every router as that subclass registers it."""
    TransformerConfig = _olmo_core_or_skip()
    cfg = TransformerConfig.llama_like_moe(
        d_model=D, vocab_size=V, n_layers=L, n_heads=H, n_kv_heads=HKV, num_experts=E, top_k=2,
        expert_hidden_size=FF, reordered_norm=True, qk_norm=True, rope_theta=10000, layer_norm_eps=1e-6,
        z_loss_weight=None, lb_loss_weight=None, dropless=layout == "dropless",
        capacity_factor=None if layout == "dropless" else float(E), tie_word_embeddings=tied)
    model = cfg.build(init_device="cpu")
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for block in model.blocks.values():
            router = block.feed_forward_moe.router
            router.register_parameter("expert_bias", torch.nn.Parameter(-torch.rand(E - 1, 1, generator=gen) - 0.1))
        for name, p in model.named_parameters():
            if not name.endswith("expert_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "norm" in name else 0.0))
    return cfg, model.eval()


@torch.no_grad()
def _olmo_core_logits(model, ids, top_k=2):
    """Logits from OLMo-core's own modules (embeddings, attention, norms, router logits, expert MLPs,
    LM head), composed as MoEReorderedNormTransformerBlock.forward does, with FlexOlmo's router
    (min(b, 0) on experts 1.., softmax, top-k, no renormalisation) in place of the base router."""
    x = model.embeddings(ids)
    for block in model.blocks.values():
        h = x + block.attention_norm(block.attention(x))
        moe = block.feed_forward_moe
        h_TD = h.reshape(-1, D)
        logits = moe.router.get_expert_logits(h_TD).view(-1, E)
        logits[:, 1:] += moe.router.expert_bias.clamp(max=0).T
        w_TK, idx_TK = logits.softmax(-1).topk(top_k, dim=-1)
        mlp, T = moe.experts.mlp, h_TD.shape[0]
        if hasattr(mlp, "gmm"):  # DroplessMoEMLP: tokens grouped by expert
            y_ETD = mlp(h_TD.repeat(E, 1), torch.full((E,), T, dtype=torch.long)).view(E, T, D)
        else:  # MoEMLP: (E, N, D) per expert
            y_ETD = mlp(h_TD.expand(E, T, D).contiguous())
        out = sum(w_TK[:, k:k + 1] * y_ETD[idx_TK[:, k], torch.arange(T)] for k in range(top_k))
        x = h + block.feed_forward_norm(out.view_as(h))
    return model.lm_head(x)


@pytest.mark.parametrize("layout,fmt,tied", [("mlp", "pt", False), ("mlp", "dcp", True), ("dropless", "dcp", False)])
def test_written_by_olmo_core(tmp_path, layout, fmt, tied):
    """OLMo-core's model and writers (torch.save of its state dict as unshard_checkpoint does, or
    save_model_and_optim_state): ours gives OLMo-core's logits, keeps the bias, and converts back to
    a state dict OLMo-core loads strictly, bit-identical."""
    cfg, model = _olmo_core_model(layout, tied)
    src = tmp_path / "run" / "step0"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"model": cfg.as_config_dict()}))
    if fmt == "pt":
        torch.save(model.state_dict(), src / "model.pt")
    else:
        from olmo_core.distributed.checkpoint import save_model_and_optim_state

        save_model_and_optim_state(str(src / "model_and_optim"), model)
    assert _convert("--to", "hf", "--input", src, "--out", tmp_path / "hf") == 0
    ours = FlexOlmoForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.num_experts_per_tok == 2 and ours.config.expert_bias and ours.config.tie_word_embeddings == tied
    for i, block in enumerate(model.blocks.values()):
        assert torch.equal(ours.model.layers[i].mlp.gate.expert_bias[1:], block.feed_forward_moe.router.expert_bias[:, 0])
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(_logits(ours, ids), _olmo_core_logits(model, ids), rtol=1e-4, atol=1e-4)

    assert _convert("--to", "olmo-core", "--input", tmp_path / "hf", "--out", tmp_path / "oc", "--format", fmt) == 0
    from flexmoe_kernels.models.olmo_core import read_olmo_core

    back = read_olmo_core(tmp_path / "oc")[0]
    _assert_same_tensors({k: v for k, v in model.state_dict().items()}, back)
    _, fresh = _olmo_core_model(layout, tied)
    fresh.load_state_dict(back, strict=True)
    written = json.loads((tmp_path / "oc" / "config.json").read_text())["model"]  # OLMo-core's, for its trainer
    assert written["block"]["feed_forward_moe"]["num_experts"] == E and written["tie_word_embeddings"] == tied


# ---------------------------------------------------------------------------- issue 21: untrusted inputs
def _dcp(tmp_path, name="oc", seed=11) -> str:
    return _write_olmo_core(_olmo_core_sd(torch.Generator().manual_seed(seed)), tmp_path / name, "dcp",
                            config=_trainer_config())


def _rewrite_dcp_metadata(src, edit) -> None:
    """Apply ``edit`` to every ``_StorageInfo`` of the DCP ``src``'s ``.metadata`` (the test trusts its own pickle)."""
    import pickle

    path = os.path.join(src, ".metadata")
    with open(path, "rb") as fh:
        meta = pickle.load(fh)
    for info in meta.storage_data.values():
        edit(info)
    with open(path, "wb") as fh:
        pickle.dump(meta, fh)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_dcp_shard_missing_or_damaged_is_named(tmp_path, capsys, damage):
    """Item 8: torch raises CheckpointException (a BaseException) for a missing or damaged
    __0_0.distcp; convert names the file in one line, the library raises CheckpointError."""
    from flexmoe_kernels.models import CheckpointError
    from flexmoe_kernels.models.olmo_core import read_olmo_core

    src = _dcp(tmp_path)
    shard = os.path.join(src, "__0_0.distcp")
    data = open(shard, "rb").read()
    if damage == "missing":
        os.remove(shard)
    else:
        with open(shard, "wb") as fh:
            fh.write(data[: len(data) // 2] if damage == "truncated" else b"\0" * len(data))
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", tmp_path / "out")
    assert "--input" in err and "__0_0.distcp" in err and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="__0_0.distcp"):
        read_olmo_core(src)


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_dcp_storage_path_outside_the_directory_is_refused(tmp_path, capsys, escape):
    """Item 14: a .metadata whose _StorageInfo.relative_path leaves the checkpoint directory
    (``..``, an absolute path, a symlink pointing out) is refused, naming the path."""
    from flexmoe_kernels.models import CheckpointError
    from flexmoe_kernels.models.olmo_core import read_olmo_core

    src, other = _dcp(tmp_path), _dcp(tmp_path, "other", seed=12)
    os.remove(os.path.join(src, "__0_0.distcp"))
    target = {"dotdot": "../other/__0_0.distcp", "absolute": os.path.join(other, "__0_0.distcp"),
              "symlink": "__0_0.distcp"}[escape]
    if escape == "symlink":
        os.symlink(os.path.join(other, "__0_0.distcp"), os.path.join(src, "__0_0.distcp"))
    else:
        def point_away(info):
            info.relative_path = target

        _rewrite_dcp_metadata(src, point_away)
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", tmp_path / "out")
    assert "--input" in err and target in err and "outside" in err and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="outside"):
        read_olmo_core(src)


def test_dcp_storage_slice_past_the_end_is_named(tmp_path, capsys):
    """Item 8: a _StorageInfo whose offset + length runs past its file (a truncated copy) names the
    file, its size and the bytes needed, before torch reads anything."""
    src = _dcp(tmp_path)

    def grow(info):
        info.length += 10**6

    _rewrite_dcp_metadata(src, grow)
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", tmp_path / "out")
    assert "__0_0.distcp" in err and "truncated" in err


def test_integer_tensor_is_named(tmp_path, capsys):
    """Item 9: an integer tensor where a weight belongs is named with its dtype (was a traceback
    from requires_grad while building the model)."""
    from flexmoe_kernels.models import CheckpointError
    from flexmoe_kernels.models.olmo_core import olmo_core_to_hf

    sd = _olmo_core_sd(torch.Generator().manual_seed(13))
    key = "blocks.1.attention.w_v.weight"
    sd[key] = (sd[key] * 10).to(torch.int64)
    src = _write_olmo_core(sd, tmp_path / "oc", "pt", config=_trainer_config())
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", tmp_path / "out")
    assert "--input" in err and key in err and "torch.int64" in err and "floating" in err
    with pytest.raises(CheckpointError, match=f"{key}.*torch.int64"):
        olmo_core_to_hf(sd)


def test_embedding_of_wrong_rank_is_named(tmp_path, capsys):
    """Item 13: a 3-D embedding names the tensor, its shape and the rank expected (was 'too many
    values to unpack (expected 2)')."""
    sd = _olmo_core_sd(torch.Generator().manual_seed(14))
    sd["embeddings.weight"] = sd["embeddings.weight"][:, None, :].expand(-1, 2, -1).contiguous()
    src = _write_olmo_core(sd, tmp_path / "oc", "pt", config=_trainer_config())
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", tmp_path / "out")
    assert "'embeddings.weight'" in err and f"({V}, 2, {D})" in err and "2-D" in err


def _flip_byte_in_member(path, member_suffix: str) -> str:
    """Flip one byte in the middle of the data of the zip member ending with ``member_suffix``; its name."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        fh.seek(pos)
        byte = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([byte[0] ^ 0x10]))
    return info.filename


def test_flipped_byte_in_model_pt_is_named(tmp_path, capsys):
    """Item 16: torch.load does not check the zip CRCs, so a flipped byte inside model.pt converted
    silently; the archive's CRCs are checked first and the failing member is named."""
    from flexmoe_kernels.models import CheckpointError
    from flexmoe_kernels.models.olmo_core import read_olmo_core

    sd = _olmo_core_sd(torch.Generator().manual_seed(15))
    src = _write_olmo_core(sd, tmp_path / "oc", "pt", config=_trainer_config())
    _assert_same_tensors(sd, read_olmo_core(src)[0])  # an intact file reads
    member = _flip_byte_in_member(os.path.join(src, "model.pt"), "data/3")
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", tmp_path / "out")
    assert "--input" in err and "model.pt" in err and member in err and "CRC" in err
    with pytest.raises(CheckpointError, match="CRC"):
        read_olmo_core(src)


def test_hf_index_not_matching_its_shards_is_named(tmp_path, capsys):
    """Item 15 through convert --to olmo-core: an index mapping a tensor to a shard that does not
    hold it is one line naming the tensor and both shards."""
    _ours(tmp_path / "hf", torch.Generator().manual_seed(16))
    FlexOlmoForCausalLM.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "hf", max_shard_size=4000)
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][key] = files[1]
    index_path.write_text(json.dumps(index))
    err = _fails(capsys, "--to", "olmo-core", "--input", tmp_path / "hf", "--out", tmp_path / "oc")
    assert "--input" in err and key in err and files[0] in err and files[1] in err


def test_flipped_byte_in_dcp_shard_is_named(tmp_path, capsys):
    """Item 16, the DCP side: every tensor of a .distcp file is a torch.save zip archive that
    torch.load reads without checking its CRCs; each slice's CRCs are checked before it is read."""
    import io
    import pickle
    import struct
    import zipfile

    from flexmoe_kernels.models import CheckpointError
    from flexmoe_kernels.models.olmo_core import read_olmo_core

    src = _dcp(tmp_path)
    with open(os.path.join(src, ".metadata"), "rb") as fh:
        meta = pickle.load(fh)
    fqn = "model.blocks.1.attention.w_v.weight"
    info = next(v for k, v in meta.storage_data.items() if k.fqn == fqn)
    shard = os.path.join(src, info.relative_path)
    with open(shard, "rb") as fh:
        fh.seek(info.offset)
        piece = fh.read(info.length)
    with zipfile.ZipFile(io.BytesIO(piece)) as z:  # the slice is a zip archive; its tensor data member
        member = next(i for i in z.infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", piece[member.header_offset + 26: member.header_offset + 30])
    pos = info.offset + member.header_offset + 30 + name_len + extra_len + member.compress_size // 2
    with open(shard, "r+b") as fh:
        fh.seek(pos)
        byte = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([byte[0] ^ 0x10]))
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", tmp_path / "out")
    assert "__0_0.distcp" in err and fqn in err and "CRC" in err and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="CRC"):
        read_olmo_core(src)


@pytest.mark.parametrize("config,where", [
    ({"model": []}, "model is []"),
    ({"model": {"block": {"sequence_mixer": {"n_heads": "4"}}}}, "model.block.sequence_mixer.n_heads is '4'"),
    ({"model": {"block": {"sequence_mixer": {"n_heads": H}, "feed_forward_moe": {"router": {"top_k": 0}}}}},
     "model.block.feed_forward_moe.router.top_k is 0"),
    ({"block": {"attention": {"n_heads": H, "rope": {"theta": -1}}}}, "block.attention.rope.theta is -1"),
    ({"model": {"block": {"sequence_mixer": {"n_heads": H}}, "tie_word_embeddings": "yes"}},
     "model.tie_word_embeddings is 'yes'"),
])
def test_olmo_core_config_json_of_wrong_types_is_named(tmp_path, capsys, config, where):
    """OLMo-core's config.json beside --input is untrusted too: a section that is not an object or
    a field of the wrong type names the file, the field and the value (was an AttributeError
    traceback, or 'unsupported operand type(s) for //: 'int' and 'str'')."""
    src = _write_olmo_core(_olmo_core_sd(torch.Generator().manual_seed(17)), tmp_path / "oc", "pt", config=config)
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", tmp_path / "out")
    assert "--input" in err and "config.json" in err and where in err


def test_non_string_key_in_model_pt_is_named(tmp_path, capsys):
    sd = _olmo_core_sd(torch.Generator().manual_seed(18))
    sd[7] = torch.zeros(2)
    src = _write_olmo_core(sd, tmp_path / "oc", "pt", config=_trainer_config())
    err = _fails(capsys, "--to", "hf", "--input", src, "--out", tmp_path / "out")
    assert "model.pt" in err and "[7]" in err


def test_integer_tensor_is_named_going_to_olmo_core(tmp_path, capsys):
    """Item 9, the other way: an integer tensor in our checkpoint is named, not written into an
    OLMo-core checkpoint (OLMo-core's load_state_dict would cast it into its float parameter)."""
    from safetensors.torch import load_file, save_file

    _ours(tmp_path / "hf", torch.Generator().manual_seed(19))
    path = tmp_path / "hf" / "model.safetensors"
    sd = load_file(path)
    key = "model.layers.0.self_attn.v_proj.weight"
    sd[key] = (sd[key] * 10).to(torch.int32)
    save_file(sd, path)
    err = _fails(capsys, "--to", "olmo-core", "--input", tmp_path / "hf", "--out", tmp_path / "oc")
    assert "--input" in err and key in err and "torch.int32" in err and not (tmp_path / "oc").exists()
