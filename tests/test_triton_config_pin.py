"""``FLEXMOE_TRITON_CONFIG`` is checked against the kernels' limits when it is parsed (issue 21
item 13): every error names the variable, the field, the value and the allowed range, before
any kernel runs (formerly ``BLOCK_N=1048576`` failed inside Triton's interpreter and
``BLOCK_M=4096`` passed the config check and failed in the routing launcher).

Legend: T tokens, D hidden, F expert width, E experts, K top-k.
"""
import pytest
import torch

from flexmoe_kernels.ops.triton import configs as tc

H100 = "NVIDIA H100 80GB HBM3"
FINE = dict(T=32768, D=2048, F=768, E=128, K=8)  # the fine-grained benchmark shape
OLMO = dict(T=16384, D=4096, F=11008, E=7, K=5)  # FlexOlmo-7x7B


def cpu_configs(monkeypatch, pin):
    monkeypatch.setenv(tc.ENV_VAR, pin)
    return tc.get_configs(100, 64, 64, 4, 2, torch.bfloat16, "cpu")


def h100_configs(monkeypatch, pin, shape=FINE):
    monkeypatch.setenv(tc.ENV_VAR, pin)
    return tc.get_configs(shape["T"], shape["D"], shape["F"], shape["E"], shape["K"], torch.bfloat16, "cuda",
                          device_name=H100)


@pytest.mark.parametrize("pin, want", [
    ("BLOCK_N=1048576", r"FLEXMOE_TRITON_CONFIG: BLOCK_N=1048576: .*power of two in \[16, 65536\]"),
    ("BLOCK_M=4096", r"FLEXMOE_TRITON_CONFIG: BLOCK_M=4096: .*power of two in \[16, 1024\].*routing"),
    ("up.BLOCK_M=2048", r"FLEXMOE_TRITON_CONFIG: up.BLOCK_M=2048: .*\[16, 1024\]"),
    ("BLOCK_K=8", r"FLEXMOE_TRITON_CONFIG: BLOCK_K=8: .*power of two in \[16, 65536\]"),
    ("BLOCK_N=24", r"FLEXMOE_TRITON_CONFIG: BLOCK_N=24: BLOCK_N must be a power of two"),
    ("num_warps=64", r"FLEXMOE_TRITON_CONFIG: num_warps=64: .*power of two in \[1, 32\]"),
    ("dw.num_warps=3", r"FLEXMOE_TRITON_CONFIG: dw.num_warps=3: .*power of two in \[1, 32\]"),
    ("num_stages=0", r"FLEXMOE_TRITON_CONFIG: num_stages=0: .*in \[1, 8\]"),
    ("down.num_stages=9", r"FLEXMOE_TRITON_CONFIG: down.num_stages=9: .*in \[1, 8\]"),
    ("GROUP_M=0", r"FLEXMOE_TRITON_CONFIG: GROUP_M=0: .*in \[1, 65536\]"),
    ("tma=2", r"FLEXMOE_TRITON_CONFIG: tma=2: tma must be a bool or 0/1"),
])
def test_field_ranges_are_checked_when_parsed(monkeypatch, pin, want):
    with pytest.raises(ValueError, match=want):
        tc.parse_config_string(pin)
    with pytest.raises(ValueError, match=want):  # the same error from the layer's config lookup
        cpu_configs(monkeypatch, pin)


@pytest.mark.parametrize("pin, want", [
    # a (BLOCK_M, BLOCK_N) accumulator of 2^21 elements: over Triton's 2^20 per tensor
    ("BLOCK_M=1024,BLOCK_N=2048",
     r"FLEXMOE_TRITON_CONFIG: up: BLOCK_M=1024, BLOCK_N=2048 .*accumulator \(BLOCK_M, BLOCK_N\) has 2097152 "
     r"elements.*at most 1048576.*BLOCK_N <= 1024 at BLOCK_M=1024"),
    # the interleaved up kernel's accumulator is 2*BLOCK_N wide
    ("BLOCK_M=1024,up.BLOCK_N=1024,up.interleave=1",
     r"FLEXMOE_TRITON_CONFIG: up: .*BLOCK_N=1024, interleave=1 .*\(BLOCK_M, 2\*BLOCK_N\) has 2097152 elements"),
    ("dw.BLOCK_M=65536,dw.BLOCK_N=16,dw.BLOCK_K=32",
     r"FLEXMOE_TRITON_CONFIG: dw: BLOCK_M=65536, BLOCK_K=32 .*\(BLOCK_M, BLOCK_K\) has 2097152 elements"),
])
def test_tile_sizes_are_checked_against_tritons_tensor_limit(monkeypatch, pin, want):
    with pytest.raises(ValueError, match=want):
        cpu_configs(monkeypatch, pin)


