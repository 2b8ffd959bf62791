"""Triton kernels of the SwiGLU expert backward (the dh GEMM) and of the interleaved gate/up
up-projection (issue 13 items 3-4).

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k, P = T*K routed (token,
slot) pairs with pair id ``p = t*K + k``, Q_max padded pair slots, NT tiles of BLOCK_M slots,
NFB = cdiv(F, BLOCK_N) F-blocks. Schedule (``pairs_ptr``, ``tile_expert_ptr``) and the shared
helpers (:func:`._tile`, :func:`._slot_rows`, :func:`._mma`, :func:`._store_swiglu`,
:func:`._b_desc` / :func:`._b_load`) as in
:mod:`.grouped_gemm_kernels`: a tile whose expert is -1 returns at once, so experts with no
pairs (zero tokens, opted out) launch no work and their weights are never loaded.

Kernels (launchers :func:`~flexmoe_kernels.ops.triton.grouped_gemm.swiglu_dh_backward` and
:func:`~flexmoe_kernels.ops.triton.grouped_gemm.up_swiglu`):

* :func:`_dh_swiglu_bwd_kernel`, grid (NT * NFB,): ``dh = dOut[token] @ down[e]`` for one
  F-block (gathered dOut rows in the A load; ONE fp32 accumulator, so BLOCK_N can be 128-256
  wide; the former fused kernel held three and ran BLOCK_N = 64). Epilogue: the SwiGLU
  backward from the gate/up pre-activation ``pre_Q2F`` (kept by the forward or recomputed by
  the up kernel with ``STORE_PRE=2``): ``h = silu(g) * u``; the router-weight partial
  ``<dh, h>`` of this F-block -> ``dwp_PN[pair, pid_n]`` (summed in a fixed order by the
  launcher: deterministic); ``dh *= w``; ``dgate = dh * u * silu'(g)``, ``dup = dh * silu(g)``
  -> ``dgu_Q2F`` (HF order: gate columns then up columns); ``w * h`` -> ``hw_QF`` (STORE_HW,
  the A operand of dW_down). Plain stores per slot: no atomics, bitwise reproducible. The
  epilogue runs in ``EPI_SPLIT`` chunks of 32 columns (:func:`_swiglu_bwd_epilogue`), the
  down weight comes through a TMA descriptor with ``TMA`` and the tiles are looped over with
  ``PERSISTENT`` (the same variants as the up / down kernels). sm_90a, 128x128x64 w8 s3 (both
  target shapes): n128 wgmma, TMA, 3 buffers, 178 registers with the float32 recomputed
  pre-activation (130 reading a 16-bit kept one), no spill, 98 KB shared memory
  (s4: 4 buffers, 131 KB).
* :func:`_up_interleaved_kernel`, grid (NT * NFB,): the up-projection with ONE (BLOCK_M,
  2*BLOCK_N) accumulator over interleaved gate/up weight rows (column ``2j`` = gate row
  ``f0 + j``, column ``2j + 1`` = up row ``F + f0 + j``), so one ``tl.dot`` of width 2*BLOCK_N
  per k-step instead of two of width BLOCK_N; the epilogue pairs the columns back
  (``tl.reshape`` to (BM, BLOCK_N, 2) + ``tl.split``) and runs the same epilogue as the
  plain kernel (:func:`._store_swiglu`: h and/or the pre-activation in HF order). The
  interleaving is an index map on the HF layout (E, 2F, D), not a copy: each B column is
  still one contiguous weight row of BLOCK_K elements, so the loads move the same bytes as
  the plain kernel's and no interleaved copy of the weights exists (0 extra memory).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .grouped_gemm_kernels import _b_load, _mma, _slot_rows, _store_swiglu, _swizzle, _tile, _weight_src


@triton.jit
def _dh_swiglu_bwd_kernel(
    dout_ptr, stride_ot, stride_od,  # (T, D) x dtype, dL/d out
    wd_ptr, stride_de, stride_dd, stride_df,  # down (E, D, F) x dtype
    pre_ptr, stride_rq, stride_rf,  # (Q_max, 2F) x dtype gate|up pre-activation (rows of used tiles)
    topk_w_ptr,  # (P,) float32 router weight of each pair (= topk_weights_TK flat)
    pairs_ptr,  # (Q_max,) int32 padded pair ids (sentinel P)
    tile_expert_ptr,  # (NT,) int32 expert of each tile, -1 = no work
    dgu_ptr, stride_gq, stride_gf,  # out: [dgate | dup] (Q_max, 2F) x dtype
    hw_ptr, stride_wq, stride_wf,  # out (STORE_HW): w * h (Q_max, F) x dtype
    dwp_ptr, stride_pp, stride_pn,  # out: (P, NFB) float32 partial <dh, h> per F-block
    P, F, D, NT,
    TOP_K: tl.constexpr, STORE_HW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr,
    EPI_SPLIT: tl.constexpr,  # the epilogue runs in EPI_SPLIT chunks of BLOCK_N // EPI_SPLIT columns
    num_tiles_ptr=None,  # PERSISTENT: (1,) int32 tiles in use
    NE=1,  # TMA: number of experts (the descriptor's outer extent)
    TMA: tl.constexpr = False, B_KCONTIG: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
    wd_hdesc=None,  # TMA and HOST_DESC: host descriptor of down viewed (E, D, F) (see _b_desc)
    HOST_DESC: tl.constexpr = False,
):
    nfb = tl.cdiv(F, BLOCK_N)
    if PERSISTENT:  # grid-stride loop over the used tiles (count read on the device: no host sync)
        # down[e] read as the (D, F) B operand (through a TMA descriptor with TMA: see _weight_src)
        wd_desc = _weight_src(wd_hdesc, wd_ptr, NE, D, F, stride_de, stride_dd, stride_df, BLOCK_K, BLOCK_N,
                              B_KCONTIG, TMA, HOST_DESC)
        used = tl.load(num_tiles_ptr)
        for t in range(tl.program_id(0), used * nfb, tl.num_programs(0)):
            pid_m, pid_n = _swizzle(t, used, nfb, GROUP_M)
            _dh_tile(
                pid_m, pid_n, tl.load(tile_expert_ptr + pid_m), dout_ptr, stride_ot, stride_od, wd_ptr, stride_de,
                stride_dd, stride_df, wd_desc, pre_ptr, stride_rq, stride_rf, topk_w_ptr, pairs_ptr, dgu_ptr,
                stride_gq, stride_gf, hw_ptr, stride_wq, stride_wf, dwp_ptr, stride_pp, stride_pn, P, F, D, TOP_K,
                STORE_HW, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET, DOT_PREC, EPI_SPLIT, TMA, B_KCONTIG,
            )
    else:
        pid_m, pid_n, e = _tile(tile_expert_ptr, NT, F, BLOCK_N, GROUP_M)
        if e < 0:  # tile past the used ones: no weight or descriptor is touched
            return
        wd_desc = _weight_src(wd_hdesc, wd_ptr, NE, D, F, stride_de, stride_dd, stride_df, BLOCK_K, BLOCK_N,
                              B_KCONTIG, TMA, HOST_DESC)
        _dh_tile(
            pid_m, pid_n, e, dout_ptr, stride_ot, stride_od, wd_ptr, stride_de, stride_dd, stride_df, wd_desc,
            pre_ptr, stride_rq, stride_rf, topk_w_ptr, pairs_ptr, dgu_ptr, stride_gq, stride_gf, hw_ptr, stride_wq,
            stride_wf, dwp_ptr, stride_pp, stride_pn, P, F, D, TOP_K, STORE_HW, BLOCK_M, BLOCK_N, BLOCK_K,
            INTERPRET, DOT_PREC, EPI_SPLIT, TMA, B_KCONTIG,
        )


@triton.jit
def _dh_tile(
    pid_m, pid_n, e, dout_ptr, stride_ot, stride_od, wd_ptr, stride_de, stride_dd, stride_df, wd_desc,
    pre_ptr, stride_rq, stride_rf, topk_w_ptr, pairs_ptr, dgu_ptr, stride_gq, stride_gf, hw_ptr, stride_wq,
    stride_wf, dwp_ptr, stride_pp, stride_pn, P, F, D,
    TOP_K: tl.constexpr, STORE_HW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr, EPI_SPLIT: tl.constexpr,
    TMA: tl.constexpr, B_KCONTIG: tl.constexpr,
):
    """One (row tile, F-block) of :func:`_dh_swiglu_bwd_kernel` for expert ``e`` (>= 0)."""
    e64 = e.to(tl.int64)
    offs_q, pair, row_ok, tok = _slot_rows(pid_m, pairs_ptr, P, TOP_K, BLOCK_M)  # slots, dOut rows (gathered)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,) columns of F
    n_ok = offs_n < F
    offs_k = tl.arange(0, BLOCK_K)  # (BK,) over D

    do_ptrs = dout_ptr + tok[:, None] * stride_ot + offs_k[None, :] * stride_od  # (BM, BK) gathered rows
    wd_ptrs = wd_ptr + e64 * stride_de + offs_k[:, None] * stride_dd + offs_n[None, :] * stride_df  # (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # dh (router weight not applied yet)
    for k0 in range(0, tl.cdiv(D, BLOCK_K)):
        k_ok = offs_k < D - k0 * BLOCK_K
        do = tl.load(do_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wd = _b_load(wd_ptrs, k_ok[:, None] & n_ok[None, :], wd_desc, e, k0 * BLOCK_K, n0, BLOCK_K, BLOCK_N, TMA,
                     B_KCONTIG)
        acc = _mma(do, wd, acc, INTERPRET, DOT_PREC)
        do_ptrs += BLOCK_K * stride_od
        wd_ptrs += BLOCK_K * stride_dd

    w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)  # (BM,) fp32
    part = _swiglu_bwd_epilogue(
        acc, w, offs_q, row_ok, n0, pre_ptr, stride_rq, stride_rf, dgu_ptr, stride_gq, stride_gf,
        hw_ptr, stride_wq, stride_wf, F, STORE_HW, BLOCK_M, BLOCK_N, EPI_SPLIT,
    )
    tl.store(dwp_ptr + pair.to(tl.int64) * stride_pp + pid_n * stride_pn, part, mask=row_ok)


@triton.jit
def _swiglu_bwd_epilogue(
    acc, w, offs_q, row_ok, n0,  # (BM, W) fp32 dh of columns n0.., (BM,) router weights, slots, real rows
    pre_ptr, stride_rq, stride_rf, dgu_ptr, stride_gq, stride_gf, hw_ptr, stride_wq, stride_wf, F,
    STORE_HW: tl.constexpr, BLOCK_M: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr,
):
    """The SwiGLU backward of W columns of dh, in SPLIT chunks of contiguous columns one after
    the other (recursive halving; the split is in-register for the wgmma layout, and a chunk's
    pre-activation tiles and temporaries die before the next chunk's are loaded: at 128x128
    the whole tile at once spilled, 255 registers + 3.7 KB; 4 chunks: 130, no spill).
    Returns the (BM,) fp32 partial ``<dh, h>`` over these columns."""
    if SPLIT == 1:
        offs_n = n0 + tl.arange(0, W)  # (W,) columns of F
        n_ok = offs_n < F
        q64 = offs_q.to(tl.int64)
        ld_msk = row_ok[:, None] & n_ok[None, :]  # padding rows read nothing (0)
        pre_ptrs = pre_ptr + q64[:, None] * stride_rq + offs_n[None, :] * stride_rf
        g = tl.load(pre_ptrs, mask=ld_msk, other=0.0).to(tl.float32)
        u = tl.load(pre_ptrs + F * stride_rf, mask=ld_msk, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        h = silu * u  # (BM, W) fp32, 0 on padding rows and columns >= F
        # router-weight gradient: <dOut_t, y_p> = <dOut_t @ down_e, h_p>, partial over these columns
        part = tl.sum(acc * h, axis=1)  # (BM,)
        dh = acc * w[:, None]
        du = dh * silu
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        st_msk = (offs_q >= 0)[:, None] & n_ok[None, :]  # every slot of the tile (padding rows get 0)
        dgu_ptrs = dgu_ptr + q64[:, None] * stride_gq + offs_n[None, :] * stride_gf
        tl.store(dgu_ptrs, dg.to(dgu_ptr.dtype.element_ty), mask=st_msk)
        tl.store(dgu_ptrs + F * stride_gf, du.to(dgu_ptr.dtype.element_ty), mask=st_msk)
        if STORE_HW:
            hw_ptrs = hw_ptr + q64[:, None] * stride_wq + offs_n[None, :] * stride_wf
            tl.store(hw_ptrs, (h * w[:, None]).to(hw_ptr.dtype.element_ty), mask=st_msk)
    else:
        a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, W // 2)), (0, 2, 1)))  # column halves
        part = _swiglu_bwd_epilogue(a0, w, offs_q, row_ok, n0, pre_ptr, stride_rq, stride_rf, dgu_ptr, stride_gq,
                                    stride_gf, hw_ptr, stride_wq, stride_wf, F, STORE_HW, BLOCK_M, W // 2, SPLIT // 2)
        part += _swiglu_bwd_epilogue(a1, w, offs_q, row_ok, n0 + W // 2, pre_ptr, stride_rq, stride_rf, dgu_ptr,
                                     stride_gq, stride_gf, hw_ptr, stride_wq, stride_wf, F, STORE_HW, BLOCK_M, W // 2,
                                     SPLIT // 2)
    return part


@triton.jit
def _up_interleaved_kernel(
    x_ptr, stride_xt, stride_xd,  # (T, D) x dtype
    w_ptr, stride_we, stride_wn, stride_wk,  # gate_up (E, 2F, D) x dtype, HF layout (not interleaved)
    pairs_ptr,  # (Q_max,) int32 padded pair ids (sentinel P)
    tile_expert_ptr,  # (NT,) int32 expert of each tile, -1 = no work
    h_ptr, stride_hq, stride_hf,  # STORE_PRE != 2 out: h (Q_max, F) x dtype
    pre_ptr, stride_rq, stride_rf,  # STORE_PRE != 0 out: gate|up pre-activation (Q_max, 2F) x dtype
    P, F, D, NT,
    TOP_K: tl.constexpr, STORE_PRE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # F columns per tile; the accumulator is 2 * BLOCK_N wide
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m, pid_n, e = _tile(tile_expert_ptr, NT, F, BLOCK_N, GROUP_M)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    offs_q, pair, row_ok, tok = _slot_rows(pid_m, pairs_ptr, P, TOP_K, BLOCK_M)  # slots, x rows (gathered)
    offs_c = tl.arange(0, 2 * BLOCK_N)  # (2BN,) interleaved columns: 2j gate, 2j+1 up
    f_c = pid_n * BLOCK_N + offs_c // 2  # (2BN,) F column of each accumulator column
    w_row = (offs_c % 2) * F + f_c  # (2BN,) HF weight row: gate f or up F + f
    c_ok = f_c < F
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd  # (BM, BK)
    w_ptrs = w_ptr + e64 * stride_we + w_row[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # (BK, 2BN)
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(D, BLOCK_K)):
        k_ok = offs_k < D - k0 * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, INTERPRET, DOT_PREC)
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wk

    g, u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))  # (BM, BN) each: pair the columns
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _store_swiglu(g, u, offs_q, offs_n, offs_n < F, h_ptr, stride_hq, stride_hf, pre_ptr, stride_rq, stride_rf,
                  F, STORE_PRE)
