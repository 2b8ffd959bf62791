"""The permutation op: token rows in expert-grouped pair order (``ops/reference/permute.py``,
the grouping ``group_pairs`` of ``ops/reference/routing.py``).

The Triton backend fuses the permutation into the up-projection GEMM (it gathers x rows
through ``plan.schedule.padded_pairs_Q``); its grouping is checked here against the
reference's, and its gathers through the layer tests.

The "cuda" backend's gather (``ops/cuda/permute.py``): wrapper validation (CPU tier) and the
custom op's fake implementation over the emulated ``_C`` (cuda_emulation.py); ``gpu`` tier:
the kernel on poisoned outputs, int64 row offsets.

Legend: T tokens, D hidden, E experts, K top-k, P = T*K pairs (pair id ``p = t*K + k``).
"""
import pytest
import torch
from helpers import DEVICE, check_plan_invariants, make_mask, poison_

import flexmoe_kernels as fk
from flexmoe_kernels.ops.cuda import _ext as cuda_ext
from flexmoe_kernels.ops.cuda import permute as cuda_permute
from flexmoe_kernels.ops.reference.permute import permute_rows
from flexmoe_kernels.ops.reference.routing import group_pairs
from flexmoe_kernels.ops.triton import launch
from flexmoe_kernels.ops.triton import routing as tr

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

TRITON_OK, TRITON_WHY = launch.is_available(DEVICE)


def _plan(T, E, K, mask=None):
    allow = make_mask(mask, T, E, K, device="cpu")
    return fk.route(torch.randn(T, E), K, allow_mask=allow), allow


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,mask", [(1, 4, 2, None), (37, 7, 3, "token"), (20, 6, 2, "global"),
                                        (29, 5, 5, None), (23, 8, 1, "sequence")])
