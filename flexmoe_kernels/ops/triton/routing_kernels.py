"""Triton kernels for masked softmax-top-k routing and the grouped GEMM tile schedule.

Legend: T tokens, E experts, K top-k, P = T*K routed (token, slot) pairs, NB token blocks of
BLOCK_T tokens, Q padded pair slots (each expert's group padded to a multiple of BLOCK_M),
NT tiles of BLOCK_M padded slots.

Launch order (see :mod:`flexmoe_kernels.ops.triton.routing` for the launchers):

1. :func:`_topk_softmax_kernel`, grid (NB,): bias + allow-mask -> fp32 softmax -> K passes of
   argmax; writes ids / weights / probs / masked logits and a per-block expert histogram
   (no atomics: every program owns one row of ``block_counts_NBE``).
2. :func:`_block_prefix_kernel`, grid (ceil(E / BLOCK_ES),): each program scans the NB
   histograms of a few experts in block order, turning them (in place) into per-block
   exclusive prefixes, and writes ``counts_E``.
3. :func:`_scatter_pad_kernel`, grid (NB + ceil(NT / TILES_PER_PROG),): every program derives
   the expert offsets from ``counts_E`` (program 0 writes ``offsets_E1``,
   ``padded_offsets_E1``, ``num_tiles``); the first NB programs scatter their pairs to the
   stable expert-grouped order; the others write the per-tile expert ids and the sentinel
   ``P`` into the padding slots.

When all tokens fit one block (NB == 1: decode and other small T) step 1 runs with
``FUSED=True`` and does steps 2-3 itself: one launch in all.

Stable order without atomics: a token selects K *distinct* experts, so the rank of pair
(t, k) inside expert e's group is the number of earlier tokens that selected e, i.e. an
exclusive cumsum over tokens of the (BLOCK_T, BLOCK_E) "selected" matrix plus the counts of
the blocks before (step 2). The result is deterministic and equals a stable sort by expert.

Backward: :func:`_topk_softmax_bwd_kernel`, grid (NB,).

Loops over runtime trip counts are ``while`` loops: Triton 3.6's interpreter cannot turn a
runtime scalar into a Python ``range`` bound with NumPy >= 2.4 (fixed in later Triton).

All index arithmetic that can exceed 2^31 (row offsets t*E, t*K) is done in int64; pair and
slot indices are int32 (the launcher checks that Q_max < 2^31).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _expert_offsets(counts, BLOCK_M: tl.constexpr):
    """counts (BLOCK_E,) int32 -> (offsets, padded starts, padded ends), all (BLOCK_E,) int32."""
    offsets = tl.cumsum(counts, axis=0) - counts
    padded = (counts + (BLOCK_M - 1)) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, axis=0)
    return offsets, pend - padded, pend


@triton.jit
def _store_offsets(
    counts, offsets, pstart, pend, offs_e, e_ok, E,
    offsets_ptr,  # out (E+1,) int32
    padded_offsets_ptr,  # out (E+1,) int32
    num_tiles_ptr,  # out (1,) int32
    BLOCK_M: tl.constexpr,
):
    tl.store(offsets_ptr + offs_e, offsets, mask=e_ok)
    tl.store(offsets_ptr + E, tl.sum(counts, axis=0))
    tl.store(padded_offsets_ptr + offs_e, pstart, mask=e_ok)
    total_padded = tl.max(tl.where(e_ok, pend, 0), axis=0)
    tl.store(padded_offsets_ptr + E, total_padded)
    tl.store(num_tiles_ptr, total_padded // BLOCK_M)


@triton.jit
def _scatter_block(
    ids_tile,  # (BLOCK_T, BLOCK_K) int32 experts of this block's tokens (distinct per row)
    chosen,  # (BLOCK_T, BLOCK_E) int32 1 where token t selected expert e
    offs_t,  # (BLOCK_T,) token ids (int64)
    t_ok,  # (BLOCK_T,) token in range
    offs_e,  # (BLOCK_E,)
    base_e,  # (BLOCK_E,) int32 sorted position of this block's first pair of each expert
    pbase_e,  # (BLOCK_E,) int32 padded position of the same
    sorted_ptr,  # out (P,) int32
    inv_ptr,  # out (P,) int32
    padded_ptr,  # out (Q_max,) int32
    K: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # rank of token t among this block's tokens that selected expert e (stable: by token)
    rank = tl.cumsum(chosen, axis=0) - chosen  # (BLOCK_T, BLOCK_E)
    dst_te = rank + base_e[None, :]
    pdst_te = rank + pbase_e[None, :]
    offs_k = tl.arange(0, BLOCK_K)
    cols = offs_e[None, :]
    for k in range(K):
        id_k = tl.sum(tl.where(offs_k[None, :] == k, ids_tile, 0), axis=1)  # (BLOCK_T,)
        sel = cols == id_k[:, None]
        dst = tl.sum(tl.where(sel, dst_te, 0), axis=1)
        pdst = tl.sum(tl.where(sel, pdst_te, 0), axis=1)
        pair = (offs_t * K + k).to(tl.int32)
        tl.store(sorted_ptr + dst, pair, mask=t_ok)
        tl.store(inv_ptr + pair, dst, mask=t_ok)
        tl.store(padded_ptr + pdst, pair, mask=t_ok)


@triton.jit
def _pad_tiles(
    tile0, NT, P, counts, pstart, pend, offs_e, e_ok,
    padded_ptr,  # out (Q_max,) int32: sentinel P written into padding slots
    tile_expert_ptr,  # out (NT,) int32
    BLOCK_M: tl.constexpr, TILES: tl.constexpr,
):
    """Tile expert ids and sentinels for tiles [tile0, tile0 + TILES)."""
    tiles = tile0 + tl.arange(0, TILES)
    tile_ok = tiles < NT
    start = tiles * BLOCK_M
    # expert of a tile = number of experts whose padded group ends at or before its start
    ends_before = (pend[None, :] <= start[:, None]) & e_ok[None, :]  # (TILES, BLOCK_E)
    ex = tl.sum(ends_before.to(tl.int32), axis=1)
    own = (offs_e[None, :] == ex[:, None]) & e_ok[None, :]  # no owner past the end
    valid = tl.sum(own.to(tl.int32), axis=1) > 0
    tl.store(tile_expert_ptr + tiles, tl.where(valid, ex, -1), mask=tile_ok)
    base = tl.sum(tl.where(own, pstart[None, :], 0), axis=1)
    cnt = tl.sum(tl.where(own, counts[None, :], 0), axis=1)
    q = start[:, None] + tl.arange(0, BLOCK_M)[None, :]  # (TILES, BLOCK_M)
    is_pad = (q - base[:, None]) >= cnt[:, None]
    sentinel = tl.zeros((TILES, BLOCK_M), dtype=tl.int32) + P
    tl.store(padded_ptr + q, sentinel, mask=is_pad & tile_ok[:, None])


@triton.jit
def _topk_softmax_kernel(
    logits_ptr,  # (T, E) fp32/fp16/bf16/fp64, strides (stride_lt, stride_le)
    mask_ptr,  # (T, E) uint8 (bool viewed as bytes), strides (stride_mt, stride_me); stride_mt=0 for (E,)
    bias_ptr,  # (E,) any float; min(b, 0) is added (NaN stays NaN)
    ids_ptr,  # out (T, K) int32, contiguous
    weights_ptr,  # out (T, K) float32, contiguous
    probs_ptr,  # out (T, E) float32, contiguous
    zout_ptr,  # out (T, E) float32 masked logits, contiguous
    block_counts_ptr,  # out (NB, E) int32 expert histogram of each token block (not FUSED)
    # FUSED only (NB == 1): the schedule outputs, see _scatter_pad_kernel
    counts_ptr,  # out (E,) int32
    offsets_ptr,  # out (E+1,) int32
    padded_offsets_ptr,  # out (E+1,) int32
    num_tiles_ptr,  # out (1,) int32
    sorted_ptr,  # out (P,) int32
    inv_ptr,  # out (P,) int32
    padded_ptr,  # out (Q_max,) int32
    tile_expert_ptr,  # out (NT,) int32
    T,
    E,
    NT,
    stride_lt,
    stride_le,
    stride_mt,
    stride_me,
    K: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
    FUSED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, TILES_PER_PROG: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) int64
    offs_e = tl.arange(0, BLOCK_E)  # (BLOCK_E,)
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    t_ok = offs_t < T
    e_ok = offs_e < E
    ok = t_ok[:, None] & e_ok[None, :]  # (BLOCK_T, BLOCK_E)

    z = tl.load(
        logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :] * stride_le, mask=ok, other=0.0
    ).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
        # min(b, 0) that keeps a NaN bias NaN (tl.minimum may return the other operand)
        z = z + tl.where(b > 0.0, 0.0, b)[None, :]
    allowed = ok
    if HAS_MASK:
        m = tl.load(
            mask_ptr + offs_t[:, None] * stride_mt + offs_e[None, :] * stride_me, mask=ok, other=0
        )
        allowed = allowed & (m != 0)
    z = tl.where(allowed, z, float("-inf"))
    out_off = offs_t[:, None] * E + offs_e[None, :]
    tl.store(zout_ptr + out_off, z, mask=ok)

    # Softmax over the allowed experts in fp32 (disallowed: exp(-inf) = 0).
    row_max = tl.max(z, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # fully masked row: no NaN
    num = tl.exp(z - row_max[:, None])
    den = tl.sum(num, axis=1)
    den = tl.where(den == 0.0, 1.0, den)
    probs = num / den[:, None]
    tl.store(probs_ptr + out_off, probs, mask=ok)

    # K passes of argmax on the masked logits (softmax is monotone, so this is top-k of the
    # probabilities without ties created by rounding/underflow). Exact ties: lower expert id.
    cols = offs_e[None, :]  # (1, BLOCK_E)
    avail = allowed  # allowed and not yet selected
    unused = ok  # in range and not yet selected
    ids_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    w_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in range(K):
        kmax = tl.max(tl.where(avail, z, float("-inf")), axis=1)
        cand = avail & (z == kmax[:, None])
        idx = tl.min(tl.where(cand, cols, BLOCK_E), axis=1)
        # No candidate: NaN logits (take the lowest allowed expert) or a row allowing fewer than
        # K experts with validate=False (unspecified: lowest unused expert, but in range).
        fb_allowed = tl.min(tl.where(avail, cols, BLOCK_E), axis=1)
        fb_any = tl.min(tl.where(unused, cols, BLOCK_E), axis=1)
        idx = tl.where(idx == BLOCK_E, tl.where(fb_allowed == BLOCK_E, fb_any, fb_allowed), idx)
        sel = cols == idx[:, None]  # (BLOCK_T, BLOCK_E); all False for rows past T
        w = tl.sum(tl.where(sel, probs, 0.0), axis=1)
        avail = avail & (~sel)
        unused = unused & (~sel)
        ids_tile = tl.where(offs_k[None, :] == k, idx[:, None], ids_tile)
        w_tile = tl.where(offs_k[None, :] == k, w[:, None], w_tile)
    if NORM:
        w_sum = tl.where(t_ok, tl.sum(w_tile, axis=1), 1.0)  # rows past T: avoid 0/0
        w_tile = w_tile / w_sum[:, None]

    tk_ok = t_ok[:, None] & (offs_k[None, :] < K)
    tk_off = offs_t[:, None] * K + offs_k[None, :]
    tl.store(ids_ptr + tk_off, ids_tile, mask=tk_ok)
    tl.store(weights_ptr + tk_off, w_tile, mask=tk_ok)
    chosen = (ok & (~unused)).to(tl.int32)  # (BLOCK_T, BLOCK_E) selected experts
    hist = tl.sum(chosen, axis=0)  # (BLOCK_E,)
    if FUSED:
        # The whole batch is this block: its histogram is counts_E, block prefix 0.
        tl.store(counts_ptr + offs_e, hist, mask=e_ok)
        offsets, pstart, pend = _expert_offsets(hist, BLOCK_M)
        _store_offsets(hist, offsets, pstart, pend, offs_e, e_ok, E,
                       offsets_ptr, padded_offsets_ptr, num_tiles_ptr, BLOCK_M)
        _scatter_block(ids_tile, chosen, offs_t, t_ok, offs_e, offsets, pstart,
                       sorted_ptr, inv_ptr, padded_ptr, K, BLOCK_K)
        tile0 = 0
        while tile0 < NT:  # not range(NT): see the module docstring
            _pad_tiles(tile0, NT, T * K, hist, pstart, pend, offs_e, e_ok,
                       padded_ptr, tile_expert_ptr, BLOCK_M, TILES_PER_PROG)
            tile0 += TILES_PER_PROG
    else:
        tl.store(block_counts_ptr + pid.to(tl.int64) * E + offs_e, hist, mask=e_ok)


@triton.jit
def _block_prefix_kernel(
    block_counts_ptr,  # in/out (NB, E) int32: per-block histogram in, per-block exclusive prefix out
    counts_ptr,  # out (E,) int32 total pairs per expert
    NB,
    E,
    BLOCK_NB: tl.constexpr,
    BLOCK_ES: tl.constexpr,  # experts per program
):
    # Program i owns experts [i*BLOCK_ES, (i+1)*BLOCK_ES) and scans the NB blocks in order.
    offs_e = tl.program_id(0) * BLOCK_ES + tl.arange(0, BLOCK_ES)
    e_ok = offs_e < E
    carry = tl.zeros((BLOCK_ES,), dtype=tl.int32)
    start = 0
    while start < NB:  # not range(NB): see the module docstring
        offs_b = start + tl.arange(0, BLOCK_NB)
        msk = (offs_b < NB)[:, None] & e_ok[None, :]
        ptrs = block_counts_ptr + offs_b.to(tl.int64)[:, None] * E + offs_e[None, :]
        c = tl.load(ptrs, mask=msk, other=0)
        tot = tl.sum(c, axis=0)
        # exclusive prefix = block total - inclusive suffix (the forward form, incl - c, made
        # ptxas spill 24 B with Triton's --regAllocOptLevel=2 at BLOCK_NB 128, BLOCK_ES 4: E = 7, 8)
        tl.store(ptrs, carry[None, :] + tot[None, :] - tl.cumsum(c, axis=0, reverse=True), mask=msk)
        carry += tot
        start += BLOCK_NB
    tl.store(counts_ptr + offs_e, carry, mask=e_ok)


@triton.jit
def _scatter_pad_kernel(
    ids_ptr,  # (T, K) int32 experts of each token (distinct per row), contiguous
    block_prefix_ptr,  # (NB, E) int32 pairs of expert e in the token blocks before block b
    counts_ptr,  # (E,) int32
    offsets_ptr,  # out (E+1,) int32 exclusive prefix sum of counts
    padded_offsets_ptr,  # out (E+1,) int32 exclusive prefix sum of counts rounded up to BLOCK_M
    num_tiles_ptr,  # out (1,) int32
    sorted_ptr,  # out (P,) int32 pair ids grouped by expert (stable)
    inv_ptr,  # out (P,) int32 inverse permutation
    padded_ptr,  # out (Q_max,) int32 padded grouped pair ids, sentinel P in padding
    tile_expert_ptr,  # out (NT,) int32 expert of each BLOCK_M tile, -1 past the end
    T,
    E,
    NB,
    NT,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, TILES_PER_PROG: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    # Every program derives the (tiny) expert offsets from counts_E itself.
    counts = tl.load(counts_ptr + offs_e, mask=e_ok, other=0)
    offsets, pstart, pend = _expert_offsets(counts, BLOCK_M)
    if pid == 0:
        _store_offsets(counts, offsets, pstart, pend, offs_e, e_ok, E,
                       offsets_ptr, padded_offsets_ptr, num_tiles_ptr, BLOCK_M)
    if pid < NB:
        offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        offs_k = tl.arange(0, BLOCK_K)
        tk_ok = t_ok[:, None] & (offs_k[None, :] < K)
        ids_tile = tl.load(ids_ptr + offs_t[:, None] * K + offs_k[None, :], mask=tk_ok, other=-1)
        chosen = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
        for k in range(K):
            id_k = tl.sum(tl.where(offs_k[None, :] == k, ids_tile, 0), axis=1)
            chosen += ((offs_e[None, :] == id_k[:, None]) & t_ok[:, None]).to(tl.int32)
        prefix = tl.load(block_prefix_ptr + pid.to(tl.int64) * E + offs_e, mask=e_ok, other=0)
        _scatter_block(ids_tile, chosen, offs_t, t_ok, offs_e, offsets + prefix, pstart + prefix,
                       sorted_ptr, inv_ptr, padded_ptr, K, BLOCK_K)
    else:
        _pad_tiles((pid - NB) * TILES_PER_PROG, NT, T * K, counts, pstart, pend, offs_e, e_ok,
                   padded_ptr, tile_expert_ptr, BLOCK_M, TILES_PER_PROG)


@triton.jit
def _topk_softmax_bwd_kernel(
    dw_ptr,  # (T, K) any float, strides (stride_gt, stride_gk): dL/d topk_weights
    ids_ptr,  # (T, K) int32 contiguous
    probs_ptr,  # (T, E) float32 contiguous (0 where disallowed)
    dz_ptr,  # out (T, E) float32 contiguous: dL/d logits
    T,
    E,
    stride_gt,
    stride_gk,
    K: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    t_ok = offs_t < T
    ok = t_ok[:, None] & (offs_e < E)[None, :]
    cols = offs_e[None, :]
    probs = tl.load(probs_ptr + offs_t[:, None] * E + cols, mask=ok, other=0.0)

    # w_k = probs[t, id_k]; with NORM the weights are w_k / S, S = sum_k w_k, and
    # dL/dw_k = (g_k - sum_m g_m w_m / S) / S.
    S = tl.zeros((BLOCK_T,), dtype=tl.float32)
    gw = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if NORM:
        for k in range(K):
            idk = tl.load(ids_ptr + offs_t * K + k, mask=t_ok, other=-1)
            gk = tl.load(dw_ptr + offs_t * stride_gt + k * stride_gk, mask=t_ok, other=0.0).to(tl.float32)
            wk = tl.sum(tl.where(cols == idk[:, None], probs, 0.0), axis=1)
            S += wk
            gw += gk * wk
        S = tl.where(t_ok, S, 1.0)
    # dz_j = p_j * (H_j - sum_k h_k w_k), H_j = h_k if j = id_k else 0.
    H = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in range(K):
        idk = tl.load(ids_ptr + offs_t * K + k, mask=t_ok, other=-1)
        gk = tl.load(dw_ptr + offs_t * stride_gt + k * stride_gk, mask=t_ok, other=0.0).to(tl.float32)
        sel = cols == idk[:, None]
        wk = tl.sum(tl.where(sel, probs, 0.0), axis=1)
        if NORM:
            hk = (gk - gw / S) / S
        else:
            hk = gk
        H = tl.where(sel, H + hk[:, None], H)
        s += hk * wk
    dz = probs * (H - s[:, None])
    tl.store(dz_ptr + offs_t[:, None] * E + cols, dz, mask=ok)
