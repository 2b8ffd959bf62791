"""Python wrappers of the CUDA extension ``flexmoe_kernels._C`` (csrc/).

Legend: T tokens, D hidden, E experts (<= 256), K top-k, P = T*K routed (token, slot) pairs.

Layers, as everywhere in the package: CUDA kernels (csrc/*.cu) -> raw-pointer launchers
(``_C``) -> the validating, allocating wrappers below -> ``torch.autograd.Function`` s
(:class:`CudaRouteFunction`, :class:`CudaGatherFunction`, :class:`CudaCombineFunction`) used by
the "cuda" backend (:mod:`flexmoe_kernels.ops.moe_cuda`).

* Every wrapper validates its tensors first (device, dtype, contiguity, shape; errors are
  ``TypeError``/``ValueError`` naming the argument) and only then loads the extension, so
  bad input is reported the same way on a machine without CUDA.
* Outputs are allocated with ``torch.empty`` and every element is written by a kernel (no
  reliance on zeroed memory), on the current stream (``torch.cuda.current_stream()``); no
  wrapper synchronises with the host, so all of them can be captured in a CUDA graph.
* ``import flexmoe_kernels`` never imports ``_C``; :func:`cuda_is_available` /
  :func:`cuda_unavailable_reason` say whether it can be used and why not.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Optional

import torch

from .._validate import check_positive_int, check_tensor

__all__ = [
    "CudaRoutingPlan",
    "CudaRouteFunction",
    "CudaGatherFunction",
    "CudaCombineFunction",
    "cuda_is_available",
    "cuda_unavailable_reason",
    "extension",
    "router_forward",
    "router_backward",
    "gather_rows",
    "combine",
    "combine_backward",
]

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FLOATS = tuple(_DTYPE_CODES)
_MAX_EXPERTS = 256
_INT32_MAX = 2**31 - 1

_ext = None
_ext_error: Optional[str] = None
# Device type the wrappers accept. Only the CPU tests change it, together with a pure-PyTorch
# stand-in for ``_C``, to exercise the validation/autograd glue without a GPU.
_DEVICE_TYPE = "cuda"


def _load_extension():
    """Import ``flexmoe_kernels._C`` once; remember the error text if it fails."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module("flexmoe_kernels._C")
        except ImportError as exc:  # not built, or built for another Python / platform
            _ext_error = (
                f"the CUDA extension flexmoe_kernels._C is not importable ({exc}); build it with "
                "`python setup.py build_ext --inplace` or `pip install -e .` on a machine with nvcc "
                "(FLEXMOE_SKIP_CUDA_BUILD must not be set)"
            )
    return _ext


def cuda_unavailable_reason() -> str:
    """Why the CUDA kernels cannot run here, or ``""`` when they can.

    Checks, in order: the compiled extension imports; torch has CUDA; a CUDA device is present;
    the driver is new enough for the CUDA runtime the extension was built with (the only call
    into the extension, ``cudaDriverGetVersion``, which creates no context).
    """
    if _load_extension() is None:
        return _ext_error or "the CUDA extension flexmoe_kernels._C is not importable"
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    built, driver = _ext.built_cuda_version(), _ext.driver_cuda_version()
    if driver // 1000 < built // 1000:
        return (
            f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10} but flexmoe_kernels._C "
            f"was built with CUDA {built // 1000}.{built % 1000 // 10} (static runtime); rebuild it with a "
            "toolkit no newer than the driver or update the driver"
        )
    return ""


def cuda_is_available() -> bool:
    """True when ``flexmoe_kernels._C`` imports and a CUDA device is present."""
    return cuda_unavailable_reason() == ""


_ext_ready = False


def extension():
    """The loaded ``_C`` module; ``RuntimeError`` with the reason when it cannot be used.

    The availability check runs until it first succeeds, then is cached (hot path)."""
    global _ext_ready
    if not _ext_ready:
        why = cuda_unavailable_reason()
        if why:
            raise RuntimeError(f"flexmoe_kernels CUDA kernels are unavailable: {why}")
        _ext_ready = True
    return _ext


# ----------------------------------------------------------------------------- validation


def _check_cuda(t: object, name: str, *, dtypes, shape=None, ndim=None) -> torch.Tensor:
    """Type/shape/dtype checks (``check_tensor``), then CUDA device and contiguity."""
    check_tensor(t, name, ndim=ndim, shape=shape, dtypes=dtypes)
    if t.device.type != _DEVICE_TYPE:
        raise ValueError(f"{name} must be a CUDA tensor, got a tensor on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())} for shape {tuple(t.shape)}")
    return t


