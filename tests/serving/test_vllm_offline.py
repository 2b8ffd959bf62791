"""Exact per-request opt-out with vLLM's offline ``LLM`` API (eager; each engine in its own
process), compared token for token with the same model whose opted-out experts were physically
removed (a checkpoint built without them, served by vLLM; and our PyTorch model).

Tolerance: log-probabilities of the generated tokens within ``LOGPROB_TOL`` (fp32 models; the
measured difference is printed, typically ~1e-6)."""
from __future__ import annotations

import gc
import os

import pytest

pytest.importorskip("vllm", reason="serving tests need vLLM (the serve venv: see README, 'Serving')")

# each LLM runs its engine in its own process (vLLM's default), so that several engines can be
# started one after the other in this process
os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)

from serve_helpers import make_model, make_removed, reference_greedy  # noqa: E402

LOGPROB_TOL = 1e-4
MAX_TOKENS = 12
PROMPTS = ["Hello world, this is", "def f(x): return x +", "The quick brown fox", "Opt out of news:"]
# (request's allowed_experts, the indices it means); None = every expert
SETS = [(None, None), (["public", "code"], (0, 2)), ([1, 3], (1, 3)), ("news, code,medical", (1, 2, 3))]
LONG = ("FlexOlmo lets each data owner opt in or out of every request. " * 5)[:300]  # > 2 KV blocks


def _engine(path, **kw):
    from vllm import LLM

    args = dict(dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=8, seed=0,
                kv_cache_memory_bytes=32 << 20, enable_prefix_caching=True)
    args.update(kw)
    return LLM(path, **args)


def _sp(allowed, n=MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0,
                          extra_args=None if allowed is None else {"allowed_experts": allowed})


def _result(out):
    c = out.outputs[0]
    return list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]


def _close(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flexolmo")
    make_model(str(root / "full"))
    return root


@pytest.fixture(scope="module")
def full_llm(root):
    llm = _engine(str(root / "full"))
    yield llm
    _close(llm)


@pytest.fixture(scope="module")
def runs(root, full_llm):
    full = str(root / "full")
    res = {}
    llm = full_llm
    # one generate call: every request in the same batch, each with its own allowed set, and
    # each prompt once more with every expert
    outs = llm.generate(PROMPTS + PROMPTS, [_sp(a) for a, _ in SETS] + [_sp(None)] * len(PROMPTS), use_tqdm=False)
    res["batch"] = [_result(o) for o in outs[: len(PROMPTS)]]
    res["unrestricted"] = [_result(o) for o in outs[len(PROMPTS):]]
    # rows that move: two short unrestricted requests in rows 0-1 finish first, and vLLM moves the
    # restricted requests of rows 3-4 into their places mid-generation
    moved = [(PROMPTS[0], None, 2), (PROMPTS[1], None, 3), (PROMPTS[1], [1, 3], MAX_TOKENS),
             (PROMPTS[2], "news,code,medical", MAX_TOKENS), (PROMPTS[0], ["public", "code"], MAX_TOKENS)]
    outs = llm.generate([p for p, _, _ in moved], [_sp(a, n) for _, a, n in moved], use_tqdm=False)
    res["moved"] = [_result(o) for o in outs[2:]]
    # prefix cache: the long prompt with every expert, then with {0, 2} twice
    o_all = llm.generate([LONG], [_sp(None)], use_tqdm=False)[0]
    o_s1 = llm.generate([LONG], [_sp(["public", "code"])], use_tqdm=False)[0]
    o_s2 = llm.generate([LONG], [_sp([0, 2])], use_tqdm=False)[0]
    res["prefix"] = {"all": (_result(o_all), o_all.num_cached_tokens), "s1": (_result(o_s1), o_s1.num_cached_tokens),
                     "s2": (_result(o_s2), o_s2.num_cached_tokens)}
    # the removed-expert models: {0, 2} served by vLLM from a checkpoint built without experts 1
    # and 3; the other sets by our PyTorch model with the experts removed (one vLLM engine less
    # per set; the server tests use the PyTorch reference throughout)
    res["removed"] = {}
    path = str(root / "rm02")
    make_removed(full, path, (0, 2))
    llm = _engine(path)
    outs = llm.generate(PROMPTS + [LONG], [_sp(None)] * (len(PROMPTS) + 1), use_tqdm=False)
    res["removed"][(0, 2)] = [_result(o) for o in outs]
    _close(llm)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(full)
    for idx in ((1, 3), (1, 2, 3)):
        res["removed"][idx] = [reference_greedy(full, tok(p)["input_ids"], MAX_TOKENS, idx) for p in PROMPTS]
    return res


def test_batch_with_mixed_sets_equals_removal(runs):
    worst = 0.0
    for i, (allowed, idx) in enumerate(SETS):
        toks, lps = runs["batch"][i]
        if idx is None:
            continue
        ref_toks, ref_lps = runs["removed"][idx][i]
        assert toks == ref_toks, f"allowed={allowed!r}: {toks} != removed-model {ref_toks}"
        worst = max(worst, max(abs(a - b) for a, b in zip(lps, ref_lps)))
    print(f"max |logprob - removed-model logprob| = {worst:.3g}")
    assert worst <= LOGPROB_TOL


def test_rows_moved_mid_generation_keep_their_sets(runs):
    for (toks, lps), (idx, i) in zip(runs["moved"], [((1, 3), 1), ((1, 2, 3), 2), ((0, 2), 0)]):
        ref_toks, ref_lps = runs["removed"][idx][i]
        assert toks == ref_toks, idx
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) <= LOGPROB_TOL


