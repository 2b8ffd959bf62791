"""Triton routing: fused masked softmax-top-k and the grouped-GEMM tile schedule.

Legend: T tokens, E experts, K top-k, P = T*K routed (token, slot) pairs, ``block_m`` the
row-tile of the grouped GEMMs, Q_max padded pair slots, NT tiles of ``block_m`` slots.

:func:`triton_route` is the Triton twin of :func:`flexmoe_kernels.route` (same
semantics, see ``docs/SEMANTICS.md`` §2): ``min(bias, 0)`` and the allow-mask are
applied to the logits **before** the softmax (a disallowed expert gets logit -inf, exactly as
if it were removed), the softmax is fp32, the top-k probabilities are the weights
(renormalised iff ``norm_topk_prob``), and a disallowed expert is never selected. On top of
the reference's grouped order it produces a **padded schedule** for the grouped GEMMs
(vLLM's ``moe_align_block_size`` idea, in index space only):

* each expert's group of pairs is padded up to a multiple of ``block_m`` in
  ``padded_pairs_Q``; padding slots hold the sentinel ``P`` (= T*K, an invalid pair id);
* ``tile_expert_E_tiles[i]`` is the expert that owns tile ``i`` (slots
  ``i*block_m:(i+1)*block_m``), -1 for tiles past ``num_tiles``;
* buffers have the worst-case sizes ``Q_max = roundup(T*K + E*(block_m-1), block_m)`` and
  ``NT = Q_max // block_m`` (see :func:`schedule_sizes`), so a GEMM launched on ``NT`` tiles has
  a static grid; programs whose tile has expert -1 exit. Experts with no pairs (zero tokens or
  opted out) own no tiles, so their weights are never loaded.

No host synchronisation happens in :func:`triton_route` or :func:`triton_route_backward`
except the optional ``validate`` check (skipped while a CUDA graph is being captured). All
outputs are written by kernels (nothing relies on zero-initialised memory), so a CUDA graph
can capture the routing once and be replayed with new logits and a new (same-shape) mask.

On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before
this module's kernels are first imported); that is the CPU test tier. Kernels live in
:mod:`.routing_kernels`; the plan type is :class:`~flexmoe_kernels.ops.plan.RoutingPlan` with
its :class:`~flexmoe_kernels.ops.plan.TileSchedule`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..._validate import check_positive_int, check_tensor
from ..args import check_allow_mask_rows, check_top_k, normalize_allow_mask
from ..plan import RoutingPlan, TileSchedule, schedule_sizes
from . import launch

__all__ = [
    "RoutingConfig",
    "routing_config",
    "triton_route",
    "triton_route_backward",
    "tile_schedule_reference",
]

_INT32_MAX = 2**31 - 1


_CONFIG_ENV = "FLEXMOE_TRITON_ROUTING_CONFIG"


@dataclass(frozen=True)
class RoutingConfig:
    """Launch parameters of the routing kernels (all powers of two).

    block_t: tokens per program of the routing, scatter and backward kernels.
    block_nb: token blocks per loop step of the per-expert prefix scan.
    block_es: experts per prefix-scan program (the scan runs on ceil(E / block_es) programs).
    tiles_per_prog: ``block_m`` tiles per program of the tile-expert / sentinel pass.
    num_warps: warps of every routing kernel.
    """

    block_t: int
    block_nb: int
    block_es: int
    tiles_per_prog: int
    num_warps: int = 4


def routing_config(num_tokens: int, num_experts: int, top_k: int, block_m: int) -> RoutingConfig:
    """The launch configuration for a problem size; :data:`FLEXMOE_TRITON_ROUTING_CONFIG`
    (e.g. ``"block_t=16,block_nb=256"``; any subset of the fields) pins fields.

    Heuristic: at most 2048 (token, expert) entries per program (~16 values per thread and
    tensor at 4 warps), prefix scan over E/4 programs in 4096-entry steps, ~2048 padded slots
    per sentinel program. When ``T <= block_t`` the whole routing is one launch.
    """
    T, E, K = num_tokens, num_experts, top_k
    block_e = launch.next_pow2(E)
    block_t = min(128, max(1, 2048 // block_e))
    block_t = max(1, min(block_t, launch.next_pow2(T)))
    nb = launch.cdiv(T, block_t)
    block_es = min(block_e, 4)
    block_nb = max(1, min(launch.next_pow2(nb), 4096 // block_es))
    _, n_tiles_max = schedule_sizes(T, K, E, block_m)
    tiles_per_prog = max(1, min(2048 // block_m, 2048 // block_e, launch.next_pow2(n_tiles_max)))
    fields = dict(block_t=block_t, block_nb=block_nb, block_es=block_es, tiles_per_prog=tiles_per_prog)
    pinned = os.environ.get(_CONFIG_ENV, "").strip()
    if pinned:
        for item in pinned.split(","):
            key, _, val = item.partition("=")
            key = key.strip()
            if key not in RoutingConfig.__dataclass_fields__:
                raise ValueError(
                    f"{_CONFIG_ENV}: unknown field {key!r}; expected any of "
                    f"{sorted(RoutingConfig.__dataclass_fields__)} as 'name=int,...', got {pinned!r}"
                )
            try:
                v = int(val)
            except ValueError:
                raise ValueError(f"{_CONFIG_ENV}: {key} must be an int, got {val!r}") from None
            if v <= 0 or v & (v - 1):
                raise ValueError(f"{_CONFIG_ENV}: {key} must be a positive power of two, got {v}")
            fields[key] = v
    return RoutingConfig(**fields)


def triton_route(logits_TE: torch.Tensor, top_k: int, *, allow_mask: Optional[torch.Tensor] = None,
                 expert_bias: Optional[torch.Tensor] = None, norm_topk_prob: bool = False,
                 block_m: int = 64, validate: bool = True) -> RoutingPlan:
    """Masked softmax-top-k routing and the padded grouped-GEMM schedule, in Triton.

    Args:
        logits_TE: (T, E) router logits, float32/float16/bfloat16 (any strides); upcast to
            float32 inside the kernel.
        top_k: K, 1 <= K <= E.
        allow_mask: None, (E,) bool (same for every token) or (T, E) bool (per token);
            False = expert opted out: logit -inf before the softmax, never selected.
        expert_bias: optional (E,) float; ``min(bias, 0)`` is added to the logits.
        norm_topk_prob: renormalise the K selected weights to sum to 1.
        block_m: tile height of the grouped GEMMs, a power of two in [1, 1024].
        validate: check on the host that every mask row allows >= K experts (one host sync;
            skipped while a CUDA graph is captured). With ``validate=False`` a row allowing
            fewer than K experts gives unspecified (but in-range) ids for its missing slots.

    Returns:
        :class:`~flexmoe_kernels.ops.plan.RoutingPlan` with ``probs_TE`` and a
        :class:`~flexmoe_kernels.ops.plan.TileSchedule`. Three kernel launches (one when ``T`` fits one block of
        :func:`routing_config`, e.g. decode), no host synchronisation (apart from
        ``validate``). ``sorted_pairs_P`` is deterministic and equal to the reference's
        stable sort; ``topk_weights_TK`` is not differentiable (see
        :func:`triton_route_backward`).
    """
    check_tensor(logits_TE, "logits", ndim=2, floating=True)
    T, E = logits_TE.shape
    check_top_k(top_k, E)
    check_positive_int(block_m, "block_m")
    if block_m & (block_m - 1) or block_m > 1024:
        raise ValueError(f"block_m must be a power of two in [1, 1024], got {block_m}")
    device = logits_TE.device
    if expert_bias is not None:
        check_tensor(expert_bias, "expert_bias", shape=(E,), floating=True, device=device)
    allow_mask = normalize_allow_mask(allow_mask, T, E, device)
    K = top_k
    q_max, _ = schedule_sizes(T, K, E, block_m)
    if q_max > _INT32_MAX:
        raise ValueError(
            f"T*K + E*(block_m-1) = {T}*{K} + {E}*{block_m - 1} does not fit int32 pair indices"
        )
    if validate:
        check_allow_mask_rows(allow_mask, K, E)
    launch.check_runnable(device, "triton routing")
    plan = _alloc_plan(T, K, E, block_m, device)
    _launch_routing(plan, logits_TE, allow_mask, expert_bias, bool(norm_topk_prob), routing_config(T, E, K, block_m))
    return plan


def _alloc_plan(T: int, K: int, E: int, block_m: int, device: torch.device) -> RoutingPlan:
    """A plan of uninitialised buffers (every element is written by the routing kernels)."""
    i32, f32 = torch.int32, torch.float32
    q_max, n_tiles_max = schedule_sizes(T, K, E, block_m)
    schedule = TileSchedule(
        padded_pairs_Q=launch.alloc((q_max,), i32, device),
        padded_offsets_E1=launch.alloc((E + 1,), i32, device),
        tile_expert_E_tiles=launch.alloc((n_tiles_max,), i32, device),
        num_tiles=launch.alloc((1,), i32, device),
        block_m=block_m,
    )
    return RoutingPlan(
        topk_ids_TK=launch.alloc((T, K), i32, device),
        topk_weights_TK=launch.alloc((T, K), f32, device),
        counts_E=launch.alloc((E,), i32, device),
        offsets_E1=launch.alloc((E + 1,), i32, device),
        sorted_pairs_P=launch.alloc((T * K,), i32, device),
        inv_sorted_pairs_P=launch.alloc((T * K,), i32, device),
        logits_TE=launch.alloc((T, E), f32, device),
        probs_TE=launch.alloc((T, E), f32, device),
        schedule=schedule,
    )


def _launch_routing(
    plan: RoutingPlan,
    logits_TE: torch.Tensor,
    allow_mask: Optional[torch.Tensor],
    expert_bias: Optional[torch.Tensor],
    norm: bool,
    cfg: RoutingConfig,
) -> None:
    """Fill ``plan``: the softmax-top-k kernel (which does everything when the tokens fit one
    block), else + the per-expert prefix scan + the scatter / padding pass."""
    kern = launch.kernels("routing_kernels")
    T, K, E = plan.num_tokens, plan.top_k, plan.num_experts
    sch = plan.schedule
    block_e, block_k, block_t = launch.next_pow2(E), launch.next_pow2(K), cfg.block_t
    nb = launch.cdiv(T, block_t)
    n_tiles_max = sch.num_tiles_max
    block_counts_NBE = launch.alloc((nb, E), torch.int32, logits_TE.device)  # scratch (unused when nb == 1)
    if allow_mask is not None:
        mask_u8 = allow_mask.view(torch.uint8)
        stride_mt, stride_me = (0, mask_u8.stride(0)) if mask_u8.ndim == 1 else mask_u8.stride()
    else:
        mask_u8, stride_mt, stride_me = logits_TE, 0, 0  # unused pointer
    bias = expert_bias if expert_bias is not None else logits_TE  # unused pointer
    fused = nb == 1  # one block holds every token: a single launch does everything
    outputs = (plan.sorted_pairs_P, plan.inv_sorted_pairs_P, sch.padded_pairs_Q, sch.tile_expert_E_tiles)
    offsets = (plan.offsets_E1, sch.padded_offsets_E1, sch.num_tiles)
    blocks = dict(BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, BLOCK_M=sch.block_m,
                  TILES_PER_PROG=cfg.tiles_per_prog, num_warps=cfg.num_warps)
    if nb > 0:
        kern._topk_softmax_kernel[(nb,)](
            logits_TE, mask_u8, bias,
            plan.topk_ids_TK, plan.topk_weights_TK, plan.probs_TE, plan.logits_TE, block_counts_NBE,
            plan.counts_E, *offsets, *outputs,
            T, E, n_tiles_max,
            logits_TE.stride(0), logits_TE.stride(1), stride_mt, stride_me,
            K=K, HAS_MASK=allow_mask is not None, HAS_BIAS=expert_bias is not None,
            NORM=norm, FUSED=fused, **blocks,
        )
    if not fused:
        kern._block_prefix_kernel[(launch.cdiv(E, cfg.block_es),)](
            block_counts_NBE, plan.counts_E, nb, E,
            BLOCK_NB=cfg.block_nb, BLOCK_ES=cfg.block_es, num_warps=cfg.num_warps,
        )
        n_pad_progs = launch.cdiv(n_tiles_max, cfg.tiles_per_prog)
        kern._scatter_pad_kernel[(nb + n_pad_progs,)](
            plan.topk_ids_TK, block_counts_NBE, plan.counts_E, *offsets, *outputs,
            T, E, nb, n_tiles_max, K=K, **blocks,
        )


def triton_route_backward(
    dweights_TK: torch.Tensor, plan: RoutingPlan, norm_topk_prob: bool = False
) -> torch.Tensor:
    """Gradient of the routing weights w.r.t. the (masked) logits.

    Args:
        dweights_TK: (T, K) float (any float dtype, any strides): dL/d ``plan.topk_weights_TK``.
        plan: the forward's plan from :func:`triton_route` (uses ``topk_ids_TK`` and ``probs_TE``).
        norm_topk_prob: must equal the forward's flag.

    Returns:
        dlogits_TE: (T, E) float32, the exact backward of softmax -> gather top-k (->
        renormalise): ``dz_j = p_j * (h_j - sum_k h_k w_k)`` with ``h`` the weight gradient
        scattered to the selected experts (chained through the renormalisation when
        ``norm_topk_prob``). 0 at disallowed experts. The same tensor is the gradient w.r.t.
        the raw logits and, summed over tokens where ``bias < 0``, w.r.t. ``expert_bias``.
    """
    if not isinstance(plan, RoutingPlan) or plan.probs_TE is None:
        raise TypeError(f"plan must be a RoutingPlan with probs_TE (from triton_route), got {plan!r:.80}")
    T, K = plan.topk_ids_TK.shape
    E = plan.probs_TE.shape[1]
    device = plan.probs_TE.device
    check_tensor(dweights_TK, "dweights", shape=(T, K), floating=True, device=device)
    launch.check_runnable(device, "triton routing")
    kern = launch.kernels("routing_kernels")
    ids_TK, probs_TE = plan.topk_ids_TK.contiguous(), plan.probs_TE.contiguous()
    dlogits_TE = launch.alloc((T, E), torch.float32, device)
    block_e = launch.next_pow2(E)
    cfg = routing_config(T, E, K, 1)
    block_t = max(1, min(cfg.block_t, 2048 // block_e))
    nb = launch.cdiv(T, block_t)
    if nb > 0:
        kern._topk_softmax_bwd_kernel[(nb,)](
            dweights_TK, ids_TK, probs_TE, dlogits_TE,
            T, E, dweights_TK.stride(0), dweights_TK.stride(1),
            K=K, NORM=bool(norm_topk_prob), BLOCK_T=block_t, BLOCK_E=block_e,
            num_warps=cfg.num_warps,
        )
    return dlogits_TE


def tile_schedule_reference(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> TileSchedule:
    """Readable PyTorch reference of the padded schedule (host loops; for tests).

    Args:
        topk_ids_TK: (T, K) integer expert ids.
        num_experts: E.
        block_m: tile height (any positive int here).

    Returns:
        :class:`TileSchedule` of int32 tensors on ``topk_ids_TK``'s device, with the sizes and
        contents documented on :class:`~flexmoe_kernels.ops.plan.TileSchedule`.
    """
    check_tensor(topk_ids_TK, "topk_ids", ndim=2)
    check_positive_int(num_experts, "num_experts")
    check_positive_int(block_m, "block_m")
    T, K = topk_ids_TK.shape
    P = T * K
    q_max, n_tiles_max = schedule_sizes(T, K, num_experts, block_m)
    flat = topk_ids_TK.reshape(-1).tolist()
    padded, padded_offsets, tile_expert = [], [], []
    for e in range(num_experts):
        pairs = [p for p in range(P) if flat[p] == e]  # increasing pair id: stable
        n_padded = -(-len(pairs) // block_m) * block_m
        padded_offsets.append(len(padded))
        padded += pairs + [P] * (n_padded - len(pairs))  # sentinel P in the padding
        tile_expert += [e] * (n_padded // block_m)
    padded_offsets.append(len(padded))
    num_tiles = len(tile_expert)
    padded += [P] * (q_max - len(padded))
    tile_expert += [-1] * (n_tiles_max - num_tiles)
    dev = topk_ids_TK.device
    padded, padded_offsets, tile_expert, num_tiles = (
        torch.tensor(v, dtype=torch.int32, device=dev) for v in (padded, padded_offsets, tile_expert, [num_tiles])
    )
    return TileSchedule(padded, padded_offsets, tile_expert, num_tiles, block_m)
