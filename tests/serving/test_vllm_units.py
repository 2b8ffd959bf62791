"""Unit tests of the worker-side pieces: the logits processor's row bookkeeping (added, removed,
moved and swapped rows, as vLLM's persistent batch reports them) and the token-to-row mask."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="serving tests need vLLM (the serve venv: see README, 'Serving')")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from flexmoe_kernels.integrations.vllm import runtime  # noqa: E402
from flexmoe_kernels.integrations.vllm.allowed import encode_canonical  # noqa: E402


class _Cfg:
    class model_config:
        class hf_config:
            model_type = "flex_olmo"
            num_experts = 4

    class scheduler_config:
        max_num_seqs = 4


def _sp(idx):
    return SamplingParams(extra_args=None if idx is None else {"allowed_experts": encode_canonical(idx)})


def _upd(n, added=(), removed=(), moved=()):
    return BatchUpdate(batch_size=n, added=[(i, _sp(s), [], []) for i, s in added], removed=list(removed),
                       moved=list(moved))


def _rows(st):
    return [tuple(int(e) for e in torch.nonzero(st.rows_cpu[r]).flatten()) for r in range(st.max_rows + 1)]


@pytest.fixture
def proc(monkeypatch):
    monkeypatch.setattr(runtime, "_STATE", None)
    return runtime.AllowedExpertsLogitsProcessor(_Cfg, torch.device("cpu"), False)


def test_rows_follow_adds_moves_swaps_and_removals(proc):
    st = proc.state
    ALL = (0, 1, 2, 3)
    proc.update_state(_upd(3, added=[(0, (0, 2)), (1, None), (2, (1, 3))]))
    assert _rows(st) == [(0, 2), ALL, (1, 3), ALL, ALL]
    proc.update_state(_upd(3, moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert _rows(st) == [(1, 3), ALL, (0, 2), ALL, ALL]
    proc.update_state(_upd(2, removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert _rows(st) == [(0, 2), ALL, ALL, ALL, ALL]
    proc.update_state(_upd(2, removed=[0], added=[(0, (1, 2, 3))]))  # a new request reuses row 0
    assert _rows(st) == [(1, 2, 3), ALL, ALL, ALL, ALL]
    proc.update_state(_upd(1, removed=[0]))
    assert not st.sets and all(r == ALL for r in _rows(st))


def test_a_value_that_skipped_the_front_end_fails_closed(proc):
    bad = SamplingParams(extra_args={"allowed_experts": ["public", "code"]})  # not canonical
    proc.update_state(BatchUpdate(batch_size=1, added=[(0, bad, [], [])], removed=[], moved=[]))
    assert not proc.state.rows_cpu[0].any()  # no expert rather than every expert; nothing raised


def test_token_mask_maps_tokens_to_rows(proc, monkeypatch):
    st = proc.state
    proc.update_state(_upd(2, added=[(0, (0, 2)), (1, (1, 3))]))
    monkeypatch.setattr(runtime, "_query_start_loc", lambda: torch.tensor([0, 3, 4], dtype=torch.int32))
    m = st.token_mask(6, torch.device("cpu"))  # 3 tokens of row 0, 1 of row 1, 2 padding tokens
    want = torch.tensor([[1, 0, 1, 0]] * 3 + [[0, 1, 0, 1]] + [[1, 1, 1, 1]] * 2, dtype=torch.bool)
    assert torch.equal(m, want)
    proc.update_state(_upd(2, removed=[0, 1]))
    assert st.token_mask(6, torch.device("cpu")) is None  # nobody restricted: no mask at all
