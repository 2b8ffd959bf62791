"""The combine op: ``out[t] = sum_k w[t,k] * y[pair(t,k)]``, accumulated in float32.

* reference ``combine_rows`` (``ops/reference/combine.py``): rows in expert-grouped order,
  the plan's weights applied, fp32 accumulation, one rounding to the output dtype,
  gradients to the rows and the weights;
* Triton ``combine_topk`` (``ops/triton/grouped_gemm.py``, the deterministic top-k sum the
  down-projection GEMM ends with): rows in pair order, summed in the fixed order k = 0..K-1
  in fp32 (bitwise reproducible);
* CUDA (``ops/cuda/combine.py``): wrapper validation (CPU tier), the custom ops' fake
  implementations over the emulated ``_C`` (cuda_emulation.py); ``gpu`` tier: the kernels
  (weighted, unit weights, backward) on poisoned outputs, determinism, int64 row offsets.

Legend: T tokens, D / N row width, E experts, K top-k, P = T*K pairs (pair id ``t*K + k``).
"""
import pytest
import torch
from helpers import DEVICE, assert_matches_reference, make_mask, poison_, tol

import flexmoe_kernels as fk
from flexmoe_kernels.ops.cuda import _ext as cuda_ext
from flexmoe_kernels.ops.cuda import combine as cuda_combine
from flexmoe_kernels.ops.reference.combine import combine_rows
from flexmoe_kernels.ops.triton import grouped_gemm as gg
from flexmoe_kernels.ops.triton import launch

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

TRITON_OK, TRITON_WHY = launch.is_available(DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")


def _ulps_from(got: torch.Tensor, ref64: torch.Tensor, abs_sum: torch.Tensor = None, n_terms: int = 0) -> torch.Tensor:
    """|got - ref64| in units of got's dtype spacing at the correctly rounded reference, less
    the worst-case error of an fp32 accumulation of ``n_terms`` terms of absolute sum
    ``abs_sum`` (so "<= 1" means: fp32 accumulation, then one rounding to got's dtype)."""
    r = ref64.to(got.dtype)
    spacing = (torch.nextafter(r.abs(), torch.tensor(float("inf"), dtype=got.dtype)) - r.abs()).double()
    err = (got.double() - ref64).abs()
    if abs_sum is not None:
        err = (err - n_terms * 2.0**-24 * abs_sum).clamp(min=0)
    return err / spacing


# =========================================================================== reference combine_rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,mask,norm", [(1, 4, 2, None, False), (37, 7, 3, "token", False),
                                             (20, 6, 6, None, True), (25, 5, 2, "global", True)])
def test_combine_rows_is_the_weighted_sum_per_token(seed, T, E, K, mask, norm, dtype):
    D = 19
    plan = fk.route(torch.randn(T, E), K, allow_mask=make_mask(mask, T, E, K, device="cpu"), norm_topk_prob=norm)
    y_PD = torch.randn(T * K, D).to(dtype)
    out = combine_rows(y_PD, plan, dtype)
    assert out.shape == (T, D) and out.dtype == dtype
    inv, w = plan.inv_sorted_pairs_P.long(), plan.topk_weights_TK.double()
    terms = [[w[t, k] * y_PD[inv[t * K + k]].double() for k in range(K)] for t in range(T)]
    ref = torch.stack([sum(ts) for ts in terms])
    if dtype == torch.float32:
        assert_matches_reference(out, ref, dtype, "combine_rows")
    else:
        # fp32 accumulation, one rounding: within one ulp of the exact value up to the fp32
        # accumulation's own error (a 16-bit accumulation of K products is off by several)
        abs_sum = torch.stack([sum(v.abs() for v in ts) for ts in terms])
        assert float(_ulps_from(out, ref, abs_sum, K + 1).max()) <= 1.0


def test_combine_rows_accumulates_in_fp32_not_fp16(seed):
    """Many cancelling fp16 terms: fp32 accumulation stays within one fp16 ulp of the exact
    sum, a sequential fp16 accumulation does not (so the test above can fail)."""
    T, E, K, D = 40, 8, 8, 64
    plan = fk.route(torch.randn(T, E), K)
    with torch.no_grad():
        plan.topk_weights_TK.fill_(1.0)  # plain sums: the weights cannot absorb the rounding
    y_PD = (torch.randn(T * K, D) * 100).half()
    out = combine_rows(y_PD, plan, torch.float16)
    inv = plan.inv_sorted_pairs_P.long()
    rows = [[y_PD[inv[t * K + k]] for k in range(K)] for t in range(T)]
    ref = torch.stack([sum(r.double() for r in rs) for rs in rows])
    abs_sum = torch.stack([sum(r.double().abs() for r in rs) for rs in rows])
    assert float(_ulps_from(out, ref, abs_sum, K + 1).max()) <= 1.0
    naive = torch.stack([sum(rs[1:], rs[0]) for rs in rows])  # fp16 += fp16, rounding every step
    assert float(_ulps_from(naive, ref, abs_sum, K + 1).max()) > 1.0


