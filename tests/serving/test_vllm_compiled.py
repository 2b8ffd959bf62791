"""Per-request opt-out in vLLM's default mode: torch.compile (the MoE layer is an opaque custom
op inside the compiled graph) and the multiprocess engine. Same batch of mixed allowed sets,
compared with our PyTorch model with the opted-out experts physically removed."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="serving tests need vLLM (the serve venv: see README, 'Serving')")

from serve_helpers import make_model, reference_greedy  # noqa: E402

LOGPROB_TOL = 1e-4
N = 10


@pytest.mark.slow
def test_compiled_batch_with_mixed_sets_equals_removal(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from vllm import LLM, SamplingParams

    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    path = str(tmp_path / "model")
    make_model(path)
    llm = LLM(path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0, kv_cache_memory_bytes=32 << 20)
    try:
        assert not llm.llm_engine.vllm_config.model_config.enforce_eager
        prompts = ["Hello world, this is", "def f(x): return x +", "The quick brown fox", "Opt out of news:"]
        sets = [(["public", "code"], (0, 2)), ([1, 3], (1, 3)), ("news,code,medical", (1, 2, 3)), (None, None)]
        sps = [SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, logprobs=0,
                              extra_args=None if a is None else {"allowed_experts": a}) for a, _ in sets]
        outs = llm.generate(prompts, sps, use_tqdm=False)
        # a second round: the compiled graph must read the new batch's masks, not the first's
        outs2 = llm.generate(prompts[::-1], sps, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    worst = 0.0
    for ps, os_ in ((prompts, outs), (prompts[::-1], outs2)):
        for p, (_, idx), o in zip(ps, sets, os_):
            c = o.outputs[0]
            ref_toks, ref_lps = reference_greedy(path, tok(p)["input_ids"], N, idx)
            assert list(c.token_ids) == ref_toks, (p, idx)
            worst = max(worst, max(abs(lp[t].logprob - r) for t, lp, r in zip(c.token_ids, c.logprobs, ref_lps)))
    print(f"compiled: max |logprob - removed-expert PyTorch model| = {worst:.3g}")
    assert worst <= LOGPROB_TOL
