"""Tests for the demo's measurements (issue 15 items 5-7): the top-2 prefix-weighted BTM ensemble,
the scored token range, routing tables, inference FLOPs per row, and the extraction audit's
positive control. Tiny synthetic log-probs and models; seconds in all."""
from __future__ import annotations

import math
import random

import pytest
import torch

from flexmoe_training.demo import audit, evaluate
from flexmoe_training.demo.inference import RoutingStats
from flexmoe_training.demo.measure import _Scores


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ============================================================================ BTM: top-2 on a fixed prefix
def test_prefix_ensemble_top2_by_hand():
    # member m predicts every token with probability q_m: on a 3-token prefix (2 predicted tokens) the
    # likelihoods are q_m^2 = 1/4, 1/16, 1/64 -> top-2 = members 0, 1 with weights 0.8, 0.2; every later
    # token then gets 0.8 * 1/2 + 0.2 * 1/4 = 0.45.
    q = torch.tensor([0.5, 0.25, 0.125])
    lp_MWS = torch.log(q)[:, None, None].expand(3, 2, 9).clone()
    mix, w = evaluate.prefix_ensemble_logprobs(lp_MWS, prefix_len=3, top=2)
    assert mix.shape == (2, 9 - 2)
    torch.testing.assert_close(mix, torch.full((2, 7), math.log(0.45)))
    torch.testing.assert_close(w, torch.tensor([[0.8, 0.8], [0.2, 0.2], [0.0, 0.0]]))
    # the order of the members does not matter; the weights stay fixed after the prefix even when a
    # member that was not chosen becomes the best one
    lp2 = lp_MWS[[2, 0, 1]].clone()
    lp2[0, :, 5:] = 0.0  # member 0 (q=1/8 on the prefix) is perfect later: not chosen, no effect
    mix2, w2 = evaluate.prefix_ensemble_logprobs(lp2, prefix_len=3, top=2)
    torch.testing.assert_close(mix2, mix)
    assert w2[0].abs().sum() == 0
    # prefix_len 1: no evidence -> the first two members, equal weights; top >= M: all members
    mix1, w1 = evaluate.prefix_ensemble_logprobs(lp_MWS, prefix_len=1, top=2)
    torch.testing.assert_close(mix1, torch.full((2, 9), math.log(0.375)))
    torch.testing.assert_close(w1[:, 0], torch.tensor([0.5, 0.5, 0.0]))
    _, w_all = evaluate.prefix_ensemble_logprobs(lp_MWS, prefix_len=3, top=5)
    torch.testing.assert_close(w_all[:, 0], torch.tensor([16.0, 4.0, 1.0]) / 21)


def test_prefix_ensemble_against_reference():
    M, W, S1, P = 4, 5, 11, 4
    lp = torch.log_softmax(torch.randn(M, W, S1, 6, dtype=torch.float64), -1)[..., 0]
    mix, w = evaluate.prefix_ensemble_logprobs(lp.float(), P, 2)
    for i in range(W):
        like = [math.exp(float(lp[m, i, :P - 1].sum())) for m in range(M)]
        top = sorted(range(M), key=lambda m: -like[m])[:2]
        z = sum(like[m] for m in top)
        for j in range(S1 - P + 1):
            ref = math.log(sum(like[m] / z * math.exp(float(lp[m, i, P - 1 + j])) for m in top))
            assert math.isclose(float(mix[i, j]), ref, rel_tol=1e-5, abs_tol=1e-5)
        assert math.isclose(float(w[:, i].sum()), 1.0, rel_tol=1e-6) and int((w[:, i] > 0).sum()) == 2
    with pytest.raises(ValueError, match="prefix_len"):
        evaluate.prefix_ensemble_logprobs(lp, S1 + 1)
    with pytest.raises(ValueError, match="top"):
        evaluate.prefix_ensemble_logprobs(lp, P, 0)
    with pytest.raises(ValueError, match="member_logprobs_MWS"):
        evaluate.prefix_ensemble_logprobs(lp[0], P)


