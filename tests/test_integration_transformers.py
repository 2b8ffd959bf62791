"""Our layer inside transformers models (issue 14 items 1, 2, 5, 6): ``apply_flexmoe`` on tiny
random FlexOlmo / OLMoE / Qwen3-MoE / Mixtral models, on CPU, in float32.

* patched = unpatched: logits, loss, router logits, auxiliary loss and every gradient;
* opt-out = the transformers model rebuilt without those experts (every ``allowed_experts``
  form), with the opted-out weights NaN (never read: logits and gradients finite);
* ``generate(allowed_experts=...)`` = the rebuilt models' greedy (and beam) tokens;
* the ``allowed_experts`` context manager, idempotence, ``remove_flexmoe``, errors;
* the ``"flexmoe"`` experts implementation = transformers' eager experts; ``plan_from_topk``.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flexmoe_kernels as fk  # noqa: E402
from flexmoe_kernels.integrations import experts as fk_experts  # noqa: E402
from flexmoe_kernels.integrations import transformers as fk_tf  # noqa: E402
from flexmoe_kernels.integrations.transformers import allowed_experts, apply_flexmoe, remove_flexmoe  # noqa: E402

E, K, V = 4, 2, 64
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
              bos_token_id=2, initializer_range=0.2)
FAMILIES = ("flex_olmo", "olmoe", "qwen3_moe", "mixtral")


def make_config(family: str, num_experts: int = E):
    """A tiny config of ``family`` (OLMoE without renormalisation, Qwen3-MoE with, and one
    dense Qwen3 layer; Mixtral always renormalises)."""
    if family == "flex_olmo":
        return transformers.FlexOlmoConfig(num_experts=num_experts, num_experts_per_tok=K, **COMMON)
    if family == "olmoe":
        return transformers.OlmoeConfig(num_experts=num_experts, num_experts_per_tok=K, norm_topk_prob=False, **COMMON)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            num_experts=num_experts, num_experts_per_tok=K, moe_intermediate_size=16, norm_topk_prob=True,
            mlp_only_layers=[1], **{**COMMON, "num_hidden_layers": 3})
    return transformers.MixtralConfig(num_local_experts=num_experts, num_experts_per_tok=K, **COMMON)


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(make_config(family)).float().eval()


def rebuilt_without(model, keep: list[int]):
    """The same transformers model physically rebuilt with only experts ``keep`` (router rows
    and expert slices removed), unpatched."""
    cfg = copy.deepcopy(model.config)
    setattr(cfg, "num_local_experts" if cfg.model_type == "mixtral" else "num_experts", len(keep))
    small = type(model)(cfg).float().eval()
    sliced = {k: (v[keep] if k.endswith(("mlp.gate.weight", "experts.gate_up_proj", "experts.down_proj")) else v)
              for k, v in model.state_dict().items()}
    small.load_state_dict(sliced)
    return small


def moe_blocks(model):
    return [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]


def poison(model, opted_out: list[int]) -> None:
    """NaN in every tensor of the opted-out experts (router rows included)."""
    with torch.no_grad():
        for b in moe_blocks(model):
            for t in (b.gate.weight, b.experts.gate_up_proj, b.experts.down_proj):
                t[opted_out] = float("nan")


@pytest.fixture(autouse=True)
def _small_threads(one_thread):
    yield


def _ids(B=2, S=6, seed=1):
    return torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_equals_unpatched_logits_grads_router_logits_aux_loss(family, monkeypatch):
    ref = make_model(family)
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch")
    calls = []
    real = fk_tf.flexmoe_forward
    monkeypatch.setattr(fk_tf, "flexmoe_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = _ids()
    outs = [m(ids, labels=ids, output_router_logits=True) for m in (ref, model)]
    assert len(calls) == len(moe_blocks(model)) > 0  # our layer ran, once per MoE block
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[1].aux_loss, outs[0].aux_loss, atol=1e-6, rtol=1e-6)
    assert len(outs[1].router_logits) == len(outs[0].router_logits) == len(moe_blocks(model))
    for got, want in zip(outs[1].router_logits, outs[0].router_logits):
        assert got.shape == want.shape == (ids.numel(), E) and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for o in outs:
        o.loss.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_shared_not_copied(family):
    model = make_model(family)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    apply_flexmoe(model)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert list(model.parameters()) == params
    block = moe_blocks(model)[0]  # editing the block's own weight changes the patched output
    ids = _ids(1, 3)
    before_out = model(ids).logits
    with torch.no_grad():
        block.experts.down_proj.mul_(2)
    assert not torch.allclose(model(ids).logits, before_out)


def test_mixtral_routing_is_softmax_topk_renormalised():
    """Mixtral's top-k of the logits then softmax over the k == our softmax over E, top-k,
    renormalise (norm_topk_prob=True): same experts, same weights."""
    router = make_model("mixtral").model.layers[0].mlp.gate
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    logits, weights, ids = router(x)
    top_l, top_i = logits.topk(K, dim=-1)
    plan = fk.route(logits, K, norm_topk_prob=True)
    assert torch.equal(plan.topk_ids_TK.long(), ids) and torch.equal(top_i, ids)
    torch.testing.assert_close(plan.topk_weights_TK, weights, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plan.topk_weights_TK, torch.softmax(top_l, -1), atol=1e-6, rtol=1e-6)


def test_apply_twice_is_harmless_and_remove_undoes():
    ref = make_model("olmoe")
    model = apply_flexmoe(apply_flexmoe(copy.deepcopy(ref)), backend="torch")
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert fk_tf.is_patched(model)
    remove_flexmoe(model)
    assert not fk_tf.is_patched(model)
    with pytest.raises(RuntimeError, match="allowed_experts"):  # a guard stays (issue 21 item 2)
        model(ids, allowed_experts=[0, 1])
    assert all("forward" not in b.__dict__ and "forward" not in b.gate.__dict__ for b in moe_blocks(model))
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_unsupported_model_is_an_error_listing_the_supported_types():
    cfg = transformers.LlamaConfig(**{k: v for k, v in COMMON.items() if k != "initializer_range"})
    with pytest.raises(ValueError, match=r"llama.*\['flex_olmo', 'olmoe', 'qwen3_moe', 'mixtral'\]"):
        apply_flexmoe(transformers.LlamaForCausalLM(cfg))
    with pytest.raises(ValueError, match="backend"):
        apply_flexmoe(make_model("olmoe"), backend="tpu")
    with pytest.raises(ValueError, match="expert_names"):
        apply_flexmoe(make_model("olmoe"), expert_names=["a", "b"])


# ----------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("family", FAMILIES)
def test_opt_out_equals_removal_in_every_form_with_nan_poison(family):
    ref = make_model(family)
    names = ["code", "math", "news", "web"]
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch", expert_names=names)
    keep, out = [0, 2, 3], [1]
    ids = _ids()
    want = rebuilt_without(ref, keep)(ids).logits
    poison(model, out)
    B, S = ids.shape
    m_E = torch.tensor([True, False, True, True])
    forms = {"names": ["code", "news", "web"], "indices": keep, "(E,)": m_E,
             "(B, E)": m_E.expand(B, E).clone(), "(B*S, E)": m_E.expand(B * S, E).clone()}
    for form, allowed in forms.items():
        logits = model(ids, allowed_experts=allowed).logits
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{form}: {m}")
    # per sequence: row b is its own rebuilt model; gradients stay finite despite the NaN
    per_seq = torch.tensor([[True, False, True, True], [True, False, False, True]])
    out = model(ids, allowed_experts=per_seq, labels=ids, output_router_logits=True)
    for b, kept in enumerate(([0, 2, 3], [0, 3])):
        row = rebuilt_without(ref, kept)(ids[b:b + 1]).logits
        torch.testing.assert_close(out.logits[b:b + 1], row, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
    assert bool(torch.isfinite(out.aux_loss))
    assert bool((out.router_logits[0][:, 1] == float("-inf")).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_allowed_experts_equals_the_rebuilt_models(family):
    ref = make_model(family)
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch")
    poison(model, [1])
    ids = _ids(2, 4)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    per_seq = torch.tensor([[True, False, True, True], [True, False, False, True]])
    got = model.generate(ids, allowed_experts=per_seq, **gen)
    for b, kept in enumerate(([0, 2, 3], [0, 3])):
        want = rebuilt_without(ref, kept).generate(ids[b:b + 1], **gen)
        assert torch.equal(got[b:b + 1], want), (b, got[b], want[0])
    got_names = model.generate(ids, allowed_experts=["expert_0", "expert_3"], **gen)
    assert torch.equal(got_names, rebuilt_without(ref, [0, 3]).generate(ids, **gen))
    assert torch.equal(model.generate(ids, allowed_experts=per_seq, use_cache=False, **gen), got)


def test_generate_beams_expand_a_per_sequence_mask():
    ref = make_model("flex_olmo")
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch")
    ids = _ids(2, 4)
    gen = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    per_seq = torch.tensor([[True, True, False, True], [False, True, True, True]])
    got = model.generate(ids, allowed_experts=per_seq, **gen)
    for b, kept in enumerate(([0, 1, 3], [1, 2, 3])):
        assert torch.equal(got[b:b + 1], rebuilt_without(ref, kept).generate(ids[b:b + 1], **gen))


def test_allowed_experts_errors_name_the_argument():
    model = apply_flexmoe(make_model("olmoe"))
    ids = _ids()
    with pytest.raises(ValueError, match="allowed_experts"):
        model(ids, allowed_experts=["expert_0"])  # fewer than K
    with pytest.raises(ValueError, match="allowed_experts.*unknown|unknown expert name"):
        model(ids, allowed_experts=["nope", "expert_1"])
    with pytest.raises(ValueError, match="allowed_experts for generate"):
        model.generate(ids, allowed_experts=torch.ones(ids.numel(), E, dtype=torch.bool), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"model \(OlmoeForCausalLM\) is not patched.*apply_flexmoe"):
        with allowed_experts(make_model("olmoe"), [0, 1]):
            pass


def test_context_manager_for_code_that_cannot_pass_arguments():
    ref = make_model("qwen3_moe")
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch")
    ids = _ids()
    full, small = ref(ids).logits, rebuilt_without(ref, [0, 3])
    with allowed_experts(model, ["expert_0", "expert_3"]) as m:
        assert m is model
        torch.testing.assert_close(model(ids).logits, small(ids).logits, atol=1e-5, rtol=1e-5)
        with allowed_experts(model, list(range(E))):  # nests; naming every expert widens explicitly
            torch.testing.assert_close(model(ids).logits, full, atol=1e-5, rtol=1e-5)
        gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(model.generate(ids, **gen), small.generate(ids, **gen))
        # an explicit argument wins over the context; None is the context's set (issue 21 item 1)
        torch.testing.assert_close(model(ids, allowed_experts=[0, 1, 2]).logits,
                                   rebuilt_without(ref, [0, 1, 2])(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids, allowed_experts=None).logits, small(ids).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids).logits, full, atol=1e-5, rtol=1e-5)  # restored


def test_expert_names_from_the_config():
    ref = make_model("flex_olmo")
    ref.config.expert_names = ["public", "math", "code", "news"]
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch")
    ids = _ids()
    torch.testing.assert_close(model(ids, allowed_experts=["public", "code"]).logits,
                               rebuilt_without(ref, [0, 2])(ids).logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- item 5
def test_flexmoe_experts_implementation_equals_eager():
    assert "flexmoe" in transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS
    ref = make_model("olmoe")
    ref.set_experts_implementation("eager")
    model = copy.deepcopy(ref)
    model.set_experts_implementation("flexmoe")
    calls = []
    real = fk_experts.grouped_swiglu
    fk_experts.grouped_swiglu = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        ids = _ids()
        outs = [m(ids, labels=ids) for m in (ref, model)]
    finally:
        fk_experts.grouped_swiglu = real
    assert len(calls) == len(moe_blocks(model))
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    for o in outs:
        o.loss.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_plan_from_topk_matches_our_router_and_carries_weight_gradients():
    g = torch.Generator().manual_seed(5)
    x, gate_up, down = torch.randn(7, 8, generator=g), torch.randn(E, 12, 8, generator=g), torch.randn(E, 8, 6, generator=g)
    logits = torch.randn(7, E, generator=g)
    routed = fk.route(logits, K)
    weights = routed.topk_weights_TK.detach().clone().requires_grad_(True)
    plan = fk.plan_from_topk(routed.topk_ids_TK.long(), weights, E)
    for f in ("topk_ids_TK", "counts_E", "offsets_E1", "sorted_pairs_P", "inv_sorted_pairs_P"):
        assert torch.equal(getattr(plan, f), getattr(routed, f)), f
    out = fk.grouped_swiglu(x, plan, gate_up, down)
    torch.testing.assert_close(out, fk.grouped_swiglu(x, routed, gate_up, down))
    out.sum().backward()
    assert weights.grad is not None and bool((weights.grad != 0).any())
    with pytest.raises(ValueError, match="topk_ids"):
        fk.plan_from_topk(torch.full((2, K), E), torch.ones(2, K), E)
    with pytest.raises(ValueError, match="topk_weights"):
        fk.plan_from_topk(torch.zeros(2, K, dtype=torch.long), torch.ones(3, K), E)


def test_gradient_checkpointing_recomputes_with_the_same_mask():
    """Under activation checkpointing the backward recomputes each layer after forward
    returned: the call's mask must still apply there."""
    ref = make_model("mixtral")
    grads = []
    for checkpointing in (False, True):
        model = apply_flexmoe(copy.deepcopy(ref), backend="torch").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = _ids()
        model(ids, labels=ids, allowed_experts=[0, 2, 3], use_cache=False).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_example_script_runs(monkeypatch, capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "transformers_opt_out.py"
    monkeypatch.setattr("sys.argv", [str(script), "--model-type", "mixtral"])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "opt out 'news' vs model rebuilt without it" in printed and "router logit tensors" in printed


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_compiles_without_breaks_our_layer_adds(family):
    """issue 14 item 4: a patched model traces in as many graphs, with as many breaks, as the
    unpatched one (none here), with and without an opt-out, and equals eager."""
    model = make_model(family)
    ids = _ids()

    def explain(m, **kw):
        torch._dynamo.reset()
        ex = torch._dynamo.explain(m)(ids, **kw)
        return ex.graph_count, ex.graph_break_count

    before = explain(model)
    apply_flexmoe(model, backend="torch")
    assert explain(model) == before
    assert explain(model, allowed_experts=[0, 1, 3]) == before
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)