def _check_same_device(ref: torch.Tensor, ref_name: str, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _stream(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def _on(device: torch.device):
    """Make ``device`` current while launching (the static CUDA runtime in ``_C`` follows the
    context current on the thread, so tensors on another GPU than the current one work)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _mask_mode(mask: Optional[torch.Tensor], T: int, E: int) -> int:
    if mask is None:
        return 0
    return 1 if mask.ndim == 1 else 2


def _check_mask(allow_mask, T: int, E: int, ref: torch.Tensor) -> Optional[torch.Tensor]:
    if allow_mask is None:
        return None
    _check_cuda(allow_mask, "allow_mask", dtypes=(torch.bool,))
    if tuple(allow_mask.shape) not in ((E,), (T, E)):
        raise ValueError(
            f"allow_mask must have shape (E,)=({E},) or (T, E)=({T}, {E}), got {tuple(allow_mask.shape)}"
        )
    _check_same_device(ref, "logits", allow_mask=allow_mask)
    return allow_mask


# ----------------------------------------------------------------------------- routing


@dataclass
class CudaRoutingPlan:
    """Output of :func:`router_forward` (all on the logits' device).

    Attributes:
        topk_ids_TK: (T, K) int32 selected experts, by decreasing probability (exact ties:
            lower expert id first).
        topk_weights_TK: (T, K) float32 selected probabilities (renormalised over the K iff
            ``norm_topk_prob``).
        probs_TE: (T, E) float32 softmax over the allowed experts, 0 where disallowed.
        logits_TE: (T, E) float32 masked logits ``logits + min(bias, 0)``, -inf where
            disallowed (for the z-loss); None when not requested.
        counts_E: (E,) int32 pairs per expert (0 for opted-out experts); sums to T*K.
        offsets_E1: (E+1,) int32 exclusive prefix sum of ``counts_E``.
        sorted_pairs_P: (P,) int32 pair ids ``t*K + k`` grouped by expert, increasing within an
            expert (equal to :func:`flexmoe_kernels.route`'s ``sorted_pairs_P``).
        inv_sorted_pairs_P: (P,) int32 inverse: ``sorted_pairs_P[inv[p]] == p``.
    """

    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: Optional[torch.Tensor]
    counts_E: torch.Tensor
    offsets_E1: torch.Tensor
    sorted_pairs_P: torch.Tensor
    inv_sorted_pairs_P: torch.Tensor


def router_forward(
    logits_TE: torch.Tensor,
    top_k: int,
    *,
    allow_mask: Optional[torch.Tensor] = None,
    expert_bias: Optional[torch.Tensor] = None,
    norm_topk_prob: bool = False,
    return_logits: bool = True,
) -> CudaRoutingPlan:
    """Fused masked softmax-top-k routing + histogram + prefix sum + stable permutation.

    Semantics equal :func:`flexmoe_kernels.route` (``shared/FLEXOLMO.md`` section 2):
    ``z = logits + min(expert_bias, 0)``, -inf where ``allow_mask`` is False (before the
    softmax), fp32 softmax, top-k on the probabilities (a disallowed expert is never picked
    while K allowed ones exist), weights = selected probabilities (renormalised iff
    ``norm_topk_prob``). No gradient (see :class:`CudaRouteFunction`); no host sync; rows that
    allow fewer than K experts are NOT detected here (use
    :func:`flexmoe_kernels.ops.routing.check_allow_mask_rows`).

    Args:
        logits_TE: (T, E) float32/float16/bfloat16 CUDA, contiguous; 1 <= E <= 256.
        top_k: K in [1, E].
        allow_mask: None, (E,) or (T, E) bool CUDA contiguous; False = opted out.
        expert_bias: None or (E,) float CUDA (any float dtype; read as float32).
        norm_topk_prob: renormalise the K weights to sum to 1.
        return_logits: also write the masked float32 logits (``plan.logits_TE``).
    """
    _check_cuda(logits_TE, "logits", ndim=2, dtypes=_FLOATS)
    T, E = logits_TE.shape
    check_positive_int(top_k, "top_k")
    if not 1 <= E <= _MAX_EXPERTS:
        raise ValueError(f"logits must have 1 <= E <= {_MAX_EXPERTS} columns (experts), got E={E}")
    if top_k > E:
        raise ValueError(f"top_k={top_k} is larger than the number of experts E={E}")
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
        f32 = dict(dtype=torch.float32, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        return CudaRoutingPlan(
            torch.empty(0, top_k, **i32), torch.empty(0, top_k, **f32), torch.empty(0, E, **f32),
            torch.empty(0, E, **f32) if return_logits else None, torch.zeros(E, **i32),
            torch.zeros(E + 1, **i32), torch.empty(0, **i32), torch.empty(0, **i32),
        )
    C = extension()
    P = T * top_k
    f32 = dict(dtype=torch.float32, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    ids = torch.empty(T, top_k, **i32)
    w = torch.empty(T, top_k, **f32)
    probs = torch.empty(T, E, **f32)
    z = torch.empty(T, E, **f32) if return_logits else None
    counts = torch.empty(E, **i32)
    offsets = torch.empty(E + 1, **i32)
    sorted_pairs = torch.empty(P, **i32)
    inv = torch.empty(P, **i32)
    ws_bytes = C.router_workspace_bytes(T, E)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
    with _on(dev):
        C.router_forward(
            logits_TE.data_ptr(), _DTYPE_CODES[logits_TE.dtype], T, E, top_k, _ptr(bias), _ptr(mask),
            _mask_mode(mask, T, E), bool(norm_topk_prob), ids.data_ptr(), w.data_ptr(),
            probs.data_ptr(), _ptr(z), counts.data_ptr(), offsets.data_ptr(), sorted_pairs.data_ptr(),
            inv.data_ptr(), ws.data_ptr(), ws_bytes, _stream(dev),
        )
    return CudaRoutingPlan(ids, w, probs, z, counts, offsets, sorted_pairs, inv)


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


# ----------------------------------------------------------------------------- permutation


def _check_pairs(t: torch.Tensor, name: str, P: int, ref: torch.Tensor, ref_name: str) -> None:
    _check_cuda(t, name, shape=(P,), dtypes=(torch.int32,))
    _check_same_device(ref, ref_name, **{name: t})


def gather_rows(x_TD: torch.Tensor, sorted_pairs_P: torch.Tensor, top_k: int) -> torch.Tensor:
    """(P, D) rows ``x_TD[sorted_pairs_P[i] // top_k]``: the tokens in expert-grouped order.

    x_TD: (T, D) float32/float16/bfloat16 CUDA contiguous; sorted_pairs_P: (T*K,) int32 (a
    permutation of the pair ids, e.g. from :func:`router_forward`). Output dtype = x's.
    """
    _check_cuda(x_TD, "x", ndim=2, dtypes=_FLOATS)
    check_positive_int(top_k, "top_k")
    T, D = x_TD.shape
    P = T * top_k
    _check_pairs(sorted_pairs_P, "sorted_pairs", P, x_TD, "x")
    out = torch.empty(P, D, dtype=x_TD.dtype, device=x_TD.device)
    if P == 0 or D == 0:
        return out
    C = extension()
    with _on(x_TD.device):
        C.gather_rows(
            x_TD.data_ptr(), x_TD.element_size(), T, D, sorted_pairs_P.data_ptr(), P, top_k,
            out.data_ptr(), _stream(x_TD.device),
        )
    return out


def combine(
    y_PD: torch.Tensor, weights_TK: Optional[torch.Tensor], inv_sorted_pairs_P: torch.Tensor, top_k: int
) -> torch.Tensor:
    """(T, D) ``out[t] = sum_k weights[t, k] * y_PD[inv[t*K + k]]`` in y's dtype.

    Float32 accumulation in the fixed order k = 0..K-1 (bitwise deterministic, no atomics).
    ``weights_TK`` None means all ones (this is the backward of :func:`gather_rows`).

    Args: y_PD (P=T*K, D) float CUDA contiguous; weights_TK (T, K) float32 or None;
    inv_sorted_pairs_P (P,) int32 (position of pair t*K+k in y's rows).
    """
    _check_cuda(y_PD, "y", ndim=2, dtypes=_FLOATS)
    check_positive_int(top_k, "top_k")
    P, D = y_PD.shape
    if P % top_k:
        raise ValueError(f"y must have T*K rows (a multiple of top_k={top_k}), got {P}")
    T = P // top_k
    if weights_TK is not None:
        _check_cuda(weights_TK, "weights", shape=(T, top_k), dtypes=(torch.float32,))
        _check_same_device(y_PD, "y", weights=weights_TK)
    _check_pairs(inv_sorted_pairs_P, "inv_sorted_pairs", P, y_PD, "y")
    out = torch.empty(T, D, dtype=y_PD.dtype, device=y_PD.device)
    if T == 0 or D == 0:
        return out.zero_()
    C = extension()
    with _on(y_PD.device):
        C.combine_forward(
            y_PD.data_ptr(), _DTYPE_CODES[y_PD.dtype], T, D, top_k, _ptr(weights_TK),
            inv_sorted_pairs_P.data_ptr(), out.data_ptr(), _stream(y_PD.device),
        )
    return out


def combine_backward(
    grad_out_TD: torch.Tensor,
    y_PD: Optional[torch.Tensor],
    weights_TK: Optional[torch.Tensor],
    inv_sorted_pairs_P: torch.Tensor,
    top_k: int,
    *,
    need_grad_y: bool = True,
    need_grad_weights: bool = True,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of :func:`combine`: ``(grad_y_PD, grad_weights_TK)``.

    ``grad_y[inv[t*K+k]] = weights[t, k] * grad_out[t]`` (y's dtype) and
    ``grad_weights[t, k] = <grad_out[t], y[inv[t*K+k]]>`` (float32, fixed-order reduction).
    ``y_PD`` is needed only for ``grad_weights``. Unrequested results are None.
    """
    _check_cuda(grad_out_TD, "grad_out", ndim=2, dtypes=_FLOATS)
    check_positive_int(top_k, "top_k")
    T, D = grad_out_TD.shape
    P = T * top_k
    if need_grad_weights:
        if y_PD is None:
            raise ValueError("y must be given when need_grad_weights is True")
        _check_cuda(y_PD, "y", shape=(P, D), dtypes=(grad_out_TD.dtype,))
        _check_same_device(grad_out_TD, "grad_out", y=y_PD)
    if weights_TK is not None:
        _check_cuda(weights_TK, "weights", shape=(T, top_k), dtypes=(torch.float32,))
        _check_same_device(grad_out_TD, "grad_out", weights=weights_TK)
    _check_pairs(inv_sorted_pairs_P, "inv_sorted_pairs", P, grad_out_TD, "grad_out")
    dev = grad_out_TD.device
    dy = torch.empty(P, D, dtype=grad_out_TD.dtype, device=dev) if need_grad_y else None
    dw = torch.empty(T, top_k, dtype=torch.float32, device=dev) if need_grad_weights else None
    if (dy is None and dw is None) or T == 0:
        return dy, dw
    if D == 0:
        return dy, (dw.zero_() if dw is not None else None)
    C = extension()
    with _on(dev):
        C.combine_backward(
            grad_out_TD.data_ptr(), _DTYPE_CODES[grad_out_TD.dtype], T, D, top_k,
            _ptr(y_PD if need_grad_weights else None), _ptr(weights_TK),
            inv_sorted_pairs_P.data_ptr(), _ptr(dy), _ptr(dw), _stream(dev),
        )
    return dy, dw


# ----------------------------------------------------------------------------- custom ops
# torch.library ops (namespace "flexmoe_cuda") so torch.compile traces through the kernels
# with fake tensors instead of breaking the graph at the raw-pointer calls. The autograd
# Functions below call these ops in their forward and backward.
_NS = "flexmoe_cuda"


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
def _route_bwd_op(
    probs_TE: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    grad_weights_TK: Optional[torch.Tensor],
    grad_logits_TE: Optional[torch.Tensor],
    allow_mask: Optional[torch.Tensor],
    norm_topk_prob: bool,
) -> torch.Tensor:
    return router_backward(probs_TE, topk_ids_TK, topk_weights_TK, grad_weights_TK, grad_logits_TE,
                           allow_mask=allow_mask, norm_topk_prob=norm_topk_prob)


@_route_bwd_op.register_fake
def _route_bwd_fake(probs_TE, topk_ids_TK, topk_weights_TK, grad_weights_TK, grad_logits_TE, allow_mask,
                    norm_topk_prob):
    return torch.empty_like(probs_TE)


@torch.library.custom_op(f"{_NS}::gather", mutates_args=())
def _gather_op(x_TD: torch.Tensor, sorted_pairs_P: torch.Tensor, top_k: int) -> torch.Tensor:
    return gather_rows(x_TD.contiguous(), sorted_pairs_P, top_k)


@_gather_op.register_fake
def _gather_fake(x_TD, sorted_pairs_P, top_k):
    return x_TD.new_empty((x_TD.shape[0] * top_k, x_TD.shape[1]))


@torch.library.custom_op(f"{_NS}::combine", mutates_args=())
def _combine_op(
    y_PD: torch.Tensor, weights_TK: Optional[torch.Tensor], inv_sorted_pairs_P: torch.Tensor, top_k: int
) -> torch.Tensor:
    return combine(y_PD.contiguous(), weights_TK, inv_sorted_pairs_P, top_k)


@_combine_op.register_fake
def _combine_fake(y_PD, weights_TK, inv_sorted_pairs_P, top_k):
    return y_PD.new_empty((y_PD.shape[0] // top_k, y_PD.shape[1]))


@torch.library.custom_op(f"{_NS}::combine_bwd", mutates_args=())
def _combine_bwd_op(
    grad_out_TD: torch.Tensor,
    y_PD: torch.Tensor,
    weights_TK: torch.Tensor,
    inv_sorted_pairs_P: torch.Tensor,
    top_k: int,
    need_grad_y: bool,
    need_grad_weights: bool,
) -> list[torch.Tensor]:
    """[grad_y_PD, grad_weights_TK]; an unrequested one is an empty (0,) tensor."""
    dy, dw = combine_backward(grad_out_TD.contiguous(), y_PD, weights_TK, inv_sorted_pairs_P, top_k,
                              need_grad_y=need_grad_y, need_grad_weights=need_grad_weights)
    if dy is None:
        dy = grad_out_TD.new_empty((0,))
    if dw is None:
        dw = grad_out_TD.new_empty((0,), dtype=torch.float32)
    return [dy, dw]


@_combine_bwd_op.register_fake
def _combine_bwd_fake(grad_out_TD, y_PD, weights_TK, inv_sorted_pairs_P, top_k, need_grad_y, need_grad_weights):
    T, D = grad_out_TD.shape
    dy = grad_out_TD.new_empty((T * top_k, D) if need_grad_y else (0,))
    dw = grad_out_TD.new_empty((T, top_k) if need_grad_weights else (0,), dtype=torch.float32)
    return [dy, dw]


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


class CudaGatherFunction(torch.autograd.Function):
    """``apply(x_TD, sorted_pairs_P, inv_sorted_pairs_P, top_k) -> x_PD`` (:func:`gather_rows`).

    Backward: ``dx[t] = sum_k dx_PD[inv[t*K+k]]`` (a deterministic gather-sum, no atomics).
    """

    @staticmethod
    def forward(ctx, x_TD, sorted_pairs_P, inv_sorted_pairs_P, top_k):
        ctx.save_for_backward(inv_sorted_pairs_P)
        ctx.top_k = top_k
        return torch.ops.flexmoe_cuda.gather(x_TD, sorted_pairs_P, top_k)

    @staticmethod
    def backward(ctx, g_PD):
        (inv,) = ctx.saved_tensors
        return torch.ops.flexmoe_cuda.combine(g_PD, None, inv, ctx.top_k), None, None, None


class CudaCombineFunction(torch.autograd.Function):
    """``apply(y_PD, weights_TK, inv_sorted_pairs_P, top_k) -> out_TD`` (:func:`combine`)."""

    @staticmethod
    def forward(ctx, y_PD, weights_TK, inv_sorted_pairs_P, top_k):
        y_PD = y_PD.contiguous()
        weights_TK = weights_TK.contiguous()
        ctx.save_for_backward(y_PD, weights_TK, inv_sorted_pairs_P)
        ctx.top_k = top_k
        return torch.ops.flexmoe_cuda.combine(y_PD, weights_TK, inv_sorted_pairs_P, top_k)

    @staticmethod
    def backward(ctx, g_TD):
        y, w, inv = ctx.saved_tensors
        need_dy, need_dw = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        if not (need_dy or need_dw):
            return None, None, None, None
        dy, dw = torch.ops.flexmoe_cuda.combine_bwd(g_TD, y, w, inv, ctx.top_k, need_dy, need_dw)
        return (dy if need_dy else None), (dw if need_dw else None), None, None
