"""``flexmoe plan`` (training/memory.py, training/commands/plan.py): per-rank memory under ZeRO 0-3
(issue 16 item 5). Meta-device models only: no parameter memory is allocated, so 7B sizes run on CPU."""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from test_training_common import import_training, tiny_model_config

import_training()
from flexmoe_training.cli import main  # noqa: E402
from flexmoe_training.memory import (  # noqa: E402
    activation_bytes, build_config, model_state_bytes, param_counts, plan_memory)

DENSE_SIZES = ("tiny", "olmo2-1b", "olmo2-7b")


def _states(spec, kind=None, world=8, stage=3, **kw):
    cfg, kind = build_config(spec, kind, **kw)
    counts = param_counts(cfg, kind)
    return counts, model_state_bytes(counts, world, stage)


def _ds_printed_gib(fn, *args, option, **kw) -> float:
    """The per-GPU GiB DeepSpeed's printing estimator reports on the line of ``option``."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args, **kw)
    for line in buf.getvalue().splitlines():
        if line.rstrip().endswith(option):
            return float(line.split("|")[1].strip().removesuffix("GB"))
    raise AssertionError(f"no line ending in {option!r} in:\n{buf.getvalue()}")


@pytest.mark.parametrize("spec", DENSE_SIZES)
@pytest.mark.parametrize("gpus,nodes", [(8, 1), (8, 8)])
def test_model_states_match_deepspeed_estimators(spec, gpus, nodes):
    """(a) Our parameter, gradient and optimizer bytes against DeepSpeed's own estimators (no offload).

    Same assumptions: bf16 parameters and gradients, AdamW with an fp32 master copy and two fp32
    moments. DeepSpeed's ZeRO-2 formula is ``2P + 18P/N`` with 18 = 2 (bf16 grads) + 4 (fp32
    grads) + 4 (fp32 params) + 8 (moments): ours is 2 B x P parameters + 2 B x P_t/N gradients
    + 16 B x P_t/N optimizer (master, moments and the fp32 gradient copy) -- the same terms. Its
    ZeRO-3 formula is ``4*largest_layer + 18P/N``: we count the same gathered module (4 B x the
    largest module, found as DeepSpeed's ``model_to_params`` finds it) but 20 B/N per parameter,
    because DeepSpeed's ZeRO-3 optimizer also keeps the bf16 gradient partition
    (``grad_partitions_flat_buffer`` in stage3.py) that the formula leaves out: we add 2P/N to
    DeepSpeed's figure before comparing. The remaining difference is the dense model's frozen
    one-row router (L*D parameters, < 0.01%) and the rounding of shards: within 1%.
    """
    ds = pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    del ds
    world = gpus * nodes
    counts, z2 = _states(spec, world=world, stage=2)
    _, z3 = _states(spec, world=world, stage=3)
    P = counts.total
    _, ds2 = stage_1_and_2.estimate_zero2_model_states_mem_needs(
        P, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=False)
    assert z2["zero3_gather"] == 0
    assert sum(z2.values()) == pytest.approx(ds2, rel=0.01)
    _, ds3, largest_mem = stage3.estimate_zero3_model_states_mem_needs(
        P, counts.largest_module, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=False,
        cpu_offload_params=False)
    assert z3["zero3_gather"] == largest_mem
    assert sum(z3.values()) == pytest.approx(ds3 + 2 * P / world, rel=0.01)
    if spec == "olmo2-7b":  # the printing estimators (..._all_cold) print the same figures
        g2 = _ds_printed_gib(stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold, P,
                             num_gpus_per_node=gpus, num_nodes=nodes, option="offload_optimizer=none")
        assert sum(z2.values()) / 2 ** 30 == pytest.approx(g2, rel=0.01)
        g3 = _ds_printed_gib(stage3.estimate_zero3_model_states_mem_needs_all_cold, P, counts.largest_module,
                             num_gpus_per_node=gpus, num_nodes=nodes,
                             option="offload_param=none, offload_optimizer=none, zero_init=1")
        assert (sum(z3.values()) - 2 * P / world) / 2 ** 30 == pytest.approx(g3, rel=0.01)


def test_param_counts_match_deepspeed_model_to_params_on_a_live_model(tmp_path):
    """DeepSpeed's ``model_to_params`` (what ``..._all_live`` uses) on a real CPU model agrees with
    our meta-device counts: total (tied head once) and the largest module."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import model_to_params

    from flexmoe_kernels.models import FlexOlmoForCausalLM

    for tie in (False, True):
        cfg, kind = build_config(str(tiny_model_config(tmp_path / f"m{tie}.json", vocab_size=300,
                                                       tie_word_embeddings=tie)), None, num_experts=3)
        total, largest = model_to_params(FlexOlmoForCausalLM(cfg))
        counts = param_counts(cfg, kind)
        assert (counts.total, counts.largest_module) == (total, largest)
        assert counts.trainable == total  # moe: everything trains


def test_coupled_has_less_gradient_and_optimizer_state_than_moe_and_equal_parameters(tmp_path):
    """(b) The same 2-expert model trained as an owner's coupled model (the trainer's own
    ``freeze_for_expert_training`` on a meta-device model) and as a standard MoE (everything trains)."""
    two = tiny_model_config(tmp_path / "two.json", vocab_size=300, num_experts=2, num_experts_per_tok=2,
                            expert_bias=True)
    for spec in (str(two), "olmo2-7b"):
        cfg, _ = build_config(spec, "coupled")
        c_counts, m_counts = param_counts(cfg, "coupled"), param_counts(cfg, "moe")
        for stage in range(4):
            coupled, moe = model_state_bytes(c_counts, 8, stage), model_state_bytes(m_counts, 8, stage)
            assert coupled["parameters"] == moe["parameters"]
            assert coupled["gradients"] < moe["gradients"] and coupled["optimizer"] < moe["optimizer"]
        D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        # trainable: the owner's FFN row, router row and bias in every layer, nothing else
        assert c_counts.trainable == L * (3 * D * F + D + 1)
        assert m_counts.trainable == m_counts.total == c_counts.total


@pytest.mark.parametrize("kind", ["dense", "coupled", "moe", "router-tuning"])
def test_zero_stages_shard_monotonically(kind):
    """(c) Each term and the total per rank never grow with the stage; each stage shards its term."""
    extra = {} if kind in ("dense", "coupled") else {"num_experts": 4}
    by_stage = [_states("olmo2-1b", kind, world=8, stage=s, **extra)[1] for s in range(4)]
    for a, b in zip(by_stage, by_stage[1:]):
        for key in ("parameters", "gradients", "optimizer"):
            assert b[key] <= a[key]
    totals = [sum(s.values()) for s in by_stage]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[1]
    assert by_stage[1]["optimizer"] * 8 >= by_stage[0]["optimizer"] > by_stage[1]["optimizer"]
    assert by_stage[2]["gradients"] < by_stage[1]["gradients"] or by_stage[1]["gradients"] == 0
    assert by_stage[3]["parameters"] < by_stage[2]["parameters"]
    one = [_states("olmo2-1b", kind, world=1, stage=s, **extra)[1] for s in range(3)]
    assert one[0] == one[1] == one[2]  # one rank: nothing to shard


@pytest.mark.parametrize("spec,kw", [("olmo2-7b", {}), ("olmo2-7b", {"num_experts": 7, "top_k": 5})])
def test_activation_checkpointing_reduces_activations(spec, kw):
    """(d) Checkpointing keeps block inputs plus one block: less than every block's saved tensors."""
    cfg, _ = build_config(spec, None, **kw)
    off = activation_bytes(cfg, 2, 4096, False)
    on = activation_bytes(cfg, 2, 4096, True)
    assert on["total"] < off["total"] and on["head"] == off["head"]
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    assert off["blocks"] == on["tokens"] * L * on["block_per_token"]
    assert on["blocks"] == on["tokens"] * (L * 2 * D + on["block_per_token"])
    assert activation_bytes(cfg, 4, 4096, False)["total"] == 2 * off["total"]  # linear in tokens (no S^2)


def _cli(capsys, *argv):
    code = main(["plan", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_table_and_json(capsys):
    """(e) The table with every term and the fit verdict; --json with the same numbers."""
    argv = ["--model-config", "olmo2-7b", "--gpus", "8", "--zero-stage", "3", "--kind", "coupled",
            "--activation-checkpointing"]
    code, out, _ = _cli(capsys, *argv)
    assert code == 0
    for word in ("parameters (bf16", "gradients (bf16", "optimizer (fp32", "ZeRO-3 gathered module",
                 "activations", "total", "fits", "assumptions"):
        assert word in out
    code, js, _ = _cli(capsys, *argv, "--json")
    p = json.loads(js)
    assert p["kind"] == "coupled" and p["world"] == 8 and p["fits"] is True
    total = float(re.search(r"total\s+([\d.]+) GiB", out).group(1))
    assert total == pytest.approx(p["bytes_per_rank"]["total"] / 2 ** 30, abs=0.006)
    base = plan_memory("olmo2-7b", gpus=8, zero_stage=3, kind="coupled", checkpointing=True)
    assert {k: p[k] for k in base} == base  # plus suggestions, checkpoints, merge, inference, throughput
    code, out, _ = _cli(capsys, *argv[:-1], "--gpu-memory-gb", "10")
    assert code == 0 and "DOES NOT FIT" in out


@pytest.mark.parametrize("argv,flag", [
    (["--gpus", "0"], "--gpus"),
    (["--nodes", "-1"], "--nodes"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--seq-len", "999999"], "--seq-len"),
    (["--gpu-memory-gb", "0"], "--gpu-memory-gb"),
    (["--kind", "moe"], "--num-experts"),
    (["--num-experts", "4", "--kind", "dense"], "--kind dense"),
    (["--num-experts", "4", "--kind", "coupled"], "--kind coupled"),
    (["--num-experts", "0"], "--num-experts"),
    (["--num-experts", "4", "--top-k", "5"], "--top-k"),
    (["--model-config", "no-such-preset"], "--model-config"),
])
def test_cli_errors_name_the_flag(capsys, argv, flag):
    base = {"--model-config": "olmo2-1b", "--gpus": "8", "--zero-stage": "2"}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    code, out, err = _cli(capsys, *[x for kv in base.items() for x in kv])
    assert code == 2 and flag in err and not out


def test_cli_argparse_rejects_a_bad_stage_and_a_missing_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model-config", "tiny", "--gpus", "8", "--zero-stage", "4"])
    assert exc.value.code == 2 and "--zero-stage" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--model-config", "tiny", "--zero-stage", "3"])
    assert "--gpus" in capsys.readouterr().err


def test_a_7x7b_moe_is_counted_on_the_meta_device():
    """The estimator builds no real tensors: a 33B-parameter model is counted on CPU in seconds."""
    cfg, kind = build_config("olmo2-7b", None, num_experts=7, top_k=5)
    counts = param_counts(cfg, kind)
    assert counts.total > 3.3e10 and counts.largest_module == 7 * 3 * cfg.hidden_size * cfg.intermediate_size


def test_router_tuning_trains_only_router_rows_and_non_public_biases_with_every_expert_active(tmp_path):
    """``freeze_for_router_tuning`` on the meta model: E router rows (and E-1 biases) per layer, top-k = E."""
    merged = tiny_model_config(tmp_path / "merged.json", vocab_size=300, num_experts=7, num_experts_per_tok=5,
                               expert_bias=True)
    for spec, bias in ((str(merged), 6), ("olmo2-7b", 0)):
        cfg, kind = build_config(spec, "router-tuning", num_experts=None if bias else 7)
        counts = param_counts(cfg, kind)
        assert cfg.num_experts_per_tok == 7 and cfg.expert_bias == bool(bias)
        assert counts.trainable == cfg.num_hidden_layers * (7 * cfg.hidden_size + bias)


H100_USABLE_GIB = 79.6  # nvidia-smi: 81559 MiB on an H100 80GB (SXM, HBM3) = 79.65 GiB


def test_gpu_memory_is_in_gib_and_defaults_to_an_h100s_usable_memory(capsys):
    """Issue 21 item 11: the flag is named in its unit (--gpu-memory-gib); the default is what an H100
    80GB really offers (79.6 GiB, not 80); --gpu-memory-gb stays as a deprecated alias meaning GiB."""
    argv = ["--model-config", "tiny", "--gpus", "1", "--zero-stage", "0", "--json"]
    code, js, _ = _cli(capsys, *argv)
    p = json.loads(js)
    assert code == 0 and p["gpu_memory_gib"] == H100_USABLE_GIB
    assert p["gpu_memory_bytes"] == int(H100_USABLE_GIB * 2 ** 30)
    assert json.loads(_cli(capsys, *argv, "--gpu-memory-gib", "40")[1])["gpu_memory_bytes"] == 40 * 2 ** 30
    code, js, err = _cli(capsys, *argv, "--gpu-memory-gb", "40")
    assert code == 0 and json.loads(js)["gpu_memory_bytes"] == 40 * 2 ** 30 and "deprecated" in err
    code, table, _ = _cli(capsys, *argv[:-1])
    assert "(--gpu-memory-gib)" in table and f"{H100_USABLE_GIB:.2f} GiB" in table
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--gpu-memory-gib" in text and "H100" in text and "81559 MiB" in text
    assert re.search(r"--gpu-memory-gb \S+\s+deprecated", text), text


@pytest.mark.parametrize("flag", ["--gpu-memory-gib", "--gpu-memory-gb"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "0", "-1"])
def test_gpu_memory_must_be_finite_and_positive(capsys, flag, value):
    code, out, err = _cli(capsys, "--model-config", "tiny", "--gpus", "1", "--zero-stage", "0", f"{flag}={value}")
    lines = [x for x in err.strip().splitlines() if "deprecated" not in x]
    assert code == 2 and not out and len(lines) == 1, err
    assert lines[0].startswith(f"flexmoe: error: {flag} ") and f"got {float(value)!r}" in lines[0], err
    with pytest.raises(ValueError, match="--gpu-memory-gib"):
        plan_memory("tiny", gpus=1, zero_stage=0, gpu_memory_gib=float(value))


ABSURD = [
    {"hidden_size": 10 ** 9, "num_attention_heads": 2},
    {"num_hidden_layers": 10 ** 6},
    {"vocab_size": 10 ** 9},
    {"hidden_size": 10 ** 9, "num_attention_heads": 2, "num_hidden_layers": 10 ** 6, "vocab_size": 10 ** 9,
     "intermediate_size": 10 ** 9},
]


@pytest.mark.parametrize("over", ABSURD, ids=["hidden-1e9", "layers-1e6", "vocab-1e9", "all"])
@pytest.mark.parametrize("kind", ["dense", "coupled", "moe"])
def test_absurd_sizes_answer_in_under_a_second(tmp_path, capsys, over, kind):
    """Issue 21 item 12: counted in closed form, so any size answers at once (it printed nothing in
    120 s for 1e6 layers: the model was built module by module on the meta device)."""
    import time

    spec = str(tiny_model_config(tmp_path / "absurd.json", **{"vocab_size": 258, **over}))
    extra = ["--num-experts", "4"] if kind == "moe" else []
    t0 = time.perf_counter()
    code, out, err = _cli(capsys, "--model-config", spec, "--gpus", "8", "--zero-stage", "3", "--kind", kind,
                          "--seq-len", "8", "--json", *extra)
    took = time.perf_counter() - t0
    assert took < 5.0, f"plan took {took:.1f} s"
    assert code == 0, err
    p = json.loads(out)
    assert p["params"]["total"] >= max(over.values()) and p["bytes_per_rank"]["total"] > 0


@pytest.mark.parametrize("spec", ["tiny", "small", "olmo2-1b", "olmo2-7b", "flexolmo-2x7b", "flexolmo-7x7b",
                                  "tied", "no-bias"])
@pytest.mark.parametrize("kind", ["dense", "coupled", "moe", "router-tuning"])
def test_closed_form_counts_equal_the_meta_model_with_the_trainers_freezing(tmp_path, spec, kind):
    """The closed form :func:`param_counts` equals the count of the model built on the meta device and
    frozen by the trainer's own functions (:func:`param_counts_meta`), for every preset and kind."""
    from flexmoe_training.memory import param_counts_meta

    if spec == "tied":
        spec = str(tiny_model_config(tmp_path / "tied.json", vocab_size=300, tie_word_embeddings=True))
    elif spec == "no-bias":
        spec = str(tiny_model_config(tmp_path / "nb.json", vocab_size=300, num_experts=3, num_experts_per_tok=2,
                                     expert_bias=False))
    num_experts = 1 if kind == "dense" else None
    if kind in ("moe", "router-tuning"):
        num_experts = None if spec in ("flexolmo-7x7b",) or spec.endswith("nb.json") else 3
    if kind == "coupled" and spec in ("flexolmo-7x7b",) or kind == "coupled" and spec.endswith("nb.json"):
        pytest.skip("--kind coupled takes a dense or 2-expert model")
    try:
        cfg, kind = build_config(spec, kind, num_experts=num_experts)
    except Exception as exc:
        pytest.skip(f"not a valid combination: {exc}")
    assert param_counts(cfg, kind) == param_counts_meta(cfg, kind)


# ---------------------------------------------------------------------------- issue 25 item 4
def test_7x7b_on_8_h100s_prints_the_smallest_change_that_fits(capsys):
    """7x7B does not fit 8 x 80 GB at ZeRO 0: plan names the smallest change that fits, with per-rank
    figures, and no change of fewer knobs fits."""
    from itertools import product

    argv = ["--model-config", "flexolmo-7x7b", "--gpus", "8", "--zero-stage", "0", "--micro-batch-size", "2",
            "--seq-len", "4096"]
    code, out, _ = _cli(capsys, *argv)
    assert code == 0 and "DOES NOT FIT" in out and "the smallest changes that fit" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("1. "))
    assert "--zero-stage 0 -> 3" in line and "--activation-checkpointing on" in line and "--nodes 1 -> 2" in line
    assert "on each of 16 ranks" in line and "params" in line and "optimizer" in line
    p = json.loads(_cli(capsys, *argv, "--json")[1])
    best = p["suggestions"][0]
    assert best["fits"] and best["bytes_per_rank"]["total"] <= best["gpu_memory_bytes"] and best["world"] == 16
    # minimal: nothing with fewer changed knobs fits (ZeRO, checkpointing, micro-batch, GPUs)
    for z, ck, mb, nodes in product(range(4), (False, True), (1, 2), (1, 2, 4, 8, 16, 32, 64, 128)):
        n = (z != 0) + ck + (mb != 2) + (nodes != 1)
        if n < len(best["changes"]):
            assert not plan_memory("flexolmo-7x7b", gpus=8, nodes=nodes, zero_stage=z, checkpointing=ck,
                                   micro_batch=mb, seq_len=4096)["fits"], (z, ck, mb, nodes)
    # a coupled owner of the 7B public model fits its 8 GPUs without more of them
    p = json.loads(_cli(capsys, "--model-config", "olmo2-7b", "--kind", "coupled", "--gpus", "8", "--zero-stage",
                        "0", "--micro-batch-size", "8", "--seq-len", "4096", "--json")[1])
    assert not p["fits"] and p["suggestions"][0]["world"] == 8


def test_checkpoint_merge_and_inference_memory(capsys):
    from flexmoe_training.memory import inference_bytes, merge_host_bytes

    p = json.loads(_cli(capsys, "--model-config", "flexolmo-7x7b", "--gpus", "8", "--zero-stage", "3",
                        "--infer-batch", "4", "--context", "2048", "--json")[1])
    assert p["checkpoints"]["model"] == 2 * p["params"]["total"]
    pub, _ = _states("olmo2-7b", "dense")
    own, _ = _states("olmo2-7b", "coupled")
    assert p["checkpoints"]["public"] == 2 * pub.total and p["checkpoints"]["owner"] == 2 * own.total
    m = p["merge_host"]
    assert m["owners"] == 6 and m["total"] == 2 * pub.total + 6 * 2 * own.total + m["merged_moe"]
    inf = p["inference"]
    assert inf["kv_per_token"] == 2 * 32 * 32 * 128 * 2  # K and V, 32 layers, 32 kv heads x 128, bf16
    assert inf["kv_cache"] == inf["kv_per_token"] * 4 * 2048 and inf["weights"] == 2 * p["params"]["total"]
    cfg, _ = build_config("flexolmo-7x7b", None)
    assert inference_bytes(cfg, 4, 2048) == inf and merge_host_bytes(cfg) == m
    out = _cli(capsys, "--model-config", "flexolmo-7x7b", "--gpus", "8", "--zero-stage", "3")[1]
    assert "merge host memory" in out and "inference" in out and "checkpoints on disk" in out


def test_step_time_tokens_per_s_and_gpu_hours(capsys, tmp_path):
    from flexmoe_training.flops import flops_per_token

    argv = ["--model-config", "olmo2-7b", "--kind", "coupled", "--gpus", "8", "--zero-stage", "3",
            "--activation-checkpointing", "--micro-batch-size", "2", "--seq-len", "4096", "--grad-accum", "4"]
    p = json.loads(_cli(capsys, *argv, "--mfu", "0.5", "--json")[1])
    t = p["throughput"]
    cfg, _ = build_config("olmo2-7b", "coupled")
    fpt = flops_per_token(cfg, 4096, 3.0 * cfg.hidden_size * cfg.intermediate_size * cfg.num_hidden_layers)
    assert t["flops_per_token"] == pytest.approx(fpt) and t["tflops_per_gpu"] == pytest.approx(0.5 * 989)
    assert t["tokens_per_step"] == 2 * 4096 * 8 * 4
    assert t["step_s"] == pytest.approx(t["tokens_per_step"] * fpt / (8 * 0.5 * 989e12))
    assert t["recipe_tokens"] == 50e9  # the paper's tokens per owner (recipe_flexolmo_7b.json)
    assert t["gpu_hours"] == pytest.approx(50e9 * fpt / (0.5 * 989e12) / 3600)
    # measured TFLOP/s from a run's metrics.jsonl: the median
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps({"step": i, "tflops_per_gpu": v}) for i, v in enumerate([300, 310, 500])))
    t = json.loads(_cli(capsys, *argv, "--measured-tflops", f, "--json")[1])["throughput"]
    assert t["tflops_per_gpu"] == 310 and "measured" in t["source"]
    out = _cli(capsys, *argv, "--measured-tflops", f)[1]
    assert "GPU-hours" in out and "tokens/s" in out
    (tmp_path / "bad.json").write_text('{"loss": 1}')
    code, _, err = _cli(capsys, *argv, "--measured-tflops", tmp_path / "bad.json")
    assert code == 2 and "--measured-tflops" in err and "tflops_per_gpu" in err
    code, _, err = _cli(capsys, *argv, "--mfu", "1.5")
    assert code == 2 and "--mfu" in err


def test_fused_cross_entropy_drops_the_logits_from_the_head(capsys):
    from flexmoe_training.memory import CE_CHUNK

    kw = dict(gpus=8, zero_stage=3, micro_batch=2, seq_len=4096, checkpointing=True)
    plain = plan_memory("olmo2-7b", **kw)
    fused = plan_memory("olmo2-7b", fused_cross_entropy=True, **kw)
    T, D, V = 8192, 4096, 100352
    assert plain["activations"]["head"] == T * (2 * D + 10 * V)
    assert fused["activations"]["head"] == T * 4 * D + 4 * CE_CHUNK * V + 4 * V * D  # dense: the head trains
    coupled = plan_memory("olmo2-7b", kind="coupled", fused_cross_entropy=True, **kw)
    assert coupled["activations"]["head"] == T * 4 * D + 4 * CE_CHUNK * V  # frozen head: no weight gradient
    assert fused["bytes_per_rank"]["total"] < plain["bytes_per_rank"]["total"] - 5 * 2 ** 30
    out = _cli(capsys, "--model-config", "olmo2-7b", "--gpus", "8", "--zero-stage", "3", "--fused-cross-entropy")[1]
    assert "(fused cross-entropy)" in out
