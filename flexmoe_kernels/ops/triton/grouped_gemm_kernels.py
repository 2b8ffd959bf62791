"""Triton kernels of the grouped expert GEMMs (forward and backward).

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k, P = T*K routed (token,
slot) pairs with pair id ``p = t*K + k``, Q_max padded pair slots (each expert's group padded to
a multiple of BLOCK_M, padding = sentinel pair id P), NT = Q_max // BLOCK_M tiles, NFB F-blocks.

The schedule comes from :mod:`flexmoe_kernels.ops.triton.routing`: ``pairs_ptr`` is
``padded_pairs_Q`` and ``tile_expert_ptr`` is ``tile_expert_E_tiles`` (-1 past the used tiles).
Every tile kernel reads its tile's expert first and returns at once for -1, so experts with
no pairs (zero tokens, opted out) launch no work and their weights are never loaded.

Kernels (launchers in :mod:`flexmoe_kernels.ops.triton.grouped_gemm`):

* :func:`_up_swiglu_kernel`, grid (NT * NFB,) (or persistent, see below): ``x`` rows gathered through the pair ids in the
  A-operand load (no permuted copy of x), ``gate = x @ Wg[e].T`` and ``up = x @ Wu[e].T`` for the
  same F-block, fp32 accumulators. Epilogue (:func:`_store_swiglu`): ``h = silu(gate) * up`` ->
  ``h_QF``, and with ``STORE_PRE`` the pre-activation ``[gate | up]`` -> ``pre_Q2F`` (kept by
  the forward for the backward, or the backward's recompute: ``STORE_PRE=2`` writes only it).
  The backward's dh GEMM with the SwiGLU backward epilogue and the interleaved gate/up variant
  live in :mod:`.grouped_gemm_bwd_kernels`.
* :func:`_tile_gemm_scatter_kernel`, grid (NT * NNB,) (or persistent): ``y = a_Q[tile rows] @ B[e]`` with B an
  arbitrary-stride (KD, N) view of an expert weight; optional router weight in the epilogue;
  combine either by fp32 ``atomic_add`` into ``out[token]`` (ATOMIC) or by a plain store of the
  per-pair row ``y_PN[pair]`` (deterministic; summed by :func:`_combine_kernel`). Used for the
  forward down-projection (A = h, B = down[e].T) and for dX (A = dgu, B = gate_up[e]).
* :func:`_combine_kernel`, grid (cdiv(T, BLOCK_T), cdiv(N, BLOCK_N)): ``out[t] = sum_k
  y[t*K + k]`` in the fixed order k = 0..K-1 (fp32), stored in the output dtype.
* :func:`_grouped_dw_kernel`, grid (E * cdiv(R, BLOCK_M) * cdiv(C, BLOCK_N),): per expert,
  ``dW[e] = A_e^T @ B_e`` reduced over the expert's padded slot range (read from
  ``padded_offsets``, no host sync); either operand may be gathered by token. Frozen experts
  (``trainable[e] == 0``) store a zero tile and return without a load or a FLOP; experts with
  no pairs run zero loop iterations and store exact zeros. The pair ids (the gathered
  operand's row indices) are loaded one k-step ahead into registers, so the operand loads
  are not indirect within an iteration and get the full ``num_stages`` shared-memory ring
  (3 buffers at 3 stages on sm_90a; an in-loop pair-id load cost a stage: 2 buffers).
  ``A_TMA``: the slot-ordered A operand comes through a TMA descriptor (the launcher puts it on
  the A side, transposing the product if needed) and goes from shared memory straight into the
  wgmma: it is NOT masked in registers (zeroing its padding slots there with ``tl.where`` made
  ptxas serialise every wgmma, warning C7515, one full wait per HGMMA). Padding slots
  contribute ``A_pad^T @ 0`` because B is masked on them at its load, so A's padding rows
  must be finite: the dh kernel writes 0 there (the only producer of dW's slot-ordered
  operands). ``HOST_DESC``: the launcher's descriptor over all Q_max rows, used where BLOCK_K
  divides the schedule's block_m (every expert's slot range is a multiple of it, so no k-step
  passes the expert's end); else each program makes one whose row extent is its expert's
  end slot (the next expert's rows read as 0).

Variants of the two tile kernels (constexpr flags; trailing keyword parameters with defaults):

* ``TMA``: the expert weight (B operand) is read through a TMA descriptor, from the host with
  ``HOST_DESC`` (a ``TensorDescriptor`` argument, made once per launch: no device work per
  program), else made by each live program after the dead-tile exit (:func:`_weight_src`)
  (:func:`_b_desc`: a 3-D ``(E, rows, cols)`` view of the weight, block ``(1, BN, BK)`` or
  ``(1, BK, BN)``; out-of-range rows / columns read as 0 and another expert's rows are outside
  the block, exactly as the masked pointer loads) instead of masked pointer loads; the
  gathered A rows stay pointer loads (cp.async). The up kernel makes two descriptors (gate
  rows [0, F) and up rows [F, 2F) as two (E, F, D) views). ``NE`` is the expert count (the
  descriptors' outer extent). Host descriptors need ``triton.tools.tensor_descriptor`` (3.6
  and 3.9; the interpreter takes them too); device-side ones ``tl.make_tensor_descriptor``
  (3.6 and 3.9 compile both for sm_90a) and the allocator the launchers set. A persistent
  program makes its device-side descriptors once, before its tile loop.
* ``PERSISTENT``: the grid is :func:`.launch.num_programs` programs; each loops over tiles
  ``t = pid, pid + num_programs, ...`` below ``num_tiles * NFB`` (``num_tiles_ptr``: the
  schedule's on-device count of used tiles, so no host sync and no -1 tile is visited), in
  the same grouped order as the one-tile-per-program launch.

All row offsets that can exceed 2^31 (token * stride, slot * stride, expert * stride) are int64.
Under ``TRITON_INTERPRET=1`` (``INTERPRET=True``) non-fp32 dot operands are upcast to fp32
(the interpreter's bf16 arithmetic is wrong); compiled, ``tl.dot`` runs in the input dtype
with fp32 accumulation (``DOT_PREC`` = "ieee" or "tf32" for fp32 inputs, following
``torch.backends.cuda.matmul.allow_tf32``).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ("L2 friendly") program order: GROUP_M consecutive row tiles walk the same
    column block, so weight blocks are re-read from L2 instead of HBM."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tile(tile_expert_ptr, NT, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile, its expert) of this program over NT row tiles x cdiv(N, BLOCK_N)
    column tiles (grouped order); the expert is -1 for a row tile past the used ones."""
    pid_m, pid_n = _swizzle(tl.program_id(0), NT, tl.cdiv(N, BLOCK_N), GROUP_M)
    return pid_m, pid_n, tl.load(tile_expert_ptr + pid_m)