def test_interleave_off_fits_where_interleave_does_not(monkeypatch):
    c = cpu_configs(monkeypatch, "BLOCK_M=1024,up.BLOCK_N=1024")
    assert c.up.BLOCK_N == 1024 and c.block_m == 1024


@pytest.mark.parametrize("pin, want", [
    # down 128x256x64 bf16: 48 KiB per stage; 8 stages keep >= 7 buffers = 344064 B
    ("num_stages=8", r"FLEXMOE_TRITON_CONFIG: up: .*num_stages=8 .*shared memory.*> 232448 B"),
    ("down.num_stages=6", r"FLEXMOE_TRITON_CONFIG: down: .*num_stages=6 .*245760 B.*> 232448 B.*num_stages <= 5"),
    # two (128, 128) fp32 accumulators over 64 threads: 512 registers per thread
    ("num_warps=2", r"FLEXMOE_TRITON_CONFIG: up: .*num_warps=2 .*accumulator.*512 registers per thread.*255"),
])
def test_hardware_bounds_on_the_device(monkeypatch, pin, want):
    with pytest.raises(ValueError, match=want):
        h100_configs(monkeypatch, pin)
    # the interpreter (CPU) has neither bound: the same pin passes there
    cpu_configs(monkeypatch, pin)


def test_shared_memory_bound_uses_the_element_size(monkeypatch):
    """fp32 operands take twice the shared memory of bf16 (a 4-stage fp32 128x128x64 up ring:
    3 x 98304 B, fails; in bf16 it fits)."""
    pin = "BLOCK_M=128,BLOCK_N=128,BLOCK_K=64,num_warps=8,num_stages=4"
    h100_configs(monkeypatch, pin)
    monkeypatch.setenv(tc.ENV_VAR, pin)
    with pytest.raises(ValueError, match="shared memory"):
        tc.get_configs(32768, 2048, 768, 128, 8, torch.float32, "cuda", device_name=H100)


def test_a100_has_less_shared_memory_than_h100(monkeypatch):
    pin = "num_stages=5"  # down 128x256x64 bf16: 4 buffers x 48 KiB = 196608 B: fits sm_90, not sm_80
    h100_configs(monkeypatch, pin)
    monkeypatch.setenv(tc.ENV_VAR, pin)
    with pytest.raises(ValueError, match=r"> 166912 B"):
        tc.get_configs(32768, 2048, 768, 128, 8, torch.bfloat16, "cuda", device_name="NVIDIA A100-SXM4-80GB")


@pytest.mark.parametrize("shape", [FINE, OLMO], ids=["fine-grained", "flexolmo-7x7b"])
def test_every_swept_pin_passes_at_the_target_shapes(monkeypatch, shape):
    """The pins the GPU sweep runs (and the kernel-variant tests' small blocks) stay valid."""
    from benchmarks import gpu_sweep

    pins = list(gpu_sweep.CONFIG_CANDIDATES.values())
    pins += [dict(v.env)[tc.ENV_VAR] for v in gpu_sweep._extra_field_variants(tc, gpu_sweep.SWEPT_FLAGS)]
    assert len(pins) >= 8
    for pin in pins:
        h100_configs(monkeypatch, pin, shape)
    cpu_configs(monkeypatch, "BLOCK_M=16,BLOCK_N=16,BLOCK_K=16,GROUP_M=2,tma=1,persistent=1,num_stages=4")


def test_unpinned_configs_are_not_checked_against_the_pin_bounds(monkeypatch):
    monkeypatch.delenv(tc.ENV_VAR, raising=False)
    c = tc.get_configs(FINE["T"], FINE["D"], FINE["F"], FINE["E"], FINE["K"], torch.bfloat16, "cuda",
                       device_name=H100)
    assert c.block_m == 128 and tc.ENV_VAR not in c.source