def test_combine_rows_gradients_to_rows_and_weights(seed):
    T, E, K, D = 13, 5, 3, 6
    logits = torch.randn(T, E, requires_grad=True)
    plan = fk.route(logits, K)
    y_PD = torch.randn(T * K, D, requires_grad=True)
    g = torch.randn(T, D)
    gy, gw = torch.autograd.grad(combine_rows(y_PD, plan, torch.float32), (y_PD, plan.topk_weights_TK), g)
    inv, w = plan.inv_sorted_pairs_P.long(), plan.topk_weights_TK.detach()
    sorted_p = plan.sorted_pairs_P.long()
    # d y[i] = w[pair] * g[token of pair], d w[t, k] = <g[t], y[pair (t, k)]>
    torch.testing.assert_close(gy, w.flatten()[sorted_p, None] * g[sorted_p // K])
    torch.testing.assert_close(gw, torch.einsum("tkd,td->tk", y_PD.detach()[inv].view(T, K, D), g))


def test_combine_rows_single_expert_weight_one_is_the_row(seed):
    T, E, D = 9, 4, 5
    plan = fk.route(torch.randn(T, E), 1, norm_topk_prob=True)  # K=1 renormalised: weight exactly 1
    assert torch.equal(plan.topk_weights_TK, torch.ones(T, 1))
    y_PD = torch.randn(T, D)
    assert torch.equal(combine_rows(y_PD, plan, torch.float32), y_PD[plan.inv_sorted_pairs_P.long()])


# =========================================================================== Triton combine_topk
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,K,N", [(1, 1, 7), (40, 3, 300), (17, 8, 64), (5, 2, 1)])
def test_triton_combine_topk_fixed_order_fp32(seed, poisoned_outputs, T, K, N, dtype):
    """Bitwise equal to summing the K rows of each token in the order k = 0..K-1 in fp32 and
    rounding once; several row and column blocks (N=300 > 256, T=40 > the row block)."""
    y = torch.randn(T * K, N + 3, device=DEVICE).to(dtype)[:, 2:N + 2]  # strided rows
    assert T * K == 1 or not y.is_contiguous()
    out = gg.combine_topk(y, T, K, dtype)
    assert out.data_ptr() in {t.data_ptr() for t in poisoned_outputs}
    acc = torch.zeros(T, N, device=DEVICE)
    for k in range(K):
        acc = acc + y[k::K].float()
    assert out.dtype == dtype and out.shape == (T, N)
    if dtype == torch.bfloat16 and launch.interpreting():
        # Triton's interpreter converts fp32 -> bf16 by truncation (compiled: round to
        # nearest even), so there the last bit may differ: within one bf16 ulp of the fp32 sum
        assert float(_ulps_from(out, acc.double()).max()) <= 1.0
    else:
        assert torch.equal(out, acc.to(dtype))
    assert torch.equal(gg.combine_topk(y, T, K, dtype), out)  # reproducible


@needs_triton
def test_triton_combine_topk_output_dtype_and_empty(seed):
    y = torch.randn(6, 4, device=DEVICE).half()
    out = gg.combine_topk(y, 3, 2, torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, y[0::2].float() + y[1::2].float())
    assert gg.combine_topk(torch.randn(0, 4, device=DEVICE), 0, 2, torch.float32).shape == (0, 4)


# =========================================================================== CUDA combine
# ops/cuda/combine.py: combine / combine_backward (the wrappers of _C.combine_forward /
# combine_backward), the custom ops flexmoe_cuda::combine / combine_bwd, CudaCombineFunction.
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_cuda_combine_rejects_cpu_and_malformed_tensors():
    with pytest.raises(ValueError, match="y must be a CUDA tensor"):
        cuda_combine.combine(torch.randn(6, 8), None, torch.arange(6, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="grad_out must be a CUDA tensor"):
        cuda_combine.combine_backward(torch.randn(3, 8), None, None, torch.arange(6, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="y must have dtype"):
        cuda_combine.combine(torch.zeros(6, 8, dtype=torch.float64), None, torch.arange(6, dtype=torch.int32), 2)


def test_cuda_combine_wrapper_validation(cuda_glue_device):
    dev = cuda_glue_device
    with pytest.raises(ValueError, match="y must have T\\*K rows"):
        cuda_combine.combine(torch.randn(7, 8, device=dev), None, torch.arange(7, device=dev, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="weights must have shape"):
        cuda_combine.combine(torch.randn(6, 8, device=dev), torch.rand(2, 3, device=dev),
                             torch.arange(6, device=dev, dtype=torch.int32), 2)


def test_cuda_combine_custom_ops_opcheck(emulated_cuda, seed):
    """torch.library.opcheck: schemas and fake (meta) implementations of flexmoe_cuda::combine /
    combine_bwd (weighted, unit weights, dy only) match the real ops."""
    T, E, K, D = 9, 6, 2, 16
    plan = fk.route(torch.randn(T, E), K, allow_mask=make_mask("token", T, E, K, device="cpu"))
    w, inv = plan.topk_weights_TK, plan.inv_sorted_pairs_P
    ops = torch.ops.flexmoe_cuda
    for op, args in [
        (ops.combine, (torch.randn(T * K, D), w, inv, K)),
        (ops.combine, (torch.randn(T * K, D), None, inv, K)),
        (ops.combine_bwd, (torch.randn(T, D), torch.randn(T * K, D), w, inv, K, True, True)),
        (ops.combine_bwd, (torch.randn(T, D), torch.randn(T * K, D), w, inv, K, False, True)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("T,D,K", [(1, 1, 1), (7, 5, 3), (65, 24, 2), (33, 128, 4), (9, 4096, 2)])
def test_cuda_combine_matches_reference(seed, dtype, T, D, K):
    """_C.combine_forward (weighted and unit weights) and _C.combine_backward on poisoned
    outputs against the fp32 sums of the rows in pair order."""
    C = cuda_ext.extension()
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    stream = torch.cuda.current_stream().cuda_stream
    P = T * K
    sorted_pairs = torch.randperm(P, device="cuda").int()
    inv = torch.empty_like(sorted_pairs)
    inv[sorted_pairs.long()] = torch.arange(P, device="cuda", dtype=torch.int32)

    y = torch.randn(P, D, device="cuda", dtype=dtype)
    w = torch.rand(T, K, device="cuda")
    out = poison_(torch.empty(T, D, device="cuda", dtype=dtype))
    C.combine_forward(y.data_ptr(), code, T, D, K, w.data_ptr(), inv.data_ptr(), out.data_ptr(), stream)
    y_pairs = y.float()[inv.long()].view(T, K, D)
    ref = (w[:, :, None] * y_pairs).sum(1)
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), **tol(dtype))

    ones = poison_(torch.empty(T, D, device="cuda", dtype=dtype))
    C.combine_forward(y.data_ptr(), code, T, D, K, 0, inv.data_ptr(), ones.data_ptr(), stream)
    torch.testing.assert_close(ones.float(), y_pairs.sum(1).to(dtype).float(), **tol(dtype))

    dout = torch.randn(T, D, device="cuda", dtype=dtype)
    dy = poison_(torch.empty(P, D, device="cuda", dtype=dtype))
    dw = poison_(torch.empty(T, K, device="cuda", dtype=torch.float32))
    C.combine_backward(dout.data_ptr(), code, T, D, K, y.data_ptr(), w.data_ptr(), inv.data_ptr(),
                       dy.data_ptr(), dw.data_ptr(), stream)
    ref_dy = torch.empty_like(y)
    ref_dy[inv.long()] = (w.reshape(-1, 1) * dout.float().repeat_interleave(K, 0)).to(dtype)
    torch.testing.assert_close(dy.float(), ref_dy.float(), **tol(dtype))
    ref_dw = (dout.float()[:, None, :] * y_pairs).sum(-1)
    # same fp32 products on both sides; only the summation order differs
    torch.testing.assert_close(dw, ref_dw, atol=1e-5 * D, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_combine_is_deterministic(seed):
    T, D, K = 513, 96, 4
    y = torch.randn(T * K, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, K, device="cuda")
    inv = torch.randperm(T * K, device="cuda").int()
    a = cuda_combine.combine(y, w, inv, K)
    b = cuda_combine.combine(y, w, inv, K)
    assert torch.equal(a, b)
    da = cuda_combine.combine_backward(a, y, w, inv, K)
    db = cuda_combine.combine_backward(a, y, w, inv, K)
    assert torch.equal(da[0], db[0]) and torch.equal(da[1], db[1])


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_combine_int64_row_offsets():
    """T*K*D > 2^31: rows past 2^31 elements are read correctly (about 5 GB of memory)."""
    T, K, D = 1 << 16, 8, 4160
    assert T * K * D > 2**31
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    sp = torch.arange(T * K, device="cuda", dtype=torch.int32).flip(0)  # last pair first
    inv = torch.empty_like(sp)
    inv[sp.long()] = torch.arange(T * K, device="cuda", dtype=torch.int32)
    y_PD = x[sp.long() // K]  # each token's K rows (torch's gather)
    out = cuda_combine.combine(y_PD, None, inv, K)
    torch.testing.assert_close(out[-3:].float(), K * x[-3:].float(), **tol(torch.bfloat16))
    torch.testing.assert_close(out[:3].float(), K * x[:3].float(), **tol(torch.bfloat16))
    del y_PD, out
