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
from helpers import interpreter_unsupported, is_interpreter_failure, poison_  # noqa: E402

_INTERPRETER_SKIP = interpreter_unsupported() if os.environ.get("TRITON_INTERPRET") == "1" else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Interpreter tier on Triton < 3.7 with NumPy >= 2.4 (the GPU image's versions): a test
    that fails inside the interpreter running the grouped GEMM kernels is reported as skipped
    with the reason (helpers.interpreter_unsupported); every other failure stays a failure."""
    outcome = yield
    if _INTERPRETER_SKIP is None or call.excinfo is None or call.when != "call":
        return
    if is_interpreter_failure(call.excinfo.value):
        rep = outcome.get_result()
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {_INTERPRETER_SKIP}")


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
