"""Shared test setup: Triton's interpreter on CPU-only machines, the `gpu` tier, fixtures.

The helpers (tolerance table, poisoning, masks, the float64 reference, the pass rule) live
in ``helpers.py`` (``from helpers import ...``). The CPU emulation of
the CUDA extension is ``cuda_emulation.py``; its fixtures ``emulated_cuda`` and
``cuda_glue_device`` are registered here.
"""
from __future__ import annotations

import os

import torch

# Once, before anything imports the Triton kernel modules (Triton reads TRITON_INTERPRET
# when a kernel is created): on a machine without CUDA the "triton" backend then runs on CPU
# tensors under the interpreter (the CPU tier of the Triton tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cuda_emulation import cuda_glue_device, emulated_cuda  # noqa: E402,F401  (fixtures)
from helpers import poison_  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu tier: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread is faster and immune to CPU oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def seed():
    """A fresh seed each run (printed on failure) so inputs are never the same fixed tensor."""
    import random

    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer the Triton launchers allocate (``flexmoe_kernels.ops.triton.launch.alloc``)
    starts NaN / INT_MAX, so an element no kernel writes fails the comparisons. Returns the
    list of the buffers allocated during the test. Also clears the Triton GEMM config pin and
    the deterministic default so each test starts from the defaults."""
    from flexmoe_kernels.ops.triton import launch

    allocated = []

    def alloc(shape, dtype, device):
        t = poison_(torch.empty(shape, dtype=dtype, device=device))
        allocated.append(t)
        return t

    monkeypatch.setattr(launch, "alloc", alloc)
    monkeypatch.delenv("FLEXMOE_TRITON_CONFIG", raising=False)
    monkeypatch.delenv("FLEXMOE_TRITON_DETERMINISTIC", raising=False)
    return allocated