@triton.jit
def _slot_rows(pid_m, pairs_ptr, P, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """The BLOCK_M padded slots of row tile ``pid_m``: ``(offs_q, pair, row_ok, tok)`` = slot
    indices, their pair ids (P for padding), real-row mask, int64 token of each (0 for padding)."""
    offs_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    pair = tl.load(pairs_ptr + offs_q)  # (BM,) int32
    row_ok = pair < P
    tok = tl.where(row_ok, pair // TOP_K, 0).to(tl.int64)
    return offs_q, pair, row_ok, tok


@triton.jit
def _mma(a, b, acc, INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc += a @ b with fp32 accumulation (fp32 operands under the interpreter). ``DOT_PREC``
    is "ieee" / "tf32" for fp32 operands, "default" for 16-bit ones (no precision argument)."""
    if INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_PREC == "default":
        out = tl.dot(a, b, acc)
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return out


@triton.jit
def _store_swiglu(
    g, u,  # (BM, BN) fp32 gate / up pre-activation of a tile (0 on padding rows)
    offs_q, offs_n, n_ok,  # (BM,) slots, (BN,) columns of F, (BN,) column < F
    h_ptr, stride_hq, stride_hf,  # STORE_PRE != 2: h (Q_max, F)
    pre_ptr, stride_rq, stride_rf,  # STORE_PRE != 0: gate|up pre-activation (Q_max, 2F)
    F, STORE_PRE: tl.constexpr,
):
    """The up-projection epilogue: ``h = silu(g) * u`` and/or the pre-activation ``[g | u]``
    (HF order: gate columns [0, F), up columns [F, 2F)), every slot of the tile (padding rows
    get 0), in the buffers' dtype. STORE_PRE: 0 = h, 1 = h and pre, 2 = pre only."""
    q64 = offs_q.to(tl.int64)
    st_msk = (offs_q >= 0)[:, None] & n_ok[None, :]  # every slot of the tile
    if STORE_PRE != 2:
        h = g * tl.sigmoid(g) * u
        h_ptrs = h_ptr + q64[:, None] * stride_hq + offs_n[None, :] * stride_hf
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=st_msk)
    if STORE_PRE != 0:
        pre_ptrs = pre_ptr + q64[:, None] * stride_rq + offs_n[None, :] * stride_rf
        tl.store(pre_ptrs, g.to(pre_ptr.dtype.element_ty), mask=st_msk)
        tl.store(pre_ptrs + F * stride_rf, u.to(pre_ptr.dtype.element_ty), mask=st_msk)


@triton.jit
def _b_desc(b_ptr, NE, KD, N, stride_be, stride_bk, stride_bn, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
            KCONTIG: tl.constexpr):
    """Device-side TMA descriptor of an expert weight B viewed (NE, KD, N): with ``KCONTIG`` the
    memory is (NE, N, KD) with KD contiguous (``stride_bk`` must be 1), block (1, BN, BK); else
    (NE, KD, N) with N contiguous (``stride_bn`` must be 1), block (1, BK, BN). Out-of-bounds
    elements read as 0 (other experts' rows are never read)."""
    if KCONTIG:
        desc = tl.make_tensor_descriptor(b_ptr, [NE, N, KD], [stride_be, stride_bn, 1], [1, BLOCK_N, BLOCK_K])
    else:
        desc = tl.make_tensor_descriptor(b_ptr, [NE, KD, N], [stride_be, stride_bk, 1], [1, BLOCK_K, BLOCK_N])
    return desc


@triton.jit
def _weight_src(hdesc, b_ptr, NE, KD, N, stride_be, stride_bk, stride_bn, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr, KCONTIG: tl.constexpr, TMA: tl.constexpr, HOST_DESC: tl.constexpr):
    """Where the B tiles come from (see :func:`_b_load`): with ``TMA`` the launcher's host-side
    descriptor ``hdesc`` (``HOST_DESC``: made once per launch, no device work) or a device-side
    one (:func:`_b_desc`: made by each program that calls this), else the pointer ``b_ptr``."""
    src = b_ptr
    if TMA:
        if HOST_DESC:
            src = hdesc
        else:
            src = _b_desc(b_ptr, NE, KD, N, stride_be, stride_bk, stride_bn, BLOCK_K, BLOCK_N, KCONTIG)
    return src


@triton.jit
def _b_load(b_ptrs, b_msk, desc, e, k, n0, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
            KCONTIG: tl.constexpr):
    """The (BK, BN) B tile of expert ``e`` at rows k.. and columns n0..: through the TMA
    descriptor ``desc`` (see :func:`_b_desc`), else a masked pointer load of ``b_ptrs``."""
    if TMA:
        if KCONTIG:
            b = tl.trans(desc.load([e, n0, k]).reshape(BLOCK_N, BLOCK_K))
        else:
            b = desc.load([e, k, n0]).reshape(BLOCK_K, BLOCK_N)
    else:
        b = tl.load(b_ptrs, mask=b_msk, other=0.0)
    return b


@triton.jit
def _up_tile(
    pid_m, pid_n, e, x_ptr, stride_xt, stride_xd, w_ptr, stride_we, stride_wn, stride_wk, wg_desc, wu_desc,
    pairs_ptr, h_ptr, stride_hq, stride_hf, pre_ptr, stride_rq, stride_rf, P, F, D,
    TOP_K: tl.constexpr, STORE_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):
    """One (row tile, F-block) of :func:`_up_swiglu_kernel` for expert ``e`` (>= 0)."""
    e64 = e.to(tl.int64)
    offs_q, pair, row_ok, tok = _slot_rows(pid_m, pairs_ptr, P, TOP_K, BLOCK_M)  # slots, x rows (gathered)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,) columns of F
    n_ok = offs_n < F
    offs_k = tl.arange(0, BLOCK_K)  # (BK,) over D

    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd  # (BM, BK) gathered rows
    wg_ptrs = w_ptr + e64 * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BK, BN)
    wu_ptrs = wg_ptrs + F * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(D, BLOCK_K)):
        k_ok = offs_k < D - k0 * BLOCK_K
        b_msk = k_ok[:, None] & n_ok[None, :]
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bg = _b_load(wg_ptrs, b_msk, wg_desc, e, k0 * BLOCK_K, n0, BLOCK_K, BLOCK_N, TMA, True)
        bu = _b_load(wu_ptrs, b_msk, wu_desc, e, k0 * BLOCK_K, n0, BLOCK_K, BLOCK_N, TMA, True)
        acc_g = _mma(a, bg, acc_g, INTERPRET, DOT_PREC)
        acc_u = _mma(a, bu, acc_u, INTERPRET, DOT_PREC)
        x_ptrs += BLOCK_K * stride_xd
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    _store_swiglu(acc_g, acc_u, offs_q, offs_n, n_ok, h_ptr, stride_hq, stride_hf, pre_ptr, stride_rq, stride_rf,
                  F, STORE_PRE)


