"""Triton grouped expert GEMMs: SwiGLU up-projection, weighted down-projection + top-k combine,
and their backward (dX, dW, d router weights), driven by a :class:`~flexmoe_kernels.ops.plan.RoutingPlan` with a tile schedule
(from :func:`.routing.triton_route`).

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k, P = T*K pairs
(pair id ``p = t*K + k``), Q_max padded slots, NT tiles of ``block_m`` slots, NFB F-blocks.
Weights use the Hugging Face layout: ``gate_up_E2FD`` (E, 2F, D) with gate rows [0, F) and up
rows [F, 2F), ``down_EDF`` (E, D, F). Kernels live in :mod:`.grouped_gemm_kernels`.

Semantics (equal to :func:`flexmoe_kernels.grouped_swiglu`, the reference):
``out[t] = sum_k w[t, k] * down_e @ (silu(gate_e @ x_t) * (up_e @ x_t))`` with ``e = ids[t, k]``.

* Only the tiles of the plan's schedule do work; experts with no pairs (zero tokens or opted
  out) own no tile, so their weights are never read (NaN there cannot reach any output).
* Accumulation is fp32; ``tl.dot`` runs in the input dtype (fp16 / bf16 / fp32; fp32 uses
  IEEE precision unless ``torch.backends.cuda.matmul.allow_tf32`` is set, like torch).
* Top-k combine: ``deterministic=True`` (the default) writes each pair's weighted row
  ``y_PD`` (input dtype) and sums the K rows of a token in the fixed order k = 0..K-1 (fp32),
  so results are bitwise reproducible; ``deterministic=False`` atomically adds into an fp32
  (T, D) buffer (one fewer launch and no (P, D) buffer; summation order varies run to run).
  Why deterministic is the default: both variants move about the same bytes (deterministic:
  P*D writes + reads of ``y_PD``; atomic: a zeroed fp32 (T, D) buffer, K*T*D read-modify-
  writes in L2, a cast pass), estimated at 1-3% of the layer's forward at FlexOlmo sizes, so
  reproducibility comes at no measurable cost in the model; ScatterMoE, vLLM and SonicMoE
  make the same choice. This estimate is NOT measured yet (no GPU was available).
* Backward: the gate/up pre-activation ``pre_Q2F`` either comes from the forward
  (``keep_preact``: the up kernel's epilogue also stores it; ``2 * F * K * 4`` bytes per token:
  float32, see :func:`up_swiglu`) or is recomputed from ``x`` by the up kernel (pre-activation
  only, float32). The options' bytes and FLOPs per token: docs/DESIGN.md. Then one dh GEMM
  (``dh = dOut @ down_e``, one wide accumulator) applies the SwiGLU backward in its epilogue:
  ``dgate``/``dup``, ``w*h`` (for dW_down) and the router-weight gradient
  ``dw[p] = <dOut_t, y_p> = <dOut_t @ down_e, h_p>`` (per F-block partials summed in a fixed
  order). dX reuses the tile GEMM + combine; dW uses per-expert grouped GEMMs reducing over
  each expert's slots. ``trainable_experts[e] == False`` (frozen): dW[e] is exact zeros, with
  no tile loads or FLOPs for it; dX still flows through it. Zero-pair experts: dW exactly 0.

Kernel variants per config (:mod:`.configs`): ``tma`` reads the expert weights (up, down, dX)
and dW's slot-ordered operand through TMA descriptors where :func:`weight_tma` /
:func:`.launch.tma_supported` allow (else pointer loads: sm_80, old Triton, odd strides);
``persistent`` launches one program per SM looping over the used tiles (:func:`_tile_variant`).

No host synchronisation: grids are sized from the plan's static worst-case buffers (or the SM
count for persistent launches, which read the used-tile count on the device).
Every output/scratch buffer comes from :func:`.launch.alloc` (tests poison it with NaN) except the
atomic path's accumulator, which must start at zero.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..._validate import check_tensor
from ..args import check_expert_weights
from ..plan import RoutingPlan
from . import launch
from .configs import GemmConfig, MoEConfigs, get_configs

__all__ = [
    "configs_for",
    "up_swiglu",
    "down_combine",
    "combine_topk",
    "swiglu_dh_backward",
    "grouped_dw",
    "grouped_swiglu_forward",
    "grouped_swiglu_backward",
]


def _kernels():
    return launch.kernels("grouped_gemm_kernels")


def _check_plan(plan: object, x_TD: torch.Tensor, num_experts: int) -> None:
    if not isinstance(plan, RoutingPlan) or plan.schedule is None:
        raise TypeError(
            f"plan must be a RoutingPlan with a tile schedule (from triton_route), got {type(plan).__name__}"
            + ("" if not isinstance(plan, RoutingPlan) else " without a schedule")
        )
    if plan.num_tokens != x_TD.shape[0]:
        raise ValueError(f"x has {x_TD.shape[0]} rows but the routing plan has T={plan.num_tokens}")
    if plan.num_experts != num_experts:
        raise ValueError(f"the weights have E={num_experts} experts but the routing plan has {plan.num_experts}")
    if plan.schedule.block_m < 16:
        raise ValueError(f"plan.schedule.block_m must be >= 16 for the grouped GEMMs (tl.dot), got {plan.schedule.block_m}")
    if plan.schedule.padded_pairs_Q.device != x_TD.device:
        raise ValueError(f"the routing plan is on {plan.schedule.padded_pairs_Q.device} but x is on {x_TD.device}")


def configs_for(plan: RoutingPlan, x_TD: torch.Tensor, F: int, configs: Optional[MoEConfigs] = None) -> MoEConfigs:
    """The launch configs for this problem (see :func:`.configs.get_configs`) with every
    tile kind's BLOCK_M set to ``plan.schedule.block_m`` (the schedule fixes the tile height)."""
    if configs is None:
        T, D = x_TD.shape
        configs = get_configs(T, D, F, plan.num_experts, plan.top_k, x_TD.dtype, x_TD.device)
    if configs.block_m != plan.schedule.block_m:
        bm = plan.schedule.block_m
        configs = replace(
            configs,
            up=replace(configs.up, BLOCK_M=bm), down=replace(configs.down, BLOCK_M=bm),
            bwd_up=replace(configs.bwd_up, BLOCK_M=bm), bwd_dh=replace(configs.bwd_dh, BLOCK_M=bm),
            bwd_dx=replace(configs.bwd_dx, BLOCK_M=bm),
        )
    return configs