def test_sets_change_the_output(runs):
    """Otherwise the equality above would prove nothing: each restricted request's tokens differ
    from the same prompt's with every expert (same batch), and the unrestricted one equals it."""
    for i, (allowed, idx) in enumerate(SETS):
        if idx is None:  # same tokens; log-probs equal up to the batch position's rounding
            assert runs["batch"][i][0] == runs["unrestricted"][i][0]
            assert max(abs(a - b) for a, b in zip(runs["batch"][i][1], runs["unrestricted"][i][1])) <= LOGPROB_TOL
        else:
            assert runs["batch"][i][0] != runs["unrestricted"][i][0], f"allowed={allowed!r} changed nothing"


def test_prefix_cache_is_exact_per_set(runs):
    p = runs["prefix"]
    (toks1, lps1), cached1 = p["s1"]
    (toks2, lps2), cached2 = p["s2"]
    ref_toks, ref_lps = runs["removed"][(0, 2)][len(PROMPTS)]
    # the restricted request did not reuse the all-experts request's KV blocks ...
    assert cached1 == 0, f"a {{0, 2}} request reused {cached1} tokens cached under every expert"
    assert toks1 == ref_toks and max(abs(a - b) for a, b in zip(lps1, ref_lps)) <= LOGPROB_TOL
    # ... but the same set given as indices shares them, and stays exact
    assert cached2 > 0, "a second request with the same allowed set did not hit the prefix cache"
    assert toks2 == ref_toks and max(abs(a - b) for a, b in zip(lps2, ref_lps)) <= LOGPROB_TOL
    assert p["all"][0][0] != toks1


@pytest.mark.parametrize("bad, why", [
    (["public", "nope"], "unknown expert name 'nope'"),
    ([0, 7], "index 7 is out of range"),
    (["public", 0], "given twice"),
    (["code"], "allows 1 expert(s) but the model routes each token to top-k=2"),
    (3.5, "must be a list"),
    ([True, 1], "neither an expert name nor an index"),
])
def test_bad_sets_are_refused_before_the_engine(full_llm, bad, why):
    """Validation happens in the front end (InputProcessor), so the error names the field and
    value and the engine keeps running (the next good request succeeds)."""
    from vllm.exceptions import VLLMValidationError

    llm = full_llm
    with pytest.raises((VLLMValidationError, ValueError)) as ei:
        llm.generate(["Hello"], [_sp(bad, 2)], use_tqdm=False)
    assert "allowed_experts" in str(ei.value) and why in str(ei.value), str(ei.value)
    ok = llm.generate(["Hello"], [_sp(["public", "news"], 2)], use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 2