def test_scored_range():
    lp = torch.arange(2 * 9, dtype=torch.float32).view(2, 9)  # windows of S = 10 tokens
    assert evaluate.scored(lp, 1).equal(lp)
    assert evaluate.scored(lp, 4).equal(lp[:, 3:])  # tokens 4..9: 6 predictions
    assert evaluate.summarise(evaluate.scored(lp, 4))["tokens"] == 12
    with pytest.raises(ValueError, match="prefix_len"):
        evaluate.scored(lp, 0)


# ============================================================================ routing table
def test_routing_stats_against_reference():
    names = ["public", "a", "b", "c"]
    L, E = 3, 4
    st = RoutingStats(names)
    batches = []
    for T in (7, 12):
        lg = [torch.randn(T, E) * 3 for _ in range(L)]
        for x in lg:
            x[:, 2] = float("-inf")  # expert b opted out
        batches.append(lg)
        st.add(lg)
    t = st.table()
    assert t["experts"] == names and t["tokens"] == 19
    for layer in range(L):
        p = torch.cat([torch.softmax(b[layer].double(), -1) for b in batches])
        ref_w = p.mean(0)
        ref_top1 = torch.bincount(p.argmax(-1), minlength=E).double() / p.shape[0]
        torch.testing.assert_close(torch.tensor(t["weight"][layer], dtype=torch.float64), ref_w, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(t["top1"][layer], dtype=torch.float64), ref_top1, atol=1e-5, rtol=0)
        assert math.isclose(sum(t["weight"][layer]), 1.0, abs_tol=1e-4)
        assert math.isclose(sum(t["top1"][layer]), 1.0, abs_tol=1e-4)
        assert t["weight"][layer][2] == 0.0 and t["top1"][layer][2] == 0.0
    assert RoutingStats(names).table()["weight"] == []


def _tiny_moe(E=3, k=2, L=2, V=50):
    from flexmoe_kernels.models import FlexOlmoConfig, FlexOlmoForCausalLM

    cfg = FlexOlmoConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=L,
                         num_attention_heads=2, num_experts=E, num_experts_per_tok=k,
                         expert_names=["public", "a", "b"][:E], moe_backend="torch")
    return FlexOlmoForCausalLM(cfg).eval()


def test_routing_through_model(one_thread):
    m = _tiny_moe()
    x = torch.randint(0, 50, (5, 9))
    st = RoutingStats(m.expert_names)
    lp = evaluate.target_logprobs(m, x, allowed_experts=["public", "a"], batch_size=2, routing=st)
    assert lp.shape == (5, 8)
    t = st.table()
    assert t["tokens"] == 45 and len(t["weight"]) == 2
    for w in t["weight"]:
        assert math.isclose(sum(w), 1.0, abs_tol=1e-4) and w[2] == 0.0  # b opted out: no weight
    # the log-probs do not depend on whether routing is recorded
    torch.testing.assert_close(lp, evaluate.target_logprobs(m, x, allowed_experts=["public", "a"]))


# ============================================================================ inference FLOPs
def test_inference_flops_by_hand():
    from flexmoe_kernels.models import FlexOlmoConfig
    from flexmoe_training.flops import flops_per_token

    L, D, F, V, H, E, K, S = 2, 8, 16, 32, 2, 3, 2, 5
    hd = D // H
    cfg = FlexOlmoConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                         num_experts=E, num_experts_per_tok=K, expert_bias=True)
    per_layer = (D * H * hd * 4 + 2 * H * hd) + 2 * D + K * 3 * D * F + (E * D + E)
    n_mm = L * per_layer + V * D + D
    assert flops_per_token(cfg, S, convention="inference") == 2 * n_mm + 2 * L * S * H * hd
    # one more active expert costs 2 * 3 * D * F per layer
    k3 = flops_per_token(cfg.copy(num_experts_per_tok=3), S, convention="inference")
    assert k3 - flops_per_token(cfg, S, convention="inference") == 2 * L * 3 * D * F
    with pytest.raises(ValueError, match="trainable_active_mm"):
        flops_per_token(cfg, S, 1.0, convention="inference")


