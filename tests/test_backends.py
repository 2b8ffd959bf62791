"""Backend registry and "auto" selection."""
import pytest
import torch

import flexmoe_kernels as fk
from flexmoe_kernels.ops.moe import BACKENDS


def test_torch_backend_always_available():
    assert fk.backend_status("torch", "cpu") == (True, "always available")
    assert "torch" in fk.available_backends("cpu")


def test_auto_on_cpu_is_torch():
    assert fk.resolve_backend("auto", "cpu") == "torch"


def test_unknown_backend_named_in_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.backend_status("tpu", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.FlexMoE(8, 8, 2, 1, backend="tpu")


def test_every_backend_reports_a_reason():
    for name in BACKENDS:
        ok, why = fk.backend_status(name, "cpu")
        assert isinstance(ok, bool) and isinstance(why, str) and why


@pytest.mark.skipif(fk.backend_status("cuda", "cpu")[0], reason="cuda backend runs on CPU here")
def test_unavailable_backend_raises_with_reason():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available on cpu"):
        fk.resolve_backend("cuda", "cpu")


def test_flexmoe_forward_torch_matches_module(seed):
    m = fk.FlexMoE(12, 10, 5, 2, backend="torch", expert_bias=True)
    with torch.no_grad():
        m.gate.expert_bias.normal_()
    x = torch.randn(3, 4, 12)
    out, logits = fk.flexmoe_forward(
        x.reshape(-1, 12), m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj, 2,
        expert_bias=m.gate.expert_bias, backend="torch",
    )
    y, lg = m(x, return_router_logits=True)
    torch.testing.assert_close(out.reshape(3, 4, 12), y)
    torch.testing.assert_close(logits, lg)
