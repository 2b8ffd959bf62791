"""Every launch variant of the Triton grouped GEMMs in the interpreter tier (issue 13 item 9):
TMA descriptors on / off (expert weights; dW's slot-ordered operand) x the persistent tile
schedule on / off (and 4 stages), pinned through ``FLEXMOE_TRITON_CONFIG`` as a user would,
each against the float64 reference
(``helpers`` / ``test_layer.check_against_reference``: output, logits and the gradient of every
input and parameter) in fp32 and fp16 on small odd shapes with experts that get no token,
opted-out experts whose weights are NaN (never read), per-token masks, and every launcher
buffer poisoned with NaN before the kernels run (conftest ``poisoned_outputs``).

Each test also records the launches (:func:`launched`) and checks the variant really ran:
``TMA`` / ``PERSISTENT`` as pinned, the persistent grid smaller than the tile count (so a
program loops over several tiles: 3 programs under the interpreter), and TMA resolved off
where a descriptor cannot be made (a 16-bit row of D = 36 elements is not a multiple of 16
bytes; a weight whose contiguous dimension is neither KD nor N).
"""
import pytest
import torch
from helpers import make_problem, record_launches
from test_layer import check_against_reference

from flexmoe_kernels.ops.triton import configs as tc
from flexmoe_kernels.ops.triton import launch

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

TRITON_OK, TRITON_WHY = launch.is_available("cpu")
pytestmark = [pytestmark, pytest.mark.skipif(not TRITON_OK, reason=f"triton unavailable: {TRITON_WHY}")]

# Small blocks: several k-steps and F / D blocks on these shapes; GROUP_M 2 swizzles.
BLOCKS = "BLOCK_M=16,BLOCK_N=16,BLOCK_K=16,GROUP_M=2"
VARIANTS = {
    "tma": "tma=1,persistent=0",  # host-side descriptors (host_desc defaults on)
    "tma-device-desc": "tma=1,persistent=0,host_desc=0",  # each live program makes its descriptors
    "persistent": "tma=0,persistent=1",
    "tma-persistent": "tma=1,persistent=1,num_stages=4",
    "tma-device-desc-persistent": "tma=1,persistent=1,host_desc=0",
    "pointers": "tma=0,persistent=0",
}
# The host-descriptor arguments of each kernel (TMA with host_desc).
HOST_DESC_ARGS = {"_up_swiglu_kernel": ("wg_hdesc", "wu_hdesc"), "_tile_gemm_scatter_kernel": ("b_hdesc",),
                  "_grouped_dw_kernel": ("a_hdesc",)}
TILE_KERNELS = ("_up_swiglu_kernel", "_tile_gemm_scatter_kernel", "_grouped_dw_kernel")


@pytest.fixture
def launched(monkeypatch):
    """The tile-kernel launches of a test: ``[(kernel name, grid, kwargs), ...]`` (they still run)."""
    return record_launches(monkeypatch, TILE_KERNELS)


def _nan_never_allowed(p, E):
    """NaN weights (and router rows) for the experts no token may choose: must never be read."""
    allow = p["allow_mask"]
    never = [e for e in range(E) if not bool(allow.reshape(-1, E)[:, e].any())]
    for e in never:
        for n in ("gate_up", "down", "router_weight"):
            p[n][e] = float("nan")
    return never


def _role(name, kw):
    if name == "_grouped_dw_kernel":
        return "dw"
    return "up" if name == "_up_swiglu_kernel" else ("down" if kw["HAS_WEIGHT"] else "dx")