@triton.jit
def _up_swiglu_kernel(
    x_ptr, stride_xt, stride_xd,  # (T, D) x dtype
    w_ptr, stride_we, stride_wn, stride_wk,  # gate_up (E, 2F, D) x dtype
    pairs_ptr,  # (Q_max,) int32 padded pair ids (sentinel P)
    tile_expert_ptr,  # (NT,) int32 expert of each tile, -1 = no work
    h_ptr, stride_hq, stride_hf,  # STORE_PRE != 2 out: h (Q_max, F) x dtype
    pre_ptr, stride_rq, stride_rf,  # STORE_PRE != 0 out: gate|up pre-activation (Q_max, 2F) x dtype
    P, F, D, NT,
    TOP_K: tl.constexpr, STORE_PRE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr,
    DOT_PREC: tl.constexpr,
    num_tiles_ptr=None,  # PERSISTENT: (1,) int32 tiles in use
    NE=1,  # TMA: number of experts (the descriptors' outer extent)
    TMA: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
    wg_hdesc=None, wu_hdesc=None,  # TMA and HOST_DESC: host descriptors of the gate / up (E, F, D) views
    HOST_DESC: tl.constexpr = False,
):
    nfb = tl.cdiv(F, BLOCK_N)
    if PERSISTENT:  # grid-stride loop over the used tiles (count read on the device: no host sync)
        # weights through TMA descriptors: gate rows [0, F) and up rows [F, 2F) as two (E, F, D) views
        wg_desc = _weight_src(wg_hdesc, w_ptr, NE, D, F, stride_we, stride_wk, stride_wn, BLOCK_K, BLOCK_N, True,
                              TMA, HOST_DESC)
        wu_desc = _weight_src(wu_hdesc, w_ptr + F * stride_wn, NE, D, F, stride_we, stride_wk, stride_wn, BLOCK_K,
                              BLOCK_N, True, TMA, HOST_DESC)
        used = tl.load(num_tiles_ptr)
        for t in range(tl.program_id(0), used * nfb, tl.num_programs(0)):
            pid_m, pid_n = _swizzle(t, used, nfb, GROUP_M)
            _up_tile(
                pid_m, pid_n, tl.load(tile_expert_ptr + pid_m), x_ptr, stride_xt, stride_xd, w_ptr, stride_we,
                stride_wn, stride_wk, wg_desc, wu_desc, pairs_ptr, h_ptr, stride_hq, stride_hf, pre_ptr,
                stride_rq, stride_rf, P, F, D, TOP_K, STORE_PRE, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET, DOT_PREC,
                TMA,
            )
    else:
        pid_m, pid_n, e = _tile(tile_expert_ptr, NT, F, BLOCK_N, GROUP_M)
        if e < 0:  # tile past the used ones: nothing to do, no weight or descriptor is touched
            return
        wg_desc = _weight_src(wg_hdesc, w_ptr, NE, D, F, stride_we, stride_wk, stride_wn, BLOCK_K, BLOCK_N, True,
                              TMA, HOST_DESC)
        wu_desc = _weight_src(wu_hdesc, w_ptr + F * stride_wn, NE, D, F, stride_we, stride_wk, stride_wn, BLOCK_K,
                              BLOCK_N, True, TMA, HOST_DESC)
        _up_tile(
            pid_m, pid_n, e, x_ptr, stride_xt, stride_xd, w_ptr, stride_we, stride_wn, stride_wk, wg_desc,
            wu_desc, pairs_ptr, h_ptr, stride_hq, stride_hf, pre_ptr, stride_rq, stride_rf, P, F, D, TOP_K,
            STORE_PRE, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET, DOT_PREC, TMA,
        )