def _launch_kw(cfg: GemmConfig, dtype: torch.dtype) -> dict:
    return dict(
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        INTERPRET=launch.interpreting(), DOT_PREC=launch.dot_precision(dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def weight_tma(cfg: GemmConfig, w: torch.Tensor, s_e: int, s_k: int, s_n: int) -> tuple[bool, bool]:
    """``(tma, kcontig)``: does ``cfg.tma`` hold for an expert weight ``w`` read as (E, KD, N)
    with element strides ``(s_e, s_k, s_n)``? Off where descriptors are unsupported
    (:func:`.launch.tma_supported`: sm_80, old Triton) or the strides / alignment do not suit
    TMA (a contiguous KD (``kcontig``) or N dimension, 16-byte aligned base and strides)."""
    if not (cfg.tma and launch.tma_supported(w.device)):
        return False, False
    if s_k == 1 and launch.tma_compatible(w, (s_e, s_n, 1)):
        return True, True
    if s_n == 1 and launch.tma_compatible(w, (s_e, s_k, 1)):
        return True, False
    return False, False


def _host_descriptor_class():
    """Triton's host-side ``TensorDescriptor`` (``triton.tools.tensor_descriptor``: Triton 3.6 and
    3.9 have it, the interpreter too), or None."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def host_desc(cfg: GemmConfig, tma: bool) -> bool:
    """Does a launch whose operand goes through TMA (``tma``, resolved) get its descriptor from
    the host (``cfg.host_desc`` and a Triton with ``TensorDescriptor``)? Else each program makes
    it on the device (``tl.make_tensor_descriptor``: ~15 ``tensormap.replace``, a 128-byte copy to
    global memory and a fence per program and descriptor)."""
    return bool(tma and cfg.host_desc and _host_descriptor_class() is not None)


def _weight_descriptor(base: torch.Tensor, num_experts: int, KD: int, N: int, s_e: int, s_k: int, s_n: int,
                       cfg: GemmConfig, kcontig: bool):
    """The host descriptor of an expert weight read as (E, KD, N) from ``base`` (element strides
    ``s_e, s_k, s_n``): the same view and block as the kernels' device-side ``_b_desc``."""
    td = _host_descriptor_class()
    if kcontig:
        return td(base, [num_experts, N, KD], [s_e, s_n, 1], [1, cfg.BLOCK_N, cfg.BLOCK_K])
    return td(base, [num_experts, KD, N], [s_e, s_k, 1], [1, cfg.BLOCK_K, cfg.BLOCK_N])


def _tile_variant(cfg: GemmConfig, plan: RoutingPlan, n_cols: int, num_experts: int, tma: bool,
                  device: torch.device) -> tuple[tuple[int], dict]:
    """``(grid, kwargs)`` of a tile kernel over the schedule's NT row tiles x cdiv(n_cols,
    BLOCK_N) column tiles: one program per tile, or with ``cfg.persistent`` at most
    :func:`.launch.num_programs` programs looping over the used tiles (their count is read on
    the device). ``tma``: the weight goes through a descriptor, from the host where
    :func:`host_desc` says so (``HOST_DESC``; the caller passes it), else made on the device
    (the allocator is set)."""
    tiles = plan.schedule.num_tiles_max * launch.cdiv(n_cols, cfg.BLOCK_N)
    grid = (min(tiles, launch.num_programs(device)),) if cfg.persistent else (tiles,)
    host = host_desc(cfg, tma)
    if tma and not host:
        launch.ensure_triton_allocator(device)
    return grid, dict(num_tiles_ptr=plan.schedule.num_tiles, NE=num_experts, TMA=tma, PERSISTENT=cfg.persistent,
                      HOST_DESC=host)


# ------------------------------------------------------------------ forward pieces
def up_swiglu(
    x_TD: torch.Tensor, plan: RoutingPlan, gate_up_E2FD: torch.Tensor, cfg: GemmConfig, *, store_pre: int = 0
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """h_QF = silu(x[token] @ Wg[e].T) * (x[token] @ Wu[e].T) for every slot of the used tiles,
    and/or the pre-activation ``pre_Q2F = [x @ Wg[e].T | x @ Wu[e].T]``.

    ``store_pre``: 0 = h only, 1 = h and pre (the forward keeping it), 2 = pre only (the
    backward's recompute). ``cfg.interleave``: one 2*BLOCK_N-wide accumulator over interleaved
    gate/up rows (:func:`.grouped_gemm_bwd_kernels._up_interleaved_kernel`; same results).
    Returns ``(h_QF, pre_Q2F)``: (Q_max, F) / (Q_max, 2F), None where not stored; rows of used
    tiles are written (padding rows are 0), rows of unused tiles are not. h is in x's dtype;
    the pre-activation is float32 both when the forward keeps it (``store_pre=1``) and for the
    backward's recompute (``store_pre=2``, a transient buffer freed after the dh GEMM):
    rounding gate/up to 16 bits before the SwiGLU backward made the gradients up to 5x less
    accurate than torch's own at bf16 (measured in the interpreter at T=1, K=E: 9 of 40 seeds
    failed the pass rule; 0 of 40 with float32, as with the former fused kernel's fp32
    accumulators), and one dtype makes kept and recomputed gradients bitwise equal.
    """
    T, D = x_TD.shape
    F = gate_up_E2FD.shape[1] // 2
    Q, NT = plan.schedule.padded_pairs_Q.shape[0], plan.schedule.num_tiles_max
    h_QF = launch.alloc((Q, F), x_TD.dtype, x_TD.device) if store_pre != 2 else None
    pre_Q2F = launch.alloc((Q, 2 * F), torch.float32, x_TD.device) if store_pre else None  # see the docstring
    grid = (NT * launch.cdiv(F, cfg.BLOCK_N),)
    if grid[0] == 0:
        return h_QF, pre_Q2F
    h_arg = h_QF if h_QF is not None else pre_Q2F  # a dummy pointer where nothing is stored
    pre_arg = pre_Q2F if pre_Q2F is not None else h_QF
    if cfg.interleave:
        kern, variant = launch.kernels("grouped_gemm_bwd_kernels")._up_interleaved_kernel, {}
    else:  # the plain kernel: TMA weights and the persistent schedule per cfg
        kern = _kernels()._up_swiglu_kernel
        s_e, s_n, s_k = gate_up_E2FD.stride()
        tma, kcontig = weight_tma(cfg, gate_up_E2FD, s_e, s_k, s_n)  # B = W[e].T: (D, F) view
        tma = tma and kcontig  # the kernel's descriptors read weight rows (D contiguous)
        grid, variant = _tile_variant(cfg, plan, F, gate_up_E2FD.shape[0], tma, x_TD.device)
        if variant["HOST_DESC"]:  # gate rows [0, F) and up rows [F, 2F): two (E, F, D) views
            E = gate_up_E2FD.shape[0]
            variant.update(
                wg_hdesc=_weight_descriptor(gate_up_E2FD, E, D, F, s_e, s_k, s_n, cfg, True),
                wu_hdesc=_weight_descriptor(gate_up_E2FD[:, F:], E, D, F, s_e, s_k, s_n, cfg, True),
            )
    kern[grid](
        x_TD, x_TD.stride(0), x_TD.stride(1),
        gate_up_E2FD, *gate_up_E2FD.stride(),
        plan.schedule.padded_pairs_Q, plan.schedule.tile_expert_E_tiles,
        h_arg, h_arg.stride(0), h_arg.stride(1),
        pre_arg, pre_arg.stride(0), pre_arg.stride(1),
        plan.num_pairs, F, D, NT,
        TOP_K=plan.top_k, STORE_PRE=store_pre,
        **_launch_kw(cfg, x_TD.dtype), **variant,
    )
    return h_QF, pre_Q2F


def _tile_gemm_combine(
    a_QK: torch.Tensor,
    plan: RoutingPlan,
    b: torch.Tensor,
    b_strides: tuple[int, int, int],
    N: int,
    out_dtype: torch.dtype,
    *,
    weighted: bool,
    deterministic: bool,
    cfg: GemmConfig,
) -> torch.Tensor:
    """out[t] = sum_k (w[t,k] if weighted) * a_QK[slot(t,k)] @ B[e(t,k)], B[e] a (KD, N) view
    of ``b`` with strides ``b_strides`` = (expert, k, n). Returns (T, N) in ``out_dtype``."""
    T, K = plan.topk_ids_TK.shape
    P, KD = plan.num_pairs, a_QK.shape[1]
    NT = plan.schedule.num_tiles_max
    device = a_QK.device
    kern = _kernels()
    tma, kcontig = weight_tma(cfg, b, *b_strides)
    grid, variant = _tile_variant(cfg, plan, N, b.shape[0], tma, device)
    if variant["HOST_DESC"]:
        variant["b_hdesc"] = _weight_descriptor(b, b.shape[0], KD, N, *b_strides, cfg, kcontig)
    common = dict(TOP_K=K, HAS_WEIGHT=weighted, B_KCONTIG=kcontig, **variant, **_launch_kw(cfg, a_QK.dtype))
    args_head = (a_QK, a_QK.stride(0), a_QK.stride(1), b, *b_strides, plan.topk_weights_TK,
                 plan.schedule.padded_pairs_Q, plan.schedule.tile_expert_E_tiles)
    if not deterministic:
        acc_TN = torch.zeros((T, N), dtype=torch.float32, device=device)  # atomics need zeros
        if grid[0] > 0:
            kern._tile_gemm_scatter_kernel[grid](
                *args_head, acc_TN, acc_TN.stride(0), acc_TN.stride(1), P, N, KD, NT, ATOMIC=True, **common
            )
        return acc_TN if out_dtype == torch.float32 else acc_TN.to(out_dtype)
    y_PN = launch.alloc((P, N), out_dtype, device)
    if grid[0] > 0:
        kern._tile_gemm_scatter_kernel[grid](
            *args_head, y_PN, y_PN.stride(0), y_PN.stride(1), P, N, KD, NT, ATOMIC=False, **common
        )
    return combine_topk(y_PN, T, K, out_dtype)


def combine_topk(y_PN: torch.Tensor, T: int, K: int, out_dtype: torch.dtype) -> torch.Tensor:
    """(T, N) ``out[t] = sum_{k=0..K-1} y_PN[t*K + k]`` in that fixed order, fp32 accumulation."""
    N = y_PN.shape[1]
    out_TN = launch.alloc((T, N), out_dtype, y_PN.device)
    block_n = min(launch.next_pow2(N), 256)
    block_t = max(1, min(launch.next_pow2(T), 4096 // block_n))
    grid = (launch.cdiv(T, block_t), launch.cdiv(N, block_n))
    if grid[0] > 0 and grid[1] > 0:
        _kernels()._combine_kernel[grid](
            y_PN, y_PN.stride(0), y_PN.stride(1), out_TN, out_TN.stride(0), out_TN.stride(1), T, N,
            TOP_K=K, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4,
        )
    return out_TN


def down_combine(
    h_QF: torch.Tensor, plan: RoutingPlan, down_EDF: torch.Tensor, *, deterministic: bool, cfg: GemmConfig
) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * h[slot(t,k)] @ down[e].T -> (T, D) in h's dtype."""
    _, D, _ = down_EDF.shape
    s_e, s_d, s_f = down_EDF.stride()
    return _tile_gemm_combine(
        h_QF, plan, down_EDF, (s_e, s_f, s_d), D, h_QF.dtype, weighted=True, deterministic=deterministic, cfg=cfg
    )


# ------------------------------------------------------------------ backward pieces
def swiglu_dh_backward(
    dout_TD: torch.Tensor,
    plan: RoutingPlan,
    down_EDF: torch.Tensor,
    pre_Q2F: torch.Tensor,
    cfg: GemmConfig,
    *,
    store_hw: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The dh GEMM with the SwiGLU backward in its epilogue, over the used tiles
    (:func:`.grouped_gemm_bwd_kernels._dh_swiglu_bwd_kernel`): ``dh = dOut[token] @ down[e]``
    (one accumulator, ``cfg.BLOCK_N`` columns of F), then from the pre-activation
    ``pre_Q2F`` (Q_max, 2F) (kept by the forward or recomputed by :func:`up_swiglu`):

    Returns:
        dgu_Q2F: (Q_max, 2F) dout's dtype, ``[dgate | dup]`` of each slot (router weight applied).
        hw_QF: (Q_max, F) dout's dtype ``w * h`` (only if ``store_hw``, for dW_down), else None.
        dwp_PN: (P, NFB) float32 partials of ``<dOut_t, y_p>`` per F-block (sum over dim 1).
    """
    _, D, F = down_EDF.shape
    Q, NT, P = plan.schedule.padded_pairs_Q.shape[0], plan.schedule.num_tiles_max, plan.num_pairs
    nfb = launch.cdiv(F, cfg.BLOCK_N)
    dev, dt = dout_TD.device, dout_TD.dtype
    dgu_Q2F = launch.alloc((Q, 2 * F), dt, dev)
    hw_QF = launch.alloc((Q, F), dt, dev) if store_hw else None
    dwp_PN = launch.alloc((P, nfb), torch.float32, dev)
    hw_arg = hw_QF if hw_QF is not None else dgu_Q2F
    s_e, s_d, s_f = down_EDF.stride()
    tma, kcontig = weight_tma(cfg, down_EDF, s_e, s_d, s_f)  # down[e] read as (D, F)
    grid, variant = _tile_variant(cfg, plan, F, down_EDF.shape[0], tma, dev)
    if variant["HOST_DESC"]:
        variant["wd_hdesc"] = _weight_descriptor(down_EDF, down_EDF.shape[0], D, F, s_e, s_d, s_f, cfg, kcontig)
    if grid[0] > 0:
        launch.kernels("grouped_gemm_bwd_kernels")._dh_swiglu_bwd_kernel[grid](
            dout_TD, dout_TD.stride(0), dout_TD.stride(1),
            down_EDF, s_e, s_d, s_f,
            pre_Q2F, pre_Q2F.stride(0), pre_Q2F.stride(1),
            plan.topk_weights_TK,
            plan.schedule.padded_pairs_Q, plan.schedule.tile_expert_E_tiles,
            dgu_Q2F, dgu_Q2F.stride(0), dgu_Q2F.stride(1),
            hw_arg, hw_arg.stride(0), hw_arg.stride(1),
            dwp_PN, dwp_PN.stride(0), dwp_PN.stride(1),
            P, F, D, NT,
            TOP_K=plan.top_k, STORE_HW=store_hw, EPI_SPLIT=max(1, min(8, cfg.BLOCK_N // 32)), B_KCONTIG=kcontig,
            **variant, **_launch_kw(cfg, dt),
        )
    return dgu_Q2F, hw_QF, dwp_PN


def grouped_dw(
    a: torch.Tensor,
    a_gather: bool,
    b: torch.Tensor,
    b_gather: bool,
    plan: RoutingPlan,
    out_dtype: torch.dtype,
    cfg: GemmConfig,
    trainable_E: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-expert ``dW[e] = sum_{slots s of e} A[row_a(s)]^T B[row_b(s)]`` -> (E, R, C).

    ``a`` is (T, R) read at the slot's token if ``a_gather`` else (Q_max, R) read at the slot;
    likewise ``b`` (T or Q_max, C). ``trainable_E``: optional (E,) bool; frozen experts get
    exact zeros without any load. Experts with no pairs get exact zeros. ``cfg.tma``: the
    slot-ordered operand (contiguous rows) is read through a TMA descriptor; when it is ``b``,
    the kernel computes ``dW[e]^T = B^T A`` into the transposed view of the output. That
    operand then goes unmasked from shared memory into the wgmma (masking it in registers
    serialised every wgmma): its padding rows (pair id P) inside the experts' slot ranges must
    be finite (the other operand is 0 there; the dh kernel writes 0 in them). With
    ``cfg.host_desc`` its descriptor is made here on the host where ``cfg.BLOCK_K`` divides
    the schedule's block_m (else by each program, bounded at its expert's end slot).
    """
    E = plan.num_experts
    R, C = a.shape[1], b.shape[1]
    out = launch.alloc((E, R, C), out_dtype, a.device)
    s_oe, s_or, s_oc = out.stride()
    tma = cfg.tma and launch.tma_supported(a.device)
    if tma and (a_gather or not launch.tma_compatible(a, a.stride())):
        if not b_gather and launch.tma_compatible(b, b.stride()):  # swap: dW^T = B^T A
            a, a_gather, b, b_gather, R, C, s_or, s_oc = b, b_gather, a, a_gather, C, R, s_oc, s_or
        else:
            tma = False
    # A host descriptor over all Q_max rows of A where no k-step can pass an expert's end (BLOCK_K
    # divides the schedule's block_m, a multiple of which every expert's slot range is); else
    # each program makes one whose row extent is its expert's end slot.
    host = host_desc(cfg, tma) and plan.schedule.block_m % cfg.BLOCK_K == 0 and a.shape[0] > 0 and R > 0
    variant = dict(A_TMA=tma, HOST_DESC=host)
    if host:
        variant["a_hdesc"] = _host_descriptor_class()(a, [a.shape[0], R], [a.stride(0), 1], [cfg.BLOCK_K, cfg.BLOCK_M])
    elif tma:
        launch.ensure_triton_allocator(a.device)
    grid = (E * launch.cdiv(R, cfg.BLOCK_M) * launch.cdiv(C, cfg.BLOCK_N),)
    tr = trainable_E.to(torch.uint8) if trainable_E is not None else plan.counts_E  # dummy pointer
    if grid[0] > 0:
        _kernels()._grouped_dw_kernel[grid](
            a, a.stride(0), a.stride(1),
            b, b.stride(0), b.stride(1),
            plan.schedule.padded_pairs_Q, plan.schedule.padded_offsets_E1, tr,
            out, s_oe, s_or, s_oc,
            plan.num_pairs, R, C,
            TOP_K=plan.top_k, A_GATHER=a_gather, B_GATHER=b_gather, HAS_TRAINABLE=trainable_E is not None,
            **variant, **_launch_kw(cfg, a.dtype),
        )
    return out


# ------------------------------------------------------------------ functional API
def grouped_swiglu_forward(
    x_TD: torch.Tensor,
    plan: RoutingPlan,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    *,
    deterministic: bool = True,
    configs: Optional[MoEConfigs] = None,
    keep_preact: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mixture output (T, D) in x's dtype (no autograd; see :mod:`.backend` for the layer).

    Args:
        x_TD: (T, D) fp32/fp16/bf16, any strides.
        plan: plan from :func:`.routing.triton_route` for T tokens and E experts (``block_m >= 16``).
        gate_up_E2FD: (E, 2F, D), down_EDF: (E, D, F), x's dtype and device, any strides.
        deterministic: fixed-order top-k combine (default) vs fp32 atomics.
        configs: launch configs (default: :func:`.configs.get_configs`); ``configs.up.interleave``
            selects the interleaved gate/up kernel.
        keep_preact: also return the gate/up pre-activation ``preact_Q2F`` (Q_max, 2F) float32
            (written by the up kernel's epilogue; rows of unused tiles unwritten), to pass
            to :func:`grouped_swiglu_backward`, which then skips its recompute. Costs
            ``2 * F * K * 4`` bytes per token (+ at most ``E * (block_m - 1)`` padding rows).
            The layer sets it from ``configs.up.keep_preact`` (see :mod:`.configs`).

    Returns:
        ``out_TD``, or ``(out_TD, preact_Q2F)`` with ``keep_preact``.
    """
    E, _, F = check_expert_weights(x_TD, gate_up_E2FD, down_EDF)
    _check_plan(plan, x_TD, E)
    launch.check_runnable(x_TD.device, "triton grouped GEMMs")
    cfgs = configs_for(plan, x_TD, F, configs)
    h_QF, pre_Q2F = up_swiglu(x_TD, plan, gate_up_E2FD, cfgs.up, store_pre=1 if keep_preact else 0)
    out_TD = down_combine(h_QF, plan, down_EDF, deterministic=deterministic, cfg=cfgs.down)
    return (out_TD, pre_Q2F) if keep_preact else out_TD


def grouped_swiglu_backward(
    dout_TD: torch.Tensor,
    x_TD: torch.Tensor,
    plan: RoutingPlan,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    *,
    trainable_experts: Optional[torch.Tensor] = None,
    need_dx: bool = True,
    need_dgate_up: bool = True,
    need_ddown: bool = True,
    need_dweights: bool = True,
    deterministic: bool = True,
    configs: Optional[MoEConfigs] = None,
    preact_Q2F: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of :func:`grouped_swiglu_forward` given ``dout_TD`` = dL/d out (T, D).

    Returns ``(dx_TD, dgate_up_E2FD, ddown_EDF, dweights_TK)`` (None where not requested):
    dx in x's dtype, weight gradients in the weights' dtype (frozen / zero-pair experts exact
    zeros), ``dweights_TK`` (T, K) float32 = ``<dOut_t, y_{t,k}>`` (gradient of
    ``plan.topk_weights_TK``).

    ``preact_Q2F``: the float32 pre-activation the forward kept (``keep_preact=True``, same
    plan); None: recomputed here by the up kernel (``configs.bwd_up``, pre-activation only). Why a
    separate recompute GEMM and not the former fused kernel (gate, up and dh accumulated over
    one D loop): three fp32 accumulators forced BLOCK_N = 64 (n64 wgmma, 240 registers); split,
    each GEMM holds one (dh) or two (gate, up) accumulators at the wide tile, the FLOPs are the
    same and the extra traffic is one write and one read of (Q_max, 2F) float32, small
    against the 2*D*2F FLOPs per slot. Kept and recomputed pre-activations are the same
    kernel's float32 output: with ``bwd_up == up`` (the heuristics) the gradients are bitwise
    equal.
    The dh GEMM (``configs.bwd_dh``) applies the SwiGLU backward in its epilogue; no atomics
    anywhere but the dX combine with ``deterministic=False``.
    """
    E, D, F = check_expert_weights(x_TD, gate_up_E2FD, down_EDF)
    _check_plan(plan, x_TD, E)
    check_tensor(dout_TD, "dout", shape=tuple(x_TD.shape), floating=True, device=x_TD.device)
    if dout_TD.dtype != x_TD.dtype:
        dout_TD = dout_TD.to(x_TD.dtype)
    if trainable_experts is not None:
        check_tensor(trainable_experts, "trainable_experts", shape=(E,), dtypes=(torch.bool,), device=x_TD.device)
    launch.check_runnable(x_TD.device, "triton grouped GEMMs")
    if not (need_dx or need_dgate_up or need_ddown or need_dweights):
        return None, None, None, None
    cfgs = configs_for(plan, x_TD, F, configs)
    T, K = plan.topk_ids_TK.shape
    if preact_Q2F is None:
        _, preact_Q2F = up_swiglu(x_TD, plan, gate_up_E2FD, cfgs.bwd_up, store_pre=2)
    else:
        q = plan.schedule.padded_pairs_Q.shape[0]
        check_tensor(preact_Q2F, "preact", shape=(q, 2 * F), dtypes=(torch.float32,), device=x_TD.device)
    dgu_Q2F, hw_QF, dwp_PN = swiglu_dh_backward(dout_TD, plan, down_EDF, preact_Q2F, cfgs.bwd_dh, store_hw=need_ddown)
    dx_TD = dgate_up = ddown = dweights_TK = None
    if need_dweights:
        dweights_TK = dwp_PN.sum(dim=1).view(T, K)
    if need_dx:
        s_e, s_j, s_d = gate_up_E2FD.stride()
        dx_TD = _tile_gemm_combine(
            dgu_Q2F, plan, gate_up_E2FD, (s_e, s_j, s_d), D, x_TD.dtype,
            weighted=False, deterministic=deterministic, cfg=cfgs.bwd_dx,
        )
    if need_dgate_up:
        dgate_up = grouped_dw(dgu_Q2F, False, x_TD, True, plan, gate_up_E2FD.dtype, cfgs.dw, trainable_experts)
    if need_ddown:
        ddown = grouped_dw(dout_TD, True, hw_QF, False, plan, down_EDF.dtype, cfgs.dw, trainable_experts)
    return dx_TD, dgate_up, ddown, dweights_TK

