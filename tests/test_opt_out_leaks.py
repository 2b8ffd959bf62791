"""Issue 21: an opt-out is never silently ignored in a patched transformers model.

Each test asks for an opt-out in a way that used to run with every expert (or fail) and
checks it is honoured exactly, or refused with an error that says why:

1. ``allowed_experts=None`` passed explicitly inside the context manager = the context's set;
2. ``allowed_experts`` after :func:`remove_flexmoe` raises (a guard stays on forward/generate);
3. patching / unpatching an inner module of a patched model (or the reverse) is refused;
4. re-applying without ``expert_names`` / ``backend`` keeps them;
5. activation checkpointing: backward after the ``with`` block (or under another context)
   recomputes with the forward's mask;
6. the ``"flexmoe"`` experts implementation resolves ``"auto"`` like ``FlexMoE``.

Tiny random models (built as in test_integration_transformers), fresh random inputs, CPU.
The opted-out experts are NaN-poisoned: a single read of them makes the output NaN.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_integration_transformers import E, V, make_model, moe_blocks, poison, rebuilt_without  # noqa: E402

from flexmoe_kernels.integrations import experts as fk_experts  # noqa: E402
from flexmoe_kernels.integrations import transformers as fk_tf  # noqa: E402
from flexmoe_kernels.integrations.transformers import allowed_experts, apply_flexmoe, remove_flexmoe  # noqa: E402

GEN = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(autouse=True)
def _small_threads(one_thread):
    yield


def fresh_ids(B=2, S=6):
    """Fresh random token ids (a new seed each call, printed on failure via the tensor)."""
    return torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(random.randrange(2**31)))


def random_keep(k: int = 3) -> list[int]:
    return sorted(random.sample(range(E), k))


# ----------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_explicit_none_inside_the_context_means_the_context_set(family):
    ref = make_model(family, seed=random.randrange(1000))
    keep = random_keep()
    out = [e for e in range(E) if e not in keep]
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch")
    poison(model, out)
    small = rebuilt_without(ref, keep)
    ids = fresh_ids()
    with allowed_experts(model, keep):
        got = model(ids, allowed_experts=None).logits  # a wrapper forwarding its None default
        assert bool(torch.isfinite(got).all()), "an opted-out (NaN) expert was read"
        torch.testing.assert_close(got, small(ids).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(ids, allowed_experts=None, **GEN), small.generate(ids, **GEN))
        with allowed_experts(model, None):  # a nested scope given None keeps the outer set
            torch.testing.assert_close(model(ids).logits, got, atol=0, rtol=0)


# ----------------------------------------------------------------------------- item 2
def test_allowed_experts_after_remove_flexmoe_is_an_error():
    ref = make_model("qwen3_moe", seed=random.randrange(1000))
    model = remove_flexmoe(apply_flexmoe(copy.deepcopy(ref), backend="torch"))
    ids = fresh_ids()
    for call in (lambda: model(ids, allowed_experts=[0, 1]),
                 lambda: model.generate(ids, allowed_experts=["expert_0", "expert_1"], **GEN)):
        with pytest.raises(RuntimeError, match=r"allowed_experts=.*remove_flexmoe.*apply_flexmoe"):
            call()
    with pytest.raises(ValueError, match=r"model .* is not patched.*apply_flexmoe"):
        with allowed_experts(model, [0, 1]):
            pass
    # without an opt-out it is transformers' model again
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=0, rtol=0)
    torch.testing.assert_close(model(ids, allowed_experts=None).logits, ref(ids).logits, atol=0, rtol=0)
    assert torch.equal(model.generate(ids, **GEN), ref.generate(ids, **GEN))
    # patched again: the opt-out works again, and removing again guards again
    keep = random_keep()
    apply_flexmoe(model, backend="torch")
    torch.testing.assert_close(model(ids, allowed_experts=keep).logits,
                               rebuilt_without(ref, keep)(ids).logits, atol=1e-5, rtol=1e-5)
    remove_flexmoe(model)
    with pytest.raises(RuntimeError, match="allowed_experts"):
        model(ids, allowed_experts=keep)
    # the guard survives a deepcopy and calls the copy's own forward
    clone = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="allowed_experts"):
        clone(ids, allowed_experts=keep)
    torch.testing.assert_close(clone(ids).logits, ref(ids).logits, atol=0, rtol=0)


# ----------------------------------------------------------------------------- item 3
def test_patching_or_unpatching_an_inner_module_is_refused():
    ref = make_model("flex_olmo", seed=random.randrange(1000))
    keep = random_keep()
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch")
    poison(model, [e for e in range(E) if e not in keep])
    ids = fresh_ids()
    want = rebuilt_without(ref, keep)(ids).logits

    def honoured():
        got = model(ids, allowed_experts=keep).logits
        assert bool(torch.isfinite(got).all()), "an opted-out (NaN) expert was read"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match=r"FlexOlmoModel.*already patched through.*FlexOlmoForCausalLM.*remove_flexmoe"):
        apply_flexmoe(model.model)
    honoured()
    with pytest.raises(ValueError, match=r"FlexOlmoModel.*patched through.*FlexOlmoForCausalLM.*remove_flexmoe"):
        remove_flexmoe(model.model)
    honoured()
    with pytest.raises(ValueError, match=r"allowed_experts.*FlexOlmoModel.*patched through.*FlexOlmoForCausalLM"):
        model.model(ids, allowed_experts=keep)  # the inner model would swallow it
    # the reverse order: the inner model patched first, then its parent
    inner_first = copy.deepcopy(ref)
    apply_flexmoe(inner_first.model, backend="torch")
    with pytest.raises(ValueError, match=r"'model' \(FlexOlmoModel\) is already patched.*remove_flexmoe"):
        apply_flexmoe(inner_first)
    with pytest.raises(ValueError, match=r"'model' \(FlexOlmoModel\) is already patched.*remove_flexmoe\(model.model\) instead"):
        remove_flexmoe(inner_first)
    # the inner patch still honours an opt-out passed through the parent's forward
    torch.testing.assert_close(inner_first(ids, allowed_experts=keep).logits, want, atol=1e-5, rtol=1e-5)
    # unpatching the parent, then patching the inner model is fine
    remove_flexmoe(model)
    apply_flexmoe(model.model, backend="torch")
    with allowed_experts(model.model, keep):
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- item 4
def test_apply_again_keeps_names_and_backend_unless_given():
    ref = make_model("olmoe", seed=random.randrange(1000))
    names = ["code", "math", "news", "web"]
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch", expert_names=names)
    apply_flexmoe(model)  # e.g. a second library call with the defaults
    ids = fresh_ids()
    keep = random_keep()
    torch.testing.assert_close(model(ids, allowed_experts=[names[e] for e in keep]).logits,
                               rebuilt_without(ref, keep)(ids).logits, atol=1e-5, rtol=1e-5)
    assert all(b._flexmoe_backend == "torch" for b in moe_blocks(model))
    apply_flexmoe(model, expert_names=["a", "b", "c", "d"])  # new names replace the old ones
    with pytest.raises(ValueError, match="unknown expert name 'code'"):
        model(ids, allowed_experts=["code", "math"])
    assert all(b._flexmoe_backend == "torch" for b in moe_blocks(model))


# ----------------------------------------------------------------------------- item 5
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got, want):
    assert got.keys() == want.keys()
    for n in want:
        assert bool(torch.isfinite(got[n]).all()), n
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def _checkpointed_runs(family, backend, reentrant, keep, ids, backward_under):
    """Gradients of one step: without checkpointing (forward mask ``keep``), and with HF
    checkpointing, forward inside ``allowed_experts(model, keep)``, backward after the block
    exits (under ``backward_under``, a context or None)."""
    ref = make_model(family, seed=random.randrange(1000))
    poison(ref, [e for e in range(E) if e not in keep])
    plain = apply_flexmoe(copy.deepcopy(ref), backend=backend).train()
    plain(ids, labels=ids, allowed_experts=keep, use_cache=False).loss.backward()
    model = apply_flexmoe(copy.deepcopy(ref), backend=backend).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with allowed_experts(model, keep):  # a trainer's compute_loss
        loss = model(ids, labels=ids, use_cache=False).loss
    if backward_under is None:
        loss.backward()  # the trainer's backward, after compute_loss returned
    else:
        with allowed_experts(model, backward_under):
            loss.backward()
    return _grads(model), _grads(plain)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_checkpointing_backward_after_the_context_uses_the_forward_mask(family, reentrant):
    keep = random_keep()
    got, want = _checkpointed_runs(family, "torch", reentrant, keep, fresh_ids(), None)
    _assert_same_grads(got, want)


def test_checkpointing_backward_under_another_context_uses_the_forward_mask():
    keep = random_keep()
    other = [e for e in range(E) if e != keep[0]]
    got, want = _checkpointed_runs("qwen3_moe", "torch", False, keep, fresh_ids(), other)
    _assert_same_grads(got, want)


def test_checkpointing_triton_backend_after_the_context():
    keep = random_keep()
    got, want = _checkpointed_runs("olmoe", "triton", False, keep, fresh_ids(1, 4), None)
    _assert_same_grads(got, want)


def test_checkpointing_plain_loop_several_steps_and_forwards_before_backwards():
    """A plain loop: two forwards under different contexts, then both backwards (reverse
    order): each recomputation uses its own forward's mask."""
    ref = make_model("mixtral", seed=random.randrange(1000))
    masks = [random_keep(), random_keep(2)]
    batches = [fresh_ids(), fresh_ids()]
    want = []
    for keep, ids in zip(masks, batches):
        plain = apply_flexmoe(copy.deepcopy(ref), backend="torch").train()
        plain(ids, labels=ids, allowed_experts=keep, use_cache=False).loss.backward()
        want.append(_grads(plain))
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch").train()
    model.gradient_checkpointing_enable()
    losses = []
    for keep, ids in zip(masks, batches):
        with allowed_experts(model, keep):
            losses.append(model(ids, labels=ids, use_cache=False).loss)
    for i in (1, 0):
        model.zero_grad(set_to_none=True)
        losses[i].backward()
        _assert_same_grads(_grads(model), want[i])


