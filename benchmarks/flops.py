"""FLOP counts of the benchmarks: the one place they are computed.

Legend: T tokens, D hidden, F expert width, E experts, K top-k, P = T*K routed (token, expert)
pairs, L layers.

Every layer row carries two counts:

* **model FLOPs** (``flops``; used for ``tflops`` and ``mfu``): the standard count of the
  layer's matmuls, whatever the implementation does. Forward = the expert GEMMs
  ``6*P*D*F`` (gate/up ``2*P*D*2F`` + down ``2*P*F*D``) plus the router GEMM ``2*T*D*E``;
  backward = 2x forward (dX and dW GEMMs); forward+backward = 3x, i.e. ``18*P*D*F`` for the
  experts. The dense baselines (a SwiGLU FFN of width K*F, one GEMM of equal FLOPs) count the
  same ``6*P*D*F`` per forward and no router. Softmax, SiLU and the combine are not counted;
  masked rows keep the same FLOPs.
* **executed FLOPs** (``flops_executed``; ``tflops_executed``): what the implementation runs.
  Our Triton backend does not keep the gate/up pre-activation by default
  (``up.keep_preact`` off, :mod:`flexmoe_kernels.ops.triton.configs`): its backward recomputes
  it with the gate/up GEMM again, ``2*P*D*2F = 4*P*D*F`` more, so forward+backward executes
  ``22*P*D*F`` (+ the router's ``6*T*D*E``) where the model count is ``18*P*D*F``. With
  ``up.keep_preact=1`` (and for every other provider here: autograd keeps what it needs)
  executed = model.

End to end (:func:`e2e_flops_per_token`): model FLOPs per token are the PaLM convention of
:func:`flexmoe_training.flops.flops_per_token` (``convention="palm"``); executed FLOPs add the
MoE layers' recompute (``4*L*K*D*F`` per token when the layers' backend recomputes) and drop
the weight-gradient GEMMs of frozen matmul weights (``2 * (N_active - N_trainable_active)``,
coupled expert training), with the attention term unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["MODE_FACTOR", "Flops", "expert_fwd", "router_fwd", "recompute_bwd", "layer_flops",
           "e2e_flops_per_token", "triton_recomputes"]

# Passes of the forward's matmul FLOPs per timed call: backward = dX + dW (2x the forward).
MODE_FACTOR = {"fwd": 1, "bwd": 2, "fwd_bwd": 3, "memory": 3}
# Modes whose call runs a backward (where a recompute executes).
_BACKWARD_MODES = ("bwd", "fwd_bwd", "memory")


@dataclass(frozen=True)
class Flops:
    """FLOPs of one timed call: ``model`` (standard count) and ``executed`` (what runs)."""

    model: int
    executed: int


def expert_fwd(T: int, D: int, F: int, K: int) -> int:
    """Expert GEMMs of one forward: ``P*(2*D*2F + 2*F*D) = 6*P*D*F`` with P = T*K."""
    return 6 * T * K * D * F


def router_fwd(T: int, D: int, E: int) -> int:
    """Router GEMM of one forward: ``2*T*D*E``."""
    return 2 * T * D * E


def recompute_bwd(T: int, D: int, F: int, K: int) -> int:
    """The gate/up GEMM a backward runs again when the pre-activation was not kept:
    ``2*P*D*2F = 4*P*D*F``."""
    return 4 * T * K * D * F


def layer_flops(mode: str, fwd_model: int, recompute: int = 0) -> Flops:
    """FLOPs of one call in ``mode`` (fwd / bwd / fwd_bwd / memory) of a layer whose forward
    counts ``fwd_model`` model FLOPs and whose backward re-runs ``recompute`` FLOPs."""
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {list(MODE_FACTOR)}, got {mode!r}")
    model = MODE_FACTOR[mode] * int(fwd_model)
    return Flops(model, model + (int(recompute) if mode in _BACKWARD_MODES else 0))


def triton_recomputes(T: int, D: int, F: int, E: int, K: int, dtype, device) -> bool:
    """Whether our Triton backend's backward recomputes the gate/up pre-activation for this
    problem (its resolved configs, ``FLEXMOE_TRITON_CONFIG`` included, have ``up.keep_preact``
    off)."""
    from flexmoe_kernels.ops.triton.configs import get_configs

    return not get_configs(T, D, F, E, K, dtype, device).up.keep_preact


def e2e_flops_per_token(cfg, seq_len: int, recompute_experts: bool = False,
                        trainable_active_mm: Optional[float] = None) -> Flops:
    """Training FLOPs per token of a ``FlexOlmoConfig`` (forward + backward): model = the PaLM
    count of :func:`flexmoe_training.flops.flops_per_token`; executed = model + the experts'
    recompute (``recompute_experts``: ``4*L*K*D*F``) - the dW GEMMs of frozen active matmul
    weights (``trainable_active_mm``: the active matmul weights that train; None = all)."""
    from flexmoe_training.flops import _matmul_params_active, flops_per_token

    model = flops_per_token(cfg, seq_len, convention="palm")
    executed = model
    if recompute_experts:
        executed += recompute_bwd(1, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok) \
            * cfg.num_hidden_layers
    if trainable_active_mm is not None:
        executed -= 2.0 * max(0.0, _matmul_params_active(cfg) - trainable_active_mm)
    return Flops(model, executed)