def _check_variant(launched, pin, *, tma_off=()):
    """Every GEMM launch (up, down, dX, both dW) ran with the pinned flags, TMA resolved off
    for the roles in ``tma_off``, its descriptors from the host unless ``host_desc=0`` (a
    ``TensorDescriptor`` argument per descriptor); a persistent launch has 3 programs (fewer
    than its tiles)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    want_pers = "persistent=1" in pin
    roles = [_role(n, kw) for n, _, kw in launched]
    assert set(roles) == {"up", "down", "dx", "dw"} and roles.count("dw") == 2, roles
    for name, grid, kw in launched:
        want_tma = "tma=1" in pin and _role(name, kw) not in tma_off
        want_host = want_tma and "host_desc=0" not in pin
        assert kw["HOST_DESC"] == want_host, (name, kw)
        assert all(isinstance(kw.get(a), TensorDescriptor) == want_host for a in HOST_DESC_ARGS[name]), (name, kw)
        if name == "_grouped_dw_kernel":  # the slot-ordered operand through TMA; never persistent
            assert kw["A_TMA"] == want_tma, kw
            continue
        assert kw["TMA"] == want_tma and kw["PERSISTENT"] == want_pers, (name, kw)
        if want_pers:
            assert grid == (launch.num_programs(torch.device("cpu")),) == (3,), (name, grid)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_variant_matches_reference(seed, monkeypatch, launched, variant, dtype):
    """fp32 / fp16, T 37 (odd), D 40, F 24 (partial blocks), 7 experts: a per-token mask, expert 5
    opted out with NaN weights, expert 6 never in anyone's top-2 (zero tokens); bias; the
    gradients of x, the router, the bias and both expert weights."""
    T, D, F, E, K = 37, 40, 24, 7, 2
    monkeypatch.setenv(tc.ENV_VAR, f"{BLOCKS},{VARIANTS[variant]}")
    p = make_problem(T, D, F, E, K, dtype, mask="token", bias=True, opted_out=(5,), device="cpu")
    p["expert_bias"][6] = -200.0  # allowed, never chosen
    assert 5 in _nan_never_allowed(p, E)
    check_against_reference(p, [("triton", {"deterministic": variant != "persistent"})])
    _check_variant(launched, VARIANTS[variant])


def test_unsupported_strides_fall_back_to_pointer_loads(seed, monkeypatch, launched):
    """fp16 with D = 36: gate_up rows of 72 bytes (not a multiple of 16: no descriptor), so
    ``tma`` resolves off for the up GEMM and dX (both read gate_up) but stays on for the down
    GEMM (rows of F = 24: 48 bytes) and both dW (slot-ordered rows of 2F / F); the persistent
    schedule stays; results still match."""
    T, D, F, E, K = 13, 36, 24, 5, 2
    variant = "tma-persistent"
    monkeypatch.setenv(tc.ENV_VAR, f"{BLOCKS},{VARIANTS[variant]}")
    p = make_problem(T, D, F, E, K, torch.float16, mask="token", opted_out=(0,), device="cpu")
    _nan_never_allowed(p, E)
    check_against_reference(p, [("triton", {"deterministic": True})])
    _check_variant(launched, VARIANTS[variant], tma_off=("up", "dx"))


@pytest.mark.parametrize("capability,has_api,expected", [((9, 0), True, True), ((8, 0), True, False),
                                                         ((9, 0), False, False)])
def test_tma_supported_only_on_sm90_with_descriptor_api(monkeypatch, capability, has_api, expected):
    """``tma`` resolves off on sm_80 and with a Triton that has no ``tl.make_tensor_descriptor``
    (the device is only asked for its capability: no GPU needed)."""
    import triton.language as tl

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if not has_api:
        monkeypatch.delattr(tl, "make_tensor_descriptor")
    assert launch.tma_supported(torch.device("cuda", 0)) is expected
    assert launch.tma_supported(torch.device("cpu")) is (has_api and launch.interpreting())


def test_triton_allocator_is_set_once_per_thread_and_never_replaced(monkeypatch):
    """Device-side descriptors need Triton's scratch allocator: the launchers set one (torch
    memory) when the launching thread has none, leave a caller's own alone, and do nothing
    off CUDA (the interpreter needs none). Run in a fresh thread: the allocator is a context
    variable, so autograd's backward thread starts without one."""
    import threading

    import triton

    calls = []
    monkeypatch.setattr(triton, "set_allocator", lambda fn: calls.append(fn))

    def run():
        launch.ensure_triton_allocator(torch.device("cpu"))
        assert calls == []
        launch.ensure_triton_allocator(torch.device("cuda", 0))
        assert calls == [launch._triton_scratch]

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert calls == [launch._triton_scratch]
    from triton.runtime._allocation import _allocator

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def run_with_own():
        _allocator.set(mine)
        launch.ensure_triton_allocator(torch.device("cuda", 0))

    t = threading.Thread(target=run_with_own)
    t.start()
    t.join()
    assert calls == [launch._triton_scratch]  # the caller's allocator stayed