def test_checkpoint_of_our_own_around_the_model_uses_the_last_training_forward():
    """A checkpoint wrapper that is not transformers' (here torch's around the whole model):
    the recomputation routes by the mask of the last training forward, not by the context
    active at backward time."""
    ref = make_model("olmoe", seed=random.randrange(1000))
    keep = random_keep()
    poison(ref, [e for e in range(E) if e not in keep])
    ids = fresh_ids()
    plain = apply_flexmoe(copy.deepcopy(ref), backend="torch").train()
    plain(ids, labels=ids, allowed_experts=keep).loss.backward()
    model = apply_flexmoe(copy.deepcopy(ref), backend="torch").train()
    with allowed_experts(model, keep):
        loss = torch.utils.checkpoint.checkpoint(lambda x: model(x, labels=x).loss, ids, use_reentrant=False)
    with allowed_experts(model, list(range(E))):
        loss.backward()
    _assert_same_grads(_grads(model), _grads(plain))


def test_checkpointing_trainer_style_step():
    """transformers' Trainer flow without accelerate: ``gradient_checkpointing_enable()``
    (its defaults), ``compute_loss`` under the context manager, then ``loss.backward()`` in
    ``training_step`` and an optimizer step; = the run without checkpointing."""
    ref = make_model("flex_olmo", seed=random.randrange(1000))
    keep = random_keep()
    runs = []
    for checkpointing in (False, True):
        model = apply_flexmoe(copy.deepcopy(ref), backend="torch").train()
        if checkpointing:  # transformers 5's name (Trainer calls it), else the older one
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(7)
        for _ in range(2):
            ids = torch.randint(3, V, (2, 5), generator=gen)

            def compute_loss(m, inputs):
                with allowed_experts(m, keep):
                    return m(**inputs).loss

            loss = compute_loss(model, {"input_ids": ids, "labels": ids, "use_cache": False})
            loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in runs[0]:
        torch.testing.assert_close(runs[1][n], runs[0][n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------- item 6
def test_flexmoe_experts_implementation_resolves_auto(monkeypatch):
    seen = []
    real = fk_experts.resolve_backend
    monkeypatch.setattr(fk_experts, "resolve_backend",
                        lambda name, device, problem=None: seen.append((name, problem)) or real(name, device, problem))
    ref = make_model("olmoe", seed=random.randrange(1000))
    ref.set_experts_implementation("eager")
    model = copy.deepcopy(ref)
    model.set_experts_implementation("flexmoe")
    ids = fresh_ids()
    outs = [m(ids, labels=ids) for m in (ref, model)]
    assert len(seen) == len(moe_blocks(model)), seen
    assert all(name == "auto" and problem["T"] == ids.numel() and problem["E"] == E for name, problem in seen)
    assert real("auto", ids.device, seen[0][1]) == "torch"  # documented: torch off CUDA
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    for o in outs:
        o.loss.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("forced", ["triton", "cuda"])
def test_flexmoe_experts_implementation_each_backend_equals_eager(forced, monkeypatch, request):
    """The expert stage of each backend the resolution may pick: triton under the CPU
    interpreter (its kernels launch), cuda through the CPU emulation of ``_C``."""
    from helpers import record_launches

    if forced == "cuda":
        request.getfixturevalue("emulated_cuda")
    launches = record_launches(monkeypatch)
    monkeypatch.setattr(fk_experts, "resolve_backend", lambda name, device, problem=None: forced)
    ref = make_model("olmoe", seed=random.randrange(1000))
    ref.set_experts_implementation("eager")
    model = copy.deepcopy(ref)
    model.set_experts_implementation("flexmoe")
    ids = fresh_ids(1, 4)
    outs = [m(ids, labels=ids) for m in (ref, model)]
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    for o in outs:
        o.loss.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    ran = {n for n, _, _ in launches}
    if forced == "triton":  # our routing (the schedule), the grouped GEMMs and their backward
        assert {"_topk_softmax_kernel", "_tile_gemm_scatter_kernel", "_dh_swiglu_bwd_kernel",
                "_grouped_dw_kernel"} <= ran and ran & {"_up_swiglu_kernel", "_up_interleaved_kernel"}, ran
    else:
        assert not ran, ran


@pytest.mark.gpu
def test_flexmoe_experts_implementation_runs_triton_on_cuda(monkeypatch):
    """On CUDA the registry entry runs our Triton kernels (the static "auto" order, triton
    first; FLEXMOE_AUTOSELECT=0 turns the measurement off) and equals transformers' eager."""
    from helpers import record_launches

    monkeypatch.setenv("FLEXMOE_AUTOSELECT", "0")
    monkeypatch.delenv("FLEXMOE_AUTO_BACKEND", raising=False)
    launches = record_launches(monkeypatch)
    ref = make_model("olmoe", seed=random.randrange(1000)).cuda()
    ref.set_experts_implementation("eager")
    model = copy.deepcopy(ref)
    model.set_experts_implementation("flexmoe")
    ids = fresh_ids(2, 8).cuda()
    outs = [m(ids, labels=ids) for m in (ref, model)]
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-4, rtol=1e-4)
    for o in outs:
        o.loss.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    ran = {n for n, _, _ in launches}
    assert {"_topk_softmax_kernel", "_tile_gemm_scatter_kernel", "_dh_swiglu_bwd_kernel"} <= ran, ran
    assert ran & {"_up_swiglu_kernel", "_up_interleaved_kernel"}, ran
