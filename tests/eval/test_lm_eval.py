"""``flexmoe eval`` and the lm-eval model type ``"flexmoe"`` on tiny random models and two local
tasks (multiple choice and generation over jsonl), offline.

Runs in the eval environment (``lm-eval[hf]``, see .ci/run); skipped where lm_eval is not
importable (the main test environment).

Exactness: each configuration's per-sample log-likelihoods equal, within ``LOGLIK_ATOL``, those
of lm-eval's stock ``hf`` model on the checkpoint rebuilt without the opted-out experts (and
greedy generations are identical); NaN-poisoned opted-out experts leave every score finite and
bit-identical.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import importlib.util

import pytest

_WHY = ("lm-eval is not installed here: these tests run in the eval venv (.ci/eval_tests.sh; "
        "pip install 'lm-eval[hf]==0.4.*' matplotlib)")
if importlib.util.find_spec("lm_eval") is None:  # before touching the environment of other tests
    pytest.skip(_WHY, allow_module_level=True)

# Before lm_eval / datasets / huggingface_hub are imported (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.importorskip("lm_eval", reason=_WHY)
pytest.importorskip("matplotlib", reason="flexmoe eval's heatmap needs matplotlib")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import eval_helpers as H  # noqa: E402

from flexmoe_training.cli import main as flexmoe_main  # noqa: E402

#: |ours - removed| per-sample log-likelihood bound (fp32; sums over a few tokens).
LOGLIK_ATOL = 1e-4
TASKS = "toy_mc,toy_gen"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny FlexOlmo (public, news, code, medical; top-2), the two tasks, and one
    ``flexmoe eval --opt-out-sweep --log-samples`` run of it."""
    root = tmp_path_factory.mktemp("flexmoe_eval")
    model = str(root / "model")
    H.make_flexolmo(model)
    tasks = H.write_tasks(str(root / "tasks"))
    out = str(root / "sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = flexmoe_main(["eval", "--model", model, "--tasks", TASKS, "--include-path", tasks, "--opt-out-sweep",
                           "--batch-size", "4", "--device", "cpu", "--log-samples", "--no-progress", "--out", out])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return {"root": root, "model": model, "tasks": tasks, "out": out}


def _samples(path: str) -> dict:
    with open(path) as fh:
        return {row["doc_id"]: row for row in map(json.loads, fh)}


def _by_request(samples: dict) -> dict:
    """doc_id -> list of per-request log-likelihoods (MC) or the generated string (generation)."""
    out = {}
    for doc_id, row in samples.items():
        resps = row["resps"]
        if isinstance(resps[0][0], str):
            out[doc_id] = resps[0][0]
        else:
            out[doc_id] = [float(r[0][0]) for r in resps]
    return out


