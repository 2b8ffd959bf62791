"""GPU tier of the serving tests (marked ``gpu``: skipped without CUDA; never run yet, no GPU
has been available). vLLM on GPU defaults to Model Runner V2 and CUDA graphs:

* the plugin needs the V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``) and refuses V2 with a
  clear error instead of silently ignoring the allowed sets;
* under CUDA graphs the MoE op is captured; it reads the persistent row-mask buffer (written
  before each step) and maps tokens to rows on the device, so a replay must see the new batch's
  sets. Checked here against the removed-expert model in three modes: eager, vLLM's default
  (full + piecewise CUDA graphs) and piecewise with the MoE op as a graph split point (it then
  runs eagerly every step: the documented fallback).
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="serving tests need vLLM (the serve venv: see README, 'Serving')")

from serve_helpers import make_model, reference_greedy  # noqa: E402

pytestmark = pytest.mark.gpu
N = 10
LOGPROB_TOL = 1e-3  # fp32 on GPU (TF32 off in vLLM's fp32 path is not guaranteed)
PROMPTS = ["Hello world, this is", "def f(x): return x +", "The quick brown fox", "Opt out of news:"]
SETS = [(["public", "code"], (0, 2)), ([1, 3], (1, 3)), ("news,code,medical", (1, 2, 3)), (None, None)]
MODES = {
    "eager": dict(enforce_eager=True),
    "cudagraphs": dict(),
    "piecewise_split": dict(compilation_config={"cudagraph_mode": "PIECEWISE",
                                                "splitting_ops": ["vllm::unified_attention",
                                                                  "vllm::unified_attention_with_output",
                                                                  "vllm::flexmoe_moe"]}),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_mixed_sets_equal_removal(tmp_path, monkeypatch, mode):
    from transformers import PreTrainedTokenizerFast
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    path = str(tmp_path / "model")
    make_model(path)
    llm = LLM(path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0, gpu_memory_utilization=0.2,
              **MODES[mode])
    sps = [SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, logprobs=0,
                          extra_args=None if a is None else {"allowed_experts": a}) for a, _ in SETS]
    try:
        rounds = [(PROMPTS, llm.generate(PROMPTS, sps, use_tqdm=False)),
                  (PROMPTS[::-1], llm.generate(PROMPTS[::-1], sps, use_tqdm=False)),  # new sets per row
                  (PROMPTS[:2], llm.generate(PROMPTS[:2], sps[2:], use_tqdm=False))]  # another batch size
    finally:
        llm.llm_engine.engine_core.shutdown()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    for prompts, outs in rounds:
        sets = SETS if len(prompts) == len(SETS) else SETS[2:]
        for p, (_, idx), o in zip(prompts, sets, outs):
            ref_toks, ref_lps = reference_greedy(path, tok(p)["input_ids"], N, idx)
            c = o.outputs[0]
            assert list(c.token_ids) == ref_toks, (mode, p, idx)
            assert max(abs(lp[t].logprob - r) for t, lp, r in zip(c.token_ids, c.logprobs, ref_lps)) <= LOGPROB_TOL


def test_gpu_model_runner_v2_is_refused(tmp_path, monkeypatch):
    from vllm import LLM

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    path = str(tmp_path / "model")
    make_model(path)
    with pytest.raises(Exception, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        LLM(path, dtype="float32", max_model_len=512, gpu_memory_utilization=0.2, enforce_eager=True)
    os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