# ============================================================================ measure: rows and BTM bookkeeping
class _FakeLM(torch.nn.Module):
    """Logits from an embedding; records the allowed experts and top-k of each call."""

    def __init__(self, V=11):
        super().__init__()
        self.emb = torch.nn.Embedding(V, V)
        self.config = _tiny_moe().config
        self.expert_names = self.config.expert_names
        self.calls = []

    def set_top_k(self, k):
        self.config.num_experts_per_tok = k

    def forward(self, x, allowed_experts=None):
        self.calls.append((allowed_experts, self.config.num_experts_per_tok))
        return type("Out", (), {"logits": self.emb(x)})()


def test_scores_rows_and_btm(one_thread):
    from flexmoe_training.demo.measure import inference_flops

    wins = {d: torch.randint(0, 11, (3, 10)) for d in ("pub", "a", "b")}
    sc = _Scores(wins, prefix_len=4, seq_len=10, log=lambda s: None)
    m = _FakeLM()
    sc.run("oracle", m, "oracle", "oracle", allowed={"pub": ["public"], "a": ["public", "a"], "b": ["public", "b"]},
           top_k={"pub": 1, "a": 2, "b": 2})
    assert m.calls == [(["public"], 1), (["public", "a"], 2), (["public", "b"], 2)]
    assert sc.losses["oracle"]["a"]["tokens"] == 3 * 6  # tokens 4..9 of each window
    assert sc.configs["oracle"]["flops_per_token"] == inference_flops(m.config.copy(num_experts_per_tok=2), 10)
    for name in ("m0", "m1", "m2"):
        sc.run(name, _FakeLM(), "dense", name, keep=True)
    sc.configs["m2"]["flops_per_token"] *= 3  # the most expensive member
    sc.btm("btm", "btm", ["m0", "m1", "m2"])
    fl = sorted(sc.configs[c]["flops_per_token"] for c in ("m0", "m1", "m2"))
    assert sc.configs["btm"]["flops_per_token"] == fl[1] + fl[2]
    for d in wins:
        assert math.isclose(sum(sc.configs["btm"]["windows_choosing_member"][d].values()), 2.0, abs_tol=1e-3)
        assert sc.losses["btm"][d]["tokens"] == 18


# ============================================================================ audit
def test_similarity_known_strings():
    assert audit.levenshtein("flaw", "lawn") == 2 and audit.similarity("flaw", "lawn") == 0.5
    assert audit.similarity("abcdefghij", "abcdefghiX") == pytest.approx(0.9)  # exactly at the threshold
    assert audit.similarity("abc", "abcdef") == 0.5
    assert audit.similarity([1, 2, 3], [3, 2, 1]) == pytest.approx(1 / 3)


def test_positive_control_detects_memorisation(one_thread):
    # random "documents" over a 40-token vocabulary: nothing to generalise, only to memorise
    rng = random.Random(1)
    P, G = 8, 24
    docs = [[rng.randrange(40) for _ in range(P + G + 5)] for _ in range(8)]
    res = audit.positive_control(docs[:4], docs[4:], 41, eos_token_id=40, domain="x", prefix_len=P, gen_len=G,
                                 threshold=0.9, seed=0, hidden_size=64, max_steps=200, lr=1e-2)
    mem, unseen = res
    assert mem.control == "memorised" and unseen.control == "unseen"
    assert mem.details["steps"] < 200 and mem.details["trained_on"] == 4  # stopped because it had memorised
    assert mem.n_extracted >= 3, mem.similarities  # the audit finds what the model memorised
    assert unseen.n_extracted == 0, unseen.similarities  # ... and nothing it never saw
    j = mem.to_json()
    assert j["control"] == "memorised" and j["details"]["steps"] == mem.details["steps"]
    with pytest.raises(ValueError, match="equally long"):
        audit.memorising_model([[1, 2], [1, 2, 3]], 5, eos_token_id=None)