# ----------------------------------------------------------------------------- the sweep's report
def test_sweep_report(ws):
    out = ws["out"]
    assert sorted(os.listdir(out)) == ["heatmap.png", "results.csv", "results.json", "samples", "table.md"]
    res = json.load(open(os.path.join(out, "results.json")))
    confs = res["configurations"]
    assert [c["name"] for c in confs] == ["all", "no-news", "no-code", "no-medical", "public-only"]
    assert [c["top_k"] for c in confs] == [2, 2, 2, 2, 1]
    assert [c["top_k_lowered_from"] for c in confs] == [None, None, None, None, 2]
    assert confs[1]["allowed_experts"] == ["public", "code", "medical"] and confs[1]["opted_out"] == ["news"]
    assert confs[4]["allowed_experts"] == ["public"]
    for c in confs:  # lm-eval's own results dict per task, unchanged
        assert set(c["results"]) == {"toy_mc", "toy_gen"}
        assert {"acc,none", "acc_stderr,none", "acc_norm,none"} <= set(c["results"]["toy_mc"])
        assert "exact_match,none" in c["results"]["toy_gen"]
        assert c["n-samples"]["toy_mc"]["effective"] == len(H.MC_DOCS)
    # provenance: lm-eval's version and seeds, the weights' hash, offline flags
    import lm_eval

    assert res["lm_eval"]["lm_eval_version"] == lm_eval.__version__
    assert {res["lm_eval"][k] for k in ("numpy_seed", "torch_seed", "fewshot_seed")} == {1234}
    assert res["lm_eval"]["random_seed"] == 0
    assert len(res["model"]["tensors_sha256"]) == 64 and res["model"]["model_type"] == "flex_olmo"
    assert res["model"]["expert_names"] == H.NAMES
    assert res["environment"]["HF_HUB_OFFLINE"] == "1" and res["environment"]["HF_DATASETS_OFFLINE"] == "1"
    # the table: tasks x configurations, with the change from all experts
    table = open(os.path.join(out, "table.md")).read()
    assert "| task | metric | all (k=2) | no-news (k=2) | no-code (k=2) | no-medical (k=2) | public-only (k=1) |" in table
    assert "| toy_mc | acc |" in table and "| toy_gen | exact_match |" in table
    assert "1 (lowered from 2)" in table
    rows = open(os.path.join(out, "results.csv")).read().splitlines()
    assert rows[0].startswith("configuration,allowed_experts,opted_out,top_k,task,metric,filter,value,stderr")
    assert len(rows) == 1 + 5 * 3  # 5 configurations x (acc, acc_norm, exact_match)
    png = open(os.path.join(out, "heatmap.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # no temporary sibling left behind
    assert not [n for n in os.listdir(ws["root"]) if n.startswith(".sweep")]


def test_opt_out_changes_scores(ws):
    """The opt-outs act: some configuration's log-likelihoods differ from all experts'."""
    base = _by_request(_samples(os.path.join(ws["out"], "samples", "all", "toy_mc.jsonl")))
    other = _by_request(_samples(os.path.join(ws["out"], "samples", "public-only", "toy_mc.jsonl")))
    assert max(abs(a - b) for d in base for a, b in zip(base[d], other[d])) > 1e-3


# ----------------------------------------------------------------------------- exactness
def test_equals_model_without_opted_out_experts(ws):
    """Each configuration = lm-eval's stock hf model on the checkpoint rebuilt without its
    opted-out experts (written here), per sample."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = json.load(open(os.path.join(ws["out"], "results.json")))
    tm = TaskManager(include_path=ws["tasks"], include_defaults=False)
    worst = 0.0
    for conf in res["configurations"]:
        ref_dir = str(ws["root"] / f"removed-{conf['name']}")
        if conf["opted_out"]:
            H.make_removed(ws["model"], ref_dir, conf["allowed_experts"], conf["top_k"])
        else:
            ref_dir = ws["model"]
        ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={ref_dir},device=cpu,dtype=float32",
                                      tasks=TASKS.split(","), task_manager=tm, batch_size=4, log_samples=True)
        for task in TASKS.split(","):
            ours = _by_request(_samples(os.path.join(ws["out"], "samples", conf["name"], f"{task}.jsonl")))
            theirs = _by_request({s["doc_id"]: s for s in ref["samples"][task]})
            assert ours.keys() == theirs.keys()
            for d in ours:
                if isinstance(ours[d], str):
                    assert ours[d] == theirs[d], (conf["name"], task, d)
                else:
                    assert len(ours[d]) == len(theirs[d])
                    for a, b in zip(ours[d], theirs[d]):
                        assert math.isfinite(a)
                        worst = max(worst, abs(a - b))
                        assert abs(a - b) <= LOGLIK_ATOL, (conf["name"], task, d, a, b)
            for key, v in conf["results"][task].items():  # and so the same metrics
                if key.endswith(",none") and "_stderr" not in key:
                    assert v == pytest.approx(ref["results"][task][key], abs=1e-12), (conf["name"], key)
    print(f"worst |log-likelihood difference| vs the removed models: {worst:.2e}")


def test_nan_poisoned_opted_out_experts(ws):
    """NaN in an opted-out expert's weights: every score stays finite and bit-identical."""
    from flexmoe_kernels.integrations.lm_eval import FlexMoELM
    from flexmoe_training import lm_eval_sweep as sweep

    lm = FlexMoELM(pretrained=ws["model"], device="cpu", batch_size=4, dtype="float32")
    news = H.NAMES.index("news")
    with torch.no_grad():
        for m in lm._model.modules():
            if hasattr(m, "experts") and hasattr(m, "gate"):
                m.experts.gate_up_proj[news].fill_(float("nan"))
                m.experts.down_proj[news].fill_(float("nan"))
    configs = [c for c in sweep.sweep_configurations(H.NAMES, 2) if c["name"] in ("all", "no-news", "public-only")]
    tm = sweep.task_manager_for(["toy_mc"], ws["tasks"])
    records, _ = sweep.run_configurations(lm, configs, ["toy_mc"], tm, progress=False, keep_samples=True,
                                          log=lambda s: None)
    poisoned = {r["name"]: _by_request({s["doc_id"]: s for s in r["samples"]["toy_mc"]}) for r in records}
    # the poison is live: with news allowed, the scores are NaN
    assert any(not math.isfinite(v) for lls in poisoned["all"].values() for v in lls)
    for name in ("no-news", "public-only"):
        clean = _by_request(_samples(os.path.join(ws["out"], "samples", name, "toy_mc.jsonl")))
        assert poisoned[name].keys() == clean.keys()
        for d in clean:
            assert all(math.isfinite(v) for v in poisoned[name][d])
            assert poisoned[name][d] == clean[d], (name, d)


def test_expert_bias_checkpoint_runs_our_model(ws, tmp_path):
    """A checkpoint with FlexOlmo's router expert bias (transformers' flex_olmo has none) runs on
    our model (engine ours): each configuration equals our model rebuilt without the opted-out
    experts, evaluated with every expert allowed; and the bias acts."""
    from flexmoe_kernels.integrations.lm_eval import FlexMoELM
    from flexmoe_training import lm_eval_sweep as sweep

    src = str(tmp_path / "biased")
    H.make_flexolmo(src, seed=1, expert_bias=True)
    lm = FlexMoELM(pretrained=src, device="cpu", batch_size=4)
    assert lm.engine == "ours" and lm.checkpoint_info["expert_bias"]
    tm = sweep.task_manager_for(["toy_mc", "toy_gen"], ws["tasks"])
    configs = [c for c in sweep.sweep_configurations(H.NAMES, 2) if c["name"] in ("no-code", "public-only")]
    records, _ = sweep.run_configurations(lm, configs, ["toy_mc", "toy_gen"], tm, progress=False,
                                          keep_samples=True, log=lambda s: None)
    for rec in records:
        ref_dir = str(tmp_path / f"removed-{rec['name']}")
        H.make_removed(src, ref_dir, rec["allowed_experts"], rec["top_k"])
        ref_lm = FlexMoELM(pretrained=ref_dir, device="cpu", batch_size=4)
        assert ref_lm.expert_names == rec["allowed_experts"] and ref_lm.checkpoint_top_k == rec["top_k"]
        every = {"name": "all", "allowed_experts": rec["allowed_experts"], "opted_out": [], "top_k": rec["top_k"]}
        (ref,), _ = sweep.run_configurations(ref_lm, [every], ["toy_mc", "toy_gen"], tm, progress=False,
                                             keep_samples=True, log=lambda s: None)
        for task in ("toy_mc", "toy_gen"):
            ours = _by_request({s["doc_id"]: s for s in rec["samples"][task]})
            theirs = _by_request({s["doc_id"]: s for s in ref["samples"][task]})
            for d in ours:
                if isinstance(ours[d], str):
                    assert ours[d] == theirs[d], (rec["name"], task, d)
                else:
                    assert all(abs(a - b) <= LOGLIK_ATOL for a, b in zip(ours[d], theirs[d])), (rec["name"], d)
    # the bias is read: zeroing it changes the scores
    before = _by_request({s["doc_id"]: s for s in records[0]["samples"]["toy_mc"]})
    with torch.no_grad():
        for layer in lm._ours.inner.moe_layers():
            layer.gate.expert_bias.zero_()
    (after,), _ = sweep.run_configurations(lm, configs[:1], ["toy_mc"], tm, progress=False, keep_samples=True,
                                           log=lambda s: None)
    after = _by_request({s["doc_id"]: s for s in after["samples"]["toy_mc"]})
    assert max(abs(a - b) for d in before for a, b in zip(before[d], after[d])) > 1e-4


# ----------------------------------------------------------------------------- lm-eval's own entry points
def test_model_args_through_simple_evaluate(ws):
    """``--model flexmoe`` with ``model_args`` lists joined by ``|`` (lm-eval splits on commas)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import flexmoe_kernels.integrations.lm_eval as fle  # registers "flexmoe"

    tm = TaskManager(include_path=ws["tasks"], include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=fle.MODEL_NAME,
        model_args=f"pretrained={ws['model']},allowed_experts=public|code|medical,top_k=2,device=cpu,dtype=float32",
        tasks=["toy_mc"], task_manager=tm, batch_size=4, log_samples=True)
    assert out["config"]["flexmoe_allowed_experts"] == ["public", "code", "medical"]
    ours = _by_request({s["doc_id"]: s for s in out["samples"]["toy_mc"]})
    sweep_ll = _by_request(_samples(os.path.join(ws["out"], "samples", "no-news", "toy_mc.jsonl")))
    assert ours == sweep_ll  # the same configuration as the sweep's no-news, bit for bit
    # indices work too, and a too-small set says what to do before any weight is read
    with pytest.raises(ValueError, match=r"allowed_experts: public allows 1 expert,.*pass top_k=1 .*top-k is 2"):
        fle.FlexMoELM(pretrained=ws["model"], allowed_experts="0")
    with pytest.raises(ValueError, match=r"allowed_experts: public\|code allows 2 experts.*lower top_k"):
        fle.FlexMoELM(pretrained=ws["model"], allowed_experts="0|2", top_k=3)
    with pytest.raises(ValueError, match=r"unknown expert 'sports'; the model's experts are: public, news, code"):
        fle.FlexMoELM(pretrained=ws["model"], allowed_experts="public|sports")


def test_module_command_line(ws, tmp_path):
    """``python -m flexmoe_kernels.integrations.lm_eval``: lm-eval's command line with the model registered."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "flexmoe_kernels.integrations.lm_eval", "--model", "flexmoe", "--model_args",
           f"pretrained={ws['model']},allowed_experts=public|news", "--device", "cpu", "--tasks", "toy_mc",
           "--include_path", ws["tasks"], "--limit", "2", "--output_path", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "toy_mc" in r.stdout and "flexmoe" in r.stdout


def test_hub_id_from_the_local_cache(ws, tmp_path):
    """A Hub id (owner/name) resolved offline from the Hugging Face cache; the snapshot's commit
    is recorded beside the weights' hash."""
    import shutil

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-flexolmo"
    shutil.copytree(ws["model"], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "flexmoe_training.cli", "eval", "--model", "someone/tiny-flexolmo",
                        "--tasks", "toy_mc", "--include-path", ws["tasks"], "--allowed-experts", "public,news",
                        "--limit", "2", "--device", "cpu", "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["model"]["pretrained"] == "someone/tiny-flexolmo" and res["model"]["commit"] == sha
    ref = json.load(open(os.path.join(ws["out"], "results.json")))
    assert res["model"]["tensors_sha256"] == ref["model"]["tensors_sha256"]


def test_other_family_explicit_sets(ws, tmp_path):
    """Any family the transformers integration patches (OLMoE here; names given on the command
    line), --allowed-experts repeated, --top-k."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_experts=4, num_experts_per_tok=2,
                                   max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    d = str(tmp_path / "olmoe")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    H.save_tokenizer(d)
    out = str(tmp_path / "out")
    rc = flexmoe_main(["eval", "--model", d, "--tasks", "toy_mc", "--include-path", ws["tasks"], "--expert-names",
                       "a,b,c,d", "--allowed-experts", "a,c", "--allowed-experts", "0|1|3", "--top-k", "2",
                       "--limit", "3", "--device", "cpu", "--no-progress", "--out", out])
    assert rc == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert [(c["name"], c["top_k"]) for c in res["configurations"]] == [("all", 2), ("a+c", 2), ("a+b+d", 2)]
    assert res["model"]["model_type"] == "olmoe"
    assert res["configurations"][1]["results"]["toy_mc"]["sample_len"] == 3


# ----------------------------------------------------------------------------- bad input
def _fails(capsys, argv, *patterns):
    rc = flexmoe_main(["eval", *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("flexmoe: error:")]
    assert rc == 2 and len(lines) == 1, err[-2000:]
    for p in patterns:
        assert p in lines[0], lines[0]
    return lines[0]


def test_bad_input_one_line_before_evaluation(ws, tmp_path, capsys):
    base = ["--model", ws["model"], "--tasks", "toy_mc", "--include-path", ws["tasks"], "--no-progress"]
    out = str(tmp_path / "o")
    # unknown expert: the valid names listed
    _fails(capsys, [*base, "--allowed-experts", "public,sports", "--out", out], "--allowed-experts",
           "unknown expert 'sports'", "public, news, code, medical")
    # a set smaller than the top-k: what to do
    _fails(capsys, [*base, "--allowed-experts", "public", "--out", out], "--allowed-experts", "fewer than top-k 2",
           "pass --top-k 1", "--opt-out-sweep")
    # unknown task, with the close names
    _fails(capsys, ["--model", ws["model"], "--tasks", "toy_mcq", "--include-path", ws["tasks"], "--opt-out-sweep",
                    "--out", out], "--tasks", "unknown task 'toy_mcq'", "toy_mc")
    # a task directory that does not parse
    bad = tmp_path / "bad_tasks"
    bad.mkdir()
    (bad / "ok.yaml").write_text(open(os.path.join(ws["tasks"], "toy_mc.yaml")).read())
    (bad / "broken.yaml").write_text("task: broken\ndataset_path: [json\n  doc_to_text: : :\n")
    _fails(capsys, ["--model", ws["model"], "--tasks", "toy_mc", "--include-path", str(bad), "--opt-out-sweep",
                    "--out", out], "--include-path", "broken.yaml does not parse")
    # not an MoE we can opt out of
    dense = str(tmp_path / "dense")
    H.make_dense(dense)
    _fails(capsys, ["--model", dense, "--tasks", "toy_mc", "--include-path", ws["tasks"], "--opt-out-sweep",
                    "--out", out], "--model", "'olmo2' model, not an MoE", "flex_olmo")
    # a model path that does not exist
    _fails(capsys, ["--model", str(tmp_path / "nope"), "--tasks", "toy_mc", "--opt-out-sweep", "--out", out],
           "--model", "nope")
    # the output under a regular file, and an existing output without --overwrite
    (tmp_path / "afile").write_text("x")
    _fails(capsys, [*base, "--opt-out-sweep", "--out", str(tmp_path / "afile" / "o")], "--out", "a file is in the way")
    _fails(capsys, [*base, "--opt-out-sweep", "--out", ws["out"]], "--out", "already exists")
    _fails(capsys, [*base, "--opt-out-sweep", "--out", os.path.join(ws["model"], "eval")], "--out", "--model")
    assert not os.path.exists(out)  # nothing was evaluated or written