def test_permute_rows_gathers_the_token_of_each_sorted_pair(seed, T, E, K, mask, dtype):
    D = 13
    x = torch.randn(T, D).to(dtype)
    plan, allow = _plan(T, E, K, mask)
    check_plan_invariants(plan, T, K, E, allow)
    x_PD = permute_rows(x, plan)
    assert x_PD.shape == (T * K, D) and x_PD.dtype == dtype
    sorted_p = plan.sorted_pairs_P.long()
    assert torch.equal(x_PD, x[sorted_p // K])  # an exact copy, row i = token of pair sorted_p[i]
    assert torch.equal(plan.sorted_token_ids_P.long(), sorted_p // K)
    ids = plan.topk_ids_TK.long()
    for e in range(E):  # expert e's rows are offsets[e]:offsets[e+1], the tokens that chose e
        s, t = int(plan.offsets_E1[e]), int(plan.offsets_E1[e + 1])
        tokens = [tok for tok in range(T) if e in ids[tok].tolist()]
        assert sorted((sorted_p[s:t] // K).tolist()) == tokens
        assert torch.equal(x_PD[s:t], x[tokens]) if tokens else s == t


def test_inverse_permutation_reads_back_in_pair_order(seed):
    T, E, K, D = 31, 6, 3, 9
    x = torch.randn(T, D)
    plan, _ = _plan(T, E, K, "token")
    x_PD = permute_rows(x, plan)
    inv = plan.inv_sorted_pairs_P.long()
    # pair p = t*K + k sits at sorted position inv[p]
    assert torch.equal(x_PD[inv], x.repeat_interleave(K, 0))
    assert torch.equal(plan.sorted_pairs_P.long()[inv], torch.arange(T * K))
    assert torch.equal(inv[plan.sorted_pairs_P.long()], torch.arange(T * K))


def test_permute_rows_backward_sums_the_K_copies(seed):
    T, E, K, D = 17, 5, 3, 7
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    plan, _ = _plan(T, E, K, "token")
    g = torch.randn(T * K, D, dtype=torch.float64)
    (gx,) = torch.autograd.grad(permute_rows(x, plan), x, g)
    inv = plan.inv_sorted_pairs_P.long()
    ref = torch.stack([sum(g[inv[t * K + k]] for k in range(K)) for t in range(T)])
    torch.testing.assert_close(gx, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("T,E,K", [(0, 4, 2), (1, 1, 1), (9, 12, 2), (40, 7, 4)])
def test_group_pairs_is_a_stable_sort_by_expert(seed, T, E, K):
    """counts / offsets / sorted pairs / inverse against a readable Python sort; experts that
    no pair chose (E > T*K possible) get count 0 and an empty range."""
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    counts, offsets, sorted_p, inv = group_pairs(ids.to(torch.int32), E)
    for v in (counts, offsets, sorted_p, inv):
        assert v.dtype == torch.int32
    flat = ids.flatten().tolist()
    P = T * K
    want = sorted(range(P), key=lambda p: (flat[p], p))
    assert sorted_p.tolist() == want
    assert counts.tolist() == [flat.count(e) for e in range(E)]
    assert offsets.tolist() == [sum(flat.count(j) for j in range(e)) for e in range(E + 1)]
    assert [want.index(p) for p in range(P)] == inv.tolist()


@pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")
@pytest.mark.parametrize("mask", [None, "token"])
def test_triton_plan_permutes_like_the_reference(seed, mask):
    T, E, K, D = 27, 6, 2, 11
    logits = torch.randn(T, E, device=DEVICE)
    allow = make_mask(mask, T, E, K)
    ref = fk.route(logits, K, allow_mask=allow)
    plan = tr.triton_route(logits, K, allow_mask=allow, block_m=4)
    x = torch.randn(T, D, device=DEVICE)
    assert torch.equal(permute_rows(x, plan), permute_rows(x, ref))
    # the schedule's padded slots hold the same pairs, expert by expert, padded with P
    s, P = plan.schedule, T * K
    padded = s.padded_pairs_Q.cpu()
    assert torch.equal(padded[padded != P], plan.sorted_pairs_P.cpu())


# =========================================================================== CUDA gather
# ops/cuda/permute.py: gather_rows (the wrapper of _C.gather_rows), the custom op
# flexmoe_cuda::gather and CudaGatherFunction (whose backward is the unit-weight combine).
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_cuda_gather_rejects_cpu_and_malformed_tensors():
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda_permute.gather_rows(torch.randn(3, 8), torch.arange(6, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="x must have dtype"):
        cuda_permute.gather_rows(torch.zeros(3, 8, dtype=torch.int64), torch.arange(6, dtype=torch.int32), 2)


def test_cuda_gather_wrapper_validation(cuda_glue_device):
    x = torch.randn(3, 8, device=cuda_glue_device)
    with pytest.raises(TypeError, match="sorted_pairs must have dtype"):
        cuda_permute.gather_rows(x, torch.arange(6, device=cuda_glue_device), 2)
    with pytest.raises(ValueError, match="sorted_pairs must have shape"):
        cuda_permute.gather_rows(x, torch.arange(5, device=cuda_glue_device, dtype=torch.int32), 2)


def test_cuda_gather_custom_op_opcheck(emulated_cuda, seed):
    """torch.library.opcheck: schema and fake (meta) implementation of flexmoe_cuda::gather."""
    T, E, K, D = 9, 6, 2, 16
    plan, _ = _plan(T, E, K, "token")
    torch.library.opcheck(torch.ops.flexmoe_cuda.gather, (torch.randn(T, D), plan.sorted_pairs_P, K),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("T,D,K", [(1, 1, 1), (7, 5, 3), (65, 24, 2), (33, 128, 4), (9, 4096, 2)])
def test_cuda_gather_rows_matches_reference(seed, dtype, T, D, K):
    """_C.gather_rows on a poisoned output: row i = x[sorted_pairs[i] // K], an exact copy
    (odd widths: the unaligned path; wide rows: the 16-byte vector path)."""
    C = cuda_ext.extension()
    stream = torch.cuda.current_stream().cuda_stream
    P = T * K
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    sorted_pairs = torch.randperm(P, device="cuda").int()
    x_PD = poison_(torch.empty(P, D, device="cuda", dtype=dtype))
    C.gather_rows(x.data_ptr(), x.element_size(), T, D, sorted_pairs.data_ptr(), P, K, x_PD.data_ptr(), stream)
    assert torch.equal(x_PD, x[sorted_pairs.long() // K])


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_gather_int64_row_offsets():
    """T*K*D > 2^31: rows past 2^31 elements are addressed correctly (about 5 GB of memory)."""
    T, K, D = 1 << 16, 8, 4160
    assert T * K * D > 2**31
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    sp = torch.arange(T * K, device="cuda", dtype=torch.int32).flip(0)  # last pair first
    x_PD = cuda_permute.gather_rows(x, sp, K)
    assert torch.equal(x_PD[:K], x[-1:].expand(K, D))
    assert torch.equal(x_PD[-1], x[0])
    assert torch.equal(x_PD[-K * 3:], x[:3].repeat_interleave(K, 0).flip(0))
    del x_PD
