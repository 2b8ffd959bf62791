"""The "cuda" backend's routing stage: fused masked softmax-top-k + grouping (csrc/routing.cu).

Legend: T tokens, E experts (1 <= E <= 256), K top-k, P = T*K routed (token, slot) pairs
(pair id ``p = t*K + k``).

Shapes: logits_TE (T, E) float32/float16/bfloat16 -> a
:class:`~flexmoe_kernels.ops.plan.RoutingPlan`: topk_ids_TK (T, K) int32, topk_weights_TK
(T, K) float32, counts_E (E,) int32, offsets_E1 (E+1,) int32, sorted_pairs_P /
inv_sorted_pairs_P (P,) int32, logits_TE (T, E) float32 and probs_TE (T, E) float32 (saved
for the backward).

Semantics (``docs/SEMANTICS.md`` §2), equal to the reference
:func:`flexmoe_kernels.ops.reference.routing.route`: ``z = logits + min(expert_bias, 0)``,
-inf where ``allow_mask`` is False (before the softmax), fp32 softmax, top-k on the
probabilities (exact ties to the lower expert id; a disallowed expert is never picked while K
allowed ones exist), weights = the selected probabilities (renormalised iff
``norm_topk_prob``); pairs grouped by expert with a stable order, bit for bit the reference's.

* :func:`router_forward` / :func:`router_backward`: validating, allocating wrappers of
  ``_C.router_forward`` / ``_C.router_backward`` (no autograd, no host sync);
* ``torch.ops.flexmoe_cuda.route`` / ``route_bwd``: the same as functional custom ops with
  fake implementations (``torch.compile`` traces through them);
* :class:`CudaRouteFunction`: differentiable routing on top of the two ops (used by
  :mod:`.backend`).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._validate import check_tensor
from ..args import check_top_k
from ..plan import RoutingPlan
from ._ext import (
    _DTYPE_CODES, _FLOATS, _INT32_MAX, _MAX_EXPERTS, _check_cuda, _check_mask, _check_same_device,
    _mask_mode, _on, _ptr, _stream, extension,
)

__all__ = ["CudaRouteFunction", "router_forward", "router_backward"]

_NS = "flexmoe_cuda"


def _empty_plan(T: int, E: int, top_k: int, dev: torch.device, return_logits: bool) -> RoutingPlan:
    """The plan of T == 0 tokens (no launch): empty ids/weights/pairs, zero counts/offsets."""
    f32 = dict(dtype=torch.float32, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    return RoutingPlan(
        topk_ids_TK=torch.empty(0, top_k, **i32), topk_weights_TK=torch.empty(0, top_k, **f32),
        counts_E=torch.zeros(E, **i32), offsets_E1=torch.zeros(E + 1, **i32),
        sorted_pairs_P=torch.empty(0, **i32), inv_sorted_pairs_P=torch.empty(0, **i32),
        logits_TE=torch.empty(0, E, **f32) if return_logits else None, probs_TE=torch.empty(0, E, **f32),
    )


def router_forward(logits_TE: torch.Tensor, top_k: int, *, allow_mask: Optional[torch.Tensor] = None,
                   expert_bias: Optional[torch.Tensor] = None, norm_topk_prob: bool = False,
                   return_logits: bool = True) -> RoutingPlan:
    """Fused masked softmax-top-k routing + histogram + prefix sum + stable permutation.

    Semantics: see the module docstring (``docs/SEMANTICS.md`` §2). No gradient (see
    :class:`CudaRouteFunction`); no host sync; rows that allow fewer than K experts are NOT
    detected here (use :func:`flexmoe_kernels.ops.args.check_allow_mask_rows`).

    Args:
        logits_TE: (T, E) float32/float16/bfloat16 CUDA, contiguous; 1 <= E <= 256.
        top_k: K in [1, E].
        allow_mask: None, (E,) or (T, E) bool CUDA contiguous; False = opted out.
        expert_bias: None or (E,) float CUDA (any float dtype; read as float32).
        norm_topk_prob: renormalise the K weights to sum to 1.
        return_logits: also write the masked float32 logits. With False the kernel skips that
            (T, E) write and the returned plan's ``logits_TE`` is None: the one case where a
            :class:`~flexmoe_kernels.ops.plan.RoutingPlan` lacks its logits (for callers that
            only need the grouping, e.g. benchmarks; the backend always asks for them).

    Returns:
        a :class:`~flexmoe_kernels.ops.plan.RoutingPlan` on the logits' device with
        ``probs_TE`` set (float32 softmax over the allowed experts, 0 where disallowed) and no
        ``schedule``.
    """
    _check_cuda(logits_TE, "logits", ndim=2, dtypes=_FLOATS)
    T, E = logits_TE.shape
    if not 1 <= E <= _MAX_EXPERTS:
        raise ValueError(f"logits must have 1 <= E <= {_MAX_EXPERTS} columns (experts), got E={E}")
    check_top_k(top_k, E)
    if T * top_k > _INT32_MAX:
        raise ValueError(f"T*K = {T * top_k} routed pairs exceed the int32 pair ids")
    mask = _check_mask(allow_mask, T, E, logits_TE)
    bias = None
    if expert_bias is not None:
        check_tensor(expert_bias, "expert_bias", shape=(E,), floating=True)
        _check_same_device(logits_TE, "logits", expert_bias=expert_bias)
        bias = expert_bias.detach().float().contiguous()
    dev = logits_TE.device
    if T == 0:
        return _empty_plan(T, E, top_k, dev, return_logits)
    C = extension()
    P = T * top_k
    f32 = dict(dtype=torch.float32, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    plan = RoutingPlan(
        topk_ids_TK=torch.empty(T, top_k, **i32), topk_weights_TK=torch.empty(T, top_k, **f32),
        counts_E=torch.empty(E, **i32), offsets_E1=torch.empty(E + 1, **i32),
        sorted_pairs_P=torch.empty(P, **i32), inv_sorted_pairs_P=torch.empty(P, **i32),
        logits_TE=torch.empty(T, E, **f32) if return_logits else None, probs_TE=torch.empty(T, E, **f32),
    )
    ws_bytes = C.router_workspace_bytes(T, E)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
    with _on(dev):
        C.router_forward(
            logits_TE.data_ptr(), _DTYPE_CODES[logits_TE.dtype], T, E, top_k, _ptr(bias), _ptr(mask),
            _mask_mode(mask, T, E), bool(norm_topk_prob), plan.topk_ids_TK.data_ptr(),
            plan.topk_weights_TK.data_ptr(), plan.probs_TE.data_ptr(), _ptr(plan.logits_TE),
            plan.counts_E.data_ptr(), plan.offsets_E1.data_ptr(), plan.sorted_pairs_P.data_ptr(),
            plan.inv_sorted_pairs_P.data_ptr(), ws.data_ptr(), ws_bytes, _stream(dev),
        )
    return plan


def router_backward(
    probs_TE: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    grad_weights_TK: Optional[torch.Tensor],
    grad_logits_TE: Optional[torch.Tensor] = None,
    *,
    allow_mask: Optional[torch.Tensor] = None,
    norm_topk_prob: bool = False,
) -> torch.Tensor:
    """(T, E) float32 gradient w.r.t. the masked logits ``z`` of :func:`router_forward`.

    ``dz = softmax_backward(probs, dp)`` where ``dp`` is the selected-probability gradient
    scattered to the chosen experts (through the renormalisation iff ``norm_topk_prob``),
    plus ``grad_logits_TE`` (the gradient of the returned masked logits, e.g. from the z-loss)
    where ``allow_mask`` allows. Disallowed entries get exactly 0.

    Args: probs_TE (T, E) float32, topk_ids_TK (T, K) int32, topk_weights_TK (T, K) float32
    (the forward's outputs); grad_weights_TK (T, K) float32 or None; grad_logits_TE (T, E)
    float32 or None; allow_mask as in the forward.
    """
    _check_cuda(probs_TE, "probs", ndim=2, dtypes=(torch.float32,))
    T, E = probs_TE.shape
    _check_cuda(topk_ids_TK, "topk_ids", ndim=2, dtypes=(torch.int32,))
    K = topk_ids_TK.shape[1]
    if topk_ids_TK.shape[0] != T or not 1 <= K <= E:
        raise ValueError(f"topk_ids must have shape (T={T}, K) with 1 <= K <= {E}, got {tuple(topk_ids_TK.shape)}")
    _check_cuda(topk_weights_TK, "topk_weights", shape=(T, K), dtypes=(torch.float32,))
    if grad_weights_TK is not None:
        _check_cuda(grad_weights_TK, "grad_weights", shape=(T, K), dtypes=(torch.float32,))
    if grad_logits_TE is not None:
        _check_cuda(grad_logits_TE, "grad_logits", shape=(T, E), dtypes=(torch.float32,))
    mask = _check_mask(allow_mask, T, E, probs_TE)
    _check_same_device(probs_TE, "probs", topk_ids=topk_ids_TK, topk_weights=topk_weights_TK,
                       grad_weights=grad_weights_TK, grad_logits=grad_logits_TE)
    dz = torch.empty(T, E, dtype=torch.float32, device=probs_TE.device)
    if T == 0:
        return dz
    C = extension()
    with _on(probs_TE.device):
        C.router_backward(
            probs_TE.data_ptr(), topk_ids_TK.data_ptr(), topk_weights_TK.data_ptr(),
            _ptr(grad_weights_TK), _ptr(grad_logits_TE), _ptr(mask), _mask_mode(mask, T, E), T, E, K,
            bool(norm_topk_prob), dz.data_ptr(), _stream(probs_TE.device),
        )
    return dz


# ----------------------------------------------------------------------------- custom ops
# torch.library ops so torch.compile traces through the kernels with fake tensors instead of
# breaking the graph at the raw-pointer calls. CudaRouteFunction calls them.


@torch.library.custom_op(f"{_NS}::route", mutates_args=())
def _route_op(
    logits_TE: torch.Tensor,
    expert_bias: Optional[torch.Tensor],
    allow_mask: Optional[torch.Tensor],
    top_k: int,
    norm_topk_prob: bool,
) -> list[torch.Tensor]:
    """[weights_TK, z_TE, ids_TK, counts_E, offsets_E1, sorted_P, inv_P, probs_TE]."""
    plan = router_forward(
        logits_TE.contiguous(), top_k, allow_mask=allow_mask, expert_bias=expert_bias,
        norm_topk_prob=norm_topk_prob, return_logits=True,
    )
    return [plan.topk_weights_TK, plan.logits_TE, plan.topk_ids_TK, plan.counts_E, plan.offsets_E1,
            plan.sorted_pairs_P, plan.inv_sorted_pairs_P, plan.probs_TE]


@_route_op.register_fake
def _route_fake(logits_TE, expert_bias, allow_mask, top_k, norm_topk_prob):
    T, E = logits_TE.shape
    f32 = dict(dtype=torch.float32)
    i32 = dict(dtype=torch.int32)
    new = logits_TE.new_empty
    return [new((T, top_k), **f32), new((T, E), **f32), new((T, top_k), **i32), new((E,), **i32),
            new((E + 1,), **i32), new((T * top_k,), **i32), new((T * top_k,), **i32), new((T, E), **f32)]


@torch.library.custom_op(f"{_NS}::route_bwd", mutates_args=())
def _route_bwd_op(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                  grad_weights_TK: Optional[torch.Tensor], grad_logits_TE: Optional[torch.Tensor],
                  allow_mask: Optional[torch.Tensor], norm_topk_prob: bool) -> torch.Tensor:
    return router_backward(probs_TE, topk_ids_TK, topk_weights_TK, grad_weights_TK, grad_logits_TE,
                           allow_mask=allow_mask, norm_topk_prob=norm_topk_prob)


@_route_bwd_op.register_fake
def _route_bwd_fake(probs_TE, topk_ids_TK, topk_weights_TK, grad_weights_TK, grad_logits_TE, allow_mask,
                    norm_topk_prob):
    return torch.empty_like(probs_TE)


# ----------------------------------------------------------------------------- autograd


class CudaRouteFunction(torch.autograd.Function):
    """Differentiable routing: ``apply(logits_TE, expert_bias_E, allow_mask, top_k, norm_topk_prob)``.

    Returns ``(topk_weights_TK, logits_TE_masked, topk_ids_TK, counts_E, offsets_E1,
    sorted_pairs_P, inv_sorted_pairs_P)``; the first two carry gradients (to ``logits_TE``
    in its dtype and to ``expert_bias`` where ``bias <= 0``, as ``clamp(max=0)`` does), the
    rest are integer and non-differentiable. See :func:`router_forward`.
    """

    @staticmethod
    def forward(ctx, logits_TE, expert_bias, allow_mask, top_k, norm_topk_prob):
        w, z, ids, counts, offsets, sorted_pairs, inv, probs = torch.ops.flexmoe_cuda.route(
            logits_TE, expert_bias, allow_mask, top_k, bool(norm_topk_prob)
        )
        ctx.save_for_backward(probs, ids, w, allow_mask, expert_bias)
        ctx.norm_topk_prob = bool(norm_topk_prob)
        ctx.logits_dtype = logits_TE.dtype
        ctx.mark_non_differentiable(ids, counts, offsets, sorted_pairs, inv)
        ctx.set_materialize_grads(False)
        return w, z, ids, counts, offsets, sorted_pairs, inv

    @staticmethod
    def backward(ctx, g_w, g_z, *_unused):
        probs, ids, w, mask, bias = ctx.saved_tensors
        if g_w is None and g_z is None:
            return None, None, None, None, None
        dz = torch.ops.flexmoe_cuda.route_bwd(
            probs, ids, w,
            None if g_w is None else g_w.float().contiguous(),
            None if g_z is None else g_z.float().contiguous(),
            mask, ctx.norm_topk_prob,
        )
        g_logits = dz.to(ctx.logits_dtype) if ctx.needs_input_grad[0] else None
        g_bias = None
        if bias is not None and ctx.needs_input_grad[1]:
            g_bias = torch.where(bias <= 0, dz.sum(0), torch.zeros((), device=dz.device)).to(bias.dtype)
        return g_logits, g_bias, None, None, None