@triton.jit
def _scatter_tile(
    pid_m, pid_n, e, a_ptr, stride_aq, stride_ak, b_ptr, stride_be, stride_bk, stride_bn, b_desc, topk_w_ptr,
    pairs_ptr, out_ptr, stride_or, stride_on, P, N, KD,
    TOP_K: tl.constexpr, HAS_WEIGHT: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr,
    TMA: tl.constexpr, B_KCONTIG: tl.constexpr,
):
    """One (row tile, N-block) of :func:`_tile_gemm_scatter_kernel` for expert ``e`` (>= 0)."""
    e64 = e.to(tl.int64)
    offs_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    pair = tl.load(pairs_ptr + offs_q)  # (BM,) int32
    row_ok = pair < P
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # (BK,)

    a_ptrs = a_ptr + offs_q.to(tl.int64)[:, None] * stride_aq + offs_k[None, :] * stride_ak  # (BM, BK)
    b_ptrs = b_ptr + e64 * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(KD, BLOCK_K)):
        k_ok = offs_k < KD - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = _b_load(b_ptrs, k_ok[:, None] & n_ok[None, :], b_desc, e, k0 * BLOCK_K, n0, BLOCK_K, BLOCK_N, TMA,
                    B_KCONTIG)
        acc = _mma(a, b, acc, INTERPRET, DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_WEIGHT:
        w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)  # (BM,) fp32
        acc = acc * w[:, None]
    msk = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tok = tl.where(row_ok, pair // TOP_K, 0).to(tl.int64)
        tl.atomic_add(out_ptr + tok[:, None] * stride_or + offs_n[None, :] * stride_on, acc, mask=msk)
    else:
        prow = tl.where(row_ok, pair, 0).to(tl.int64)
        o_ptrs = out_ptr + prow[:, None] * stride_or + offs_n[None, :] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _tile_gemm_scatter_kernel(
    a_ptr, stride_aq, stride_ak,  # (Q_max, KD) x dtype, rows in padded-slot order
    b_ptr, stride_be, stride_bk, stride_bn,  # expert weight viewed as (E, KD, N), x dtype
    topk_w_ptr,  # HAS_WEIGHT: (P,) float32 router weight of each pair
    pairs_ptr,  # (Q_max,) int32 padded pair ids (sentinel P)
    tile_expert_ptr,  # (NT,) int32, -1 = no work
    out_ptr, stride_or, stride_on,  # ATOMIC: (T, N) float32 (zeroed); else (P, N) per-pair rows
    P, N, KD, NT,
    TOP_K: tl.constexpr, HAS_WEIGHT: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr,
    DOT_PREC: tl.constexpr,
    num_tiles_ptr=None,  # PERSISTENT: (1,) int32 tiles in use
    NE=1,  # TMA: number of experts (the descriptor's outer extent)
    TMA: tl.constexpr = False,
    B_KCONTIG: tl.constexpr = False,  # TMA: B's KD dimension is the contiguous one (else N)
    PERSISTENT: tl.constexpr = False,
    b_hdesc=None,  # TMA and HOST_DESC: host descriptor of B (see _b_desc for its view and block)
    HOST_DESC: tl.constexpr = False,
):
    nnb = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        b_desc = _weight_src(b_hdesc, b_ptr, NE, KD, N, stride_be, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_KCONTIG,
                             TMA, HOST_DESC)
        used = tl.load(num_tiles_ptr)
        for t in range(tl.program_id(0), used * nnb, tl.num_programs(0)):
            pid_m, pid_n = _swizzle(t, used, nnb, GROUP_M)
            _scatter_tile(
                pid_m, pid_n, tl.load(tile_expert_ptr + pid_m), a_ptr, stride_aq, stride_ak, b_ptr, stride_be,
                stride_bk, stride_bn, b_desc, topk_w_ptr, pairs_ptr, out_ptr, stride_or, stride_on, P, N, KD,
                TOP_K, HAS_WEIGHT, ATOMIC, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET, DOT_PREC, TMA, B_KCONTIG,
            )
    else:
        pid_m, pid_n, e = _tile(tile_expert_ptr, NT, N, BLOCK_N, GROUP_M)
        if e < 0:  # before any descriptor work
            return
        b_desc = _weight_src(b_hdesc, b_ptr, NE, KD, N, stride_be, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_KCONTIG,
                             TMA, HOST_DESC)
        _scatter_tile(
            pid_m, pid_n, e, a_ptr, stride_aq, stride_ak, b_ptr, stride_be, stride_bk, stride_bn, b_desc,
            topk_w_ptr, pairs_ptr, out_ptr, stride_or, stride_on, P, N, KD, TOP_K, HAS_WEIGHT, ATOMIC, BLOCK_M,
            BLOCK_N, BLOCK_K, INTERPRET, DOT_PREC, TMA, B_KCONTIG,
        )


@triton.jit
def _combine_kernel(
    y_ptr, stride_yp, stride_yn,  # (P, N) per-pair rows, any float dtype
    out_ptr, stride_ot, stride_on,  # out (T, N)
    T, N,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    msk = (offs_t < T)[:, None] & (offs_n < N)[None, :]
    t64 = offs_t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k in range(TOP_K):  # fixed order: bitwise reproducible
        rows = t64 * TOP_K + k
        acc += tl.load(y_ptr + rows[:, None] * stride_yp + offs_n[None, :] * stride_yn, mask=msk, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + t64[:, None] * stride_ot + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _grouped_dw_kernel(
    a_ptr, stride_am, stride_ar,  # A rows: (T, R) gathered by token if A_GATHER, else (Q_max, R) by slot
    b_ptr, stride_bm, stride_bc,  # B rows: (T, C) gathered by token if B_GATHER, else (Q_max, C) by slot
    pairs_ptr,  # (Q_max,) int32 padded pair ids (sentinel P)
    poff_ptr,  # (E+1,) int32 padded offsets: expert e owns slots [poff[e], poff[e+1])
    trainable_ptr,  # HAS_TRAINABLE: (E,) uint8, 0 = frozen
    out_ptr, stride_oe, stride_or, stride_oc,  # out (E, R, C) weight-gradient dtype
    P, R, C,
    TOP_K: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr,
    HAS_TRAINABLE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # over R
    BLOCK_N: tl.constexpr,  # over C
    BLOCK_K: tl.constexpr,  # over the expert's slots (the reduction)
    GROUP_M: tl.constexpr, INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr,
    A_TMA: tl.constexpr = False,  # A (slot-ordered, not A_GATHER, unit column stride) through TMA
    a_hdesc=None,  # A_TMA and HOST_DESC: host TensorDescriptor of A (Q_max, R), block (BLOCK_K, BLOCK_M)
    HOST_DESC: tl.constexpr = False,
):
    pid = tl.program_id(0)
    tiles_r = tl.cdiv(R, BLOCK_M)
    tiles_c = tl.cdiv(C, BLOCK_N)
    per_e = tiles_r * tiles_c
    e = pid // per_e
    pid_r, pid_c = _swizzle(pid % per_e, tiles_r, tiles_c, GROUP_M)
    offs_r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    r_ok = offs_r < R
    c_ok = offs_c < C
    o_ptrs = out_ptr + e.to(tl.int64) * stride_oe + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    o_msk = r_ok[:, None] & c_ok[None, :]
    if HAS_TRAINABLE:
        if tl.load(trainable_ptr + e) == 0:  # frozen: exact zeros, no load, no FLOP
            tl.store(o_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=o_msk)
            return

    start = tl.load(poff_ptr + e)
    end = tl.load(poff_ptr + e + 1)
    if A_TMA:
        if HOST_DESC:  # the launcher's: BLOCK_K divides the schedule's block_m, so no k-step passes end
            a_desc = a_hdesc
        else:  # rows >= end (the next expert's slots) are outside the descriptor: read as 0
            a_desc = tl.make_tensor_descriptor(a_ptr, [end, R], [stride_am, 1], [BLOCK_K, BLOCK_M])
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Pair ids are prefetched one k-step ahead in registers (loop-carried): the operand loads
    # then do not depend on a load of the same iteration, so Triton's pipeliner gives them the
    # full num_stages ring instead of spending a stage on the pair-id load.
    pair_next = tl.load(pairs_ptr + start + offs_k, mask=start + offs_k < end, other=P)
    for m0 in range(start, end, BLOCK_K):  # zero iterations for an expert with no pairs
        offs_m = m0 + offs_k  # (BK,) slots
        pair = pair_next
        nxt_m = offs_m + BLOCK_K
        pair_next = tl.load(pairs_ptr + nxt_m, mask=nxt_m < end, other=P)
        ok = pair < P
        slot64 = offs_m.to(tl.int64)
        tok64 = tl.where(ok, pair // TOP_K, 0).to(tl.int64)
        if A_GATHER:
            a_rows = tok64
        else:
            a_rows = slot64
        if B_GATHER:
            b_rows = tok64
        else:
            b_rows = slot64
        if A_TMA:  # NOT masked in registers (that serialised every wgmma: ptxas C7515): the tile
            # goes from shared memory to the wgmma; padding slots contribute A_pad^T @ 0 because
            # B is masked on them, so A's padding rows must be finite (the dh kernel writes 0)
            a = tl.trans(a_desc.load([m0, pid_r * BLOCK_M]))
        else:
            a = tl.load(
                a_ptr + a_rows[None, :] * stride_am + offs_r[:, None] * stride_ar,
                mask=r_ok[:, None] & ok[None, :], other=0.0,
            )  # (BM, BK) = A_e^T tile
        b = tl.load(
            b_ptr + b_rows[:, None] * stride_bm + offs_c[None, :] * stride_bc,
            mask=ok[:, None] & c_ok[None, :], other=0.0,
        )  # (BK, BN)
        acc = _mma(a, b, acc, INTERPRET, DOT_PREC)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_msk)
