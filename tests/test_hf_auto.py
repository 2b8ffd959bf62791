"""Issue 25 item 2: the Hugging Face path. A class-level patch before loading
(``apply_flexmoe_to_<family>()``) and ``AutoFlexMoEForCausalLM`` give patched models from
``from_pretrained``; ``transformers.Trainer`` trains with a per-row ``allowed_experts`` (B, E)
batch column (default ``remove_unused_columns``, gradient checkpointing on)."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flexmoe_kernels.integrations import hf_auto  # noqa: E402
from flexmoe_kernels.integrations.transformers import apply_flexmoe, is_patched  # noqa: E402

E, K, V = 4, 2, 64
NAMES = ["public", "news", "code", "medical"]


def _config(**kw):
    return transformers.FlexOlmoConfig(vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       pad_token_id=0, eos_token_id=1, bos_token_id=2, num_experts=E,
                                       num_experts_per_tok=K, initializer_range=0.2, **kw)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(_config()).float().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture(autouse=True)
def _revert():
    yield
    hf_auto.revert_flexmoe_class_patch()


def test_class_patch_before_loading(saved):
    ref = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    assert not is_patched(ref)
    hf_auto.apply_flexmoe_to_flex_olmo(expert_names=NAMES)
    assert hf_auto.class_patched_families() == ["flex_olmo"]
    m = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    assert is_patched(m) and m._flexmoe_state.expert_names == NAMES
    m2 = transformers.FlexOlmoForCausalLM.from_pretrained(saved).eval()
    assert is_patched(m2)
    assert is_patched(transformers.AutoModelForCausalLM.from_config(_config()))
    ids = torch.randint(3, V, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        a = m(ids, allowed_experts=["public", "code", "medical"]).logits
    assert not torch.allclose(a, ref(ids).logits)
    # another family is untouched; revert restores transformers' constructors
    hf_auto.revert_flexmoe_class_patch("flex_olmo")
    assert not is_patched(transformers.AutoModelForCausalLM.from_pretrained(saved))
    assert "from_pretrained" not in transformers.FlexOlmoForCausalLM.__dict__


def test_auto_flexmoe_for_causal_lm(saved):
    m = hf_auto.AutoFlexMoEForCausalLM.from_pretrained(saved, expert_names=NAMES)
    assert is_patched(m) and m._flexmoe_state.expert_names == NAMES
    assert "allowed_experts" in inspect.signature(m.forward).parameters
    with pytest.raises(ValueError, match="not supported.*flex_olmo"):
        hf_auto.AutoFlexMoEForCausalLM.from_config(transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4))


class _Rows(torch.utils.data.Dataset):
    """Rows of input_ids / labels / allowed_experts (E,) bool: the default collator stacks (B, E)."""

    def __init__(self, n, S, allow):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(3, V, (n, S), generator=g)
        self.allow = allow

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "allowed_experts": self.allow[i]}


def test_trainer_per_row_opt_out_with_gradient_checkpointing(saved, tmp_path):
    pytest.importorskip("accelerate")
    hf_auto.apply_flexmoe_to_flex_olmo(expert_names=NAMES)
    model = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    # expert "medical" is opted out by every row: poisoned, so reading it would make the loss NaN
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj[3].fill_(float("nan"))
            layer.mlp.experts.down_proj[3].fill_(float("nan"))
    allow = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    data = _Rows(4, 12, allow)
    # the first step's loss, by hand, with the same per-row masks
    model.eval()
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "labels", "allowed_experts")}
    with torch.no_grad():
        want = float(model(**batch).loss)
        everyone = float(model(input_ids=batch["input_ids"], labels=batch["labels"],
                               allowed_experts=["public", "news", "code"]).loss)
    assert math.isfinite(want) and abs(want - everyone) > 1e-4  # the rows' masks matter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False}, seed=0, disable_tqdm=True)
    assert args.remove_unused_columns  # the default: allowed_experts must survive it
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert losses[0] == pytest.approx(want, rel=2e-3)
    assert model.is_activation_checkpointing
    after = dict(model.named_parameters())
    # trained: the allowed experts moved; the opted-out expert is still NaN (never read, no gradient)
    assert not torch.equal(after["model.layers.0.mlp.experts.down_proj"][0], before["model.layers.0.mlp.experts.down_proj"][0])
    assert torch.isnan(after["model.layers.0.mlp.experts.down_proj"][3]).all()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_cross_entropy_equals_transformers_loss_and_gradients(saved, tmp_path, tied):
    """enable_fused_cross_entropy: same loss (with the auxiliary loss), same gradients, no (B, S, V)
    logits; per-row opt-out and activation checkpointing on."""
    from flexmoe_kernels.ops.linear_cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(_config(tie_word_embeddings=tied)).float().save_pretrained(
        tmp_path / "m")
    ref = hf_auto.AutoFlexMoEForCausalLM.from_pretrained(tmp_path / "m", expert_names=NAMES).train()
    fused = hf_auto.AutoFlexMoEForCausalLM.from_pretrained(tmp_path / "m", expert_names=NAMES,
                                                           fused_cross_entropy=True).train()
    hf_auto.enable_fused_cross_entropy(fused, chunk_size=5)  # several chunks, the last one short
    for m in (ref, fused):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert "allowed_experts" in inspect.signature(fused.forward).parameters
    ids = torch.randint(3, V, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    allow = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    outs = []
    for m in (ref, fused):
        out = m(input_ids=ids, labels=labels, allowed_experts=allow, output_router_logits=True)
        out.loss.backward()
        outs.append(out)
    assert outs[1].logits.shape == (3, 1, V) and outs[0].logits.shape == (3, 11, V)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[1].aux_loss, outs[0].aux_loss)
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=n)
    # Trainer's num_items_in_batch: the sum over that many items, as transformers divides
    for m in (ref, fused):
        m.zero_grad()
    l_ref = ref(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(50)).loss
    l_fused = fused(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(50)).loss
    torch.testing.assert_close(l_fused, l_ref, atol=1e-6, rtol=1e-6)
    # evaluation and no labels: transformers' own forward
    fused.eval()
    assert fused(input_ids=ids, labels=labels).logits.shape == (3, 11, V)
    hf_auto.disable_fused_cross_entropy(fused)
    assert "_flexmoe_fce" not in fused.__dict__ and is_patched(fused)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_op_frozen_head(dtype):
    import torch.nn.functional as F

    from flexmoe_kernels.ops.linear_cross_entropy import linear_cross_entropy

    torch.manual_seed(1)
    h = torch.randn(29, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(40, 16, dtype=dtype)  # frozen LM head (coupled training): no weight gradient kept
    y = torch.randint(0, 40, (29,))
    y[::7] = -100
    got = linear_cross_entropy(h, w, y, chunk_size=8)
    (3 * got).backward()
    g = h.grad.clone()
    h.grad = None
    want = F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100)
    (3 * want).backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g.float(), h.grad.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)
