"""The "cuda" backend of :func:`flexmoe_kernels.flexmoe_forward`: CUDA C++ routing,
permutation and combine (csrc/, the extension ``flexmoe_kernels._C``) around torch's grouped
GEMM.

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k, P = T*K routed pairs.

Data flow of :func:`forward` (semantics: ``docs/SEMANTICS.md`` §2-§4):

1. ``logits_TE = x_TD @ router_weight_ED.T`` (torch, x's dtype, as the reference; router rows
   of experts no token allows are zeroed first, so a NaN there never reaches dX);
2. :class:`~.routing.CudaRouteFunction`: fused masked softmax-top-k, histogram, prefix sum and
   stable permutation (csrc/routing.cu) -> weights, masked fp32 logits, counts, offsets,
   sorted / inverse pair ids;
3. :class:`~.permute.CudaGatherFunction`: ``x_PD`` in expert-grouped order (csrc/permute.cu);
4. :func:`~.experts.experts_forward`: SwiGLU on the grouped rows, torch's ``grouped_mm``
   (CUTLASS) when usable, else the reference's per-expert loop;
5. :class:`~.combine.CudaCombineFunction`: weighted top-k sum (fp32, fixed order;
   csrc/combine.cu).

Returns ``(out_TD, logits_TE)``: out in x's dtype, logits float32 masked (-inf where
disallowed), both differentiable (x, router weight, expert bias, gate_up, down).

Host synchronisation: none on the grouped-GEMM path, forward or backward, except the optional
mask-row validation (skipped under CUDA-graph capture). The per-expert fallback reads
``counts_E`` on the host once per forward (and cannot be captured in a CUDA graph). T == 0 runs
the reference backend (no launch).
"""
from __future__ import annotations

import dataclasses

import torch

from ..args import LayerArgs, check_allow_mask_rows
from ..reference import backend as reference_backend
from ..reference.routing import mask_router_rows, router_logits
from . import _ext
from .combine import CudaCombineFunction
from .experts import experts_forward
from .permute import CudaGatherFunction
from .routing import CudaRouteFunction

__all__ = ["is_available", "forward"]


def is_available(device: torch.device | str) -> tuple[bool, str]:
    """(True, "...") when the CUDA extension imports and ``device`` is a usable CUDA device."""
    device = torch.device(device)
    why = _ext.cuda_unavailable_reason()
    if device.type != "cuda":
        return False, f"the cuda backend needs a CUDA device, got {device}" + (f"; also: {why}" if why else "")
    if why:
        return False, why
    return True, "CUDA extension flexmoe_kernels._C loaded"


def forward(args: LayerArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out_TD, logits_TE)`` for arguments validated by
    :func:`~flexmoe_kernels.ops.args.validate_layer_args` (not re-checked here, except that x
    must be on a CUDA device and the deferred mask-row check)."""
    x_TD, K = args.x_TD, args.top_k
    if x_TD.device.type != _ext._DEVICE_TYPE:
        raise ValueError(f"the cuda backend needs CUDA tensors, x is on {x_TD.device}")
    if args.validate_rows:
        check_allow_mask_rows(args.allow_mask, K, args.num_experts)
    if args.num_tokens == 0:
        return reference_backend.forward(dataclasses.replace(args, validate_rows=False))

    mask = args.allow_mask  # None or contiguous bool on x's device (validate_layer_args)
    logits_TE = router_logits(x_TD, mask_router_rows(args.router_weight_ED, mask))
    w_TK, z_TE, _ids, counts_E, offsets_E1, sorted_P, inv_P = CudaRouteFunction.apply(
        logits_TE, args.expert_bias, mask, K, args.norm_topk_prob
    )
    x_PD = CudaGatherFunction.apply(x_TD, sorted_P, inv_P, K)
    y_PD = experts_forward(x_PD, args.gate_up_E2FD, args.down_EDF, counts_E, offsets_E1,
                           args.trainable_experts)
    out_TD = CudaCombineFunction.apply(y_PD, w_TK, inv_P, K)
    return out_TD, z_TE