# ----------------------------------------------------------------------------- issue 13 item 5
def test_mask_checked_once_per_call_not_per_block(monkeypatch):
    """The patched model checks the call's mask once (the first block; the others reuse it and
    run the layer unchecked): a tensor mask costs one host read per forward and one per
    generation; a name list none (checked on the host from its entries)."""
    from flexmoe_kernels.integrations.opt_out import OptOutState
    from flexmoe_kernels.ops import args

    reads = []
    state_check, layer_check = OptOutState._check_rows, args._check_rows
    monkeypatch.setattr(OptOutState, "_check_rows", lambda self, m: reads.append("state") or state_check(self, m))
    monkeypatch.setattr(args, "_check_rows", lambda m, k: reads.append("layer") or layer_check(m, k))
    ref = make_model("mixtral")
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch")
    assert len(moe_blocks(model)) == 2
    ids = _ids()
    mask = torch.tensor([True, False, True, True])
    got = model(ids, allowed_experts=mask).logits
    assert reads == ["state"], reads
    reads.clear()
    torch.testing.assert_close(model(ids, allowed_experts=[0, "expert_2", 3]).logits, got, rtol=0, atol=0)
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    tokens = model.generate(ids, allowed_experts=["expert_0", 2, 3], **gen)
    assert reads == [], f"a name list read a mask back: {reads}"
    assert torch.equal(model.generate(ids, allowed_experts=mask[None].expand(2, E), **gen), tokens)
    assert reads == ["state"], f"a generation checked its mask {len(reads)} times"
