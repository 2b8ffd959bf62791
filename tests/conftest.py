"""Shared test setup: the `gpu` tier, one tolerance table per dtype, poisoning helpers."""
from __future__ import annotations

import pytest
import torch

# One table: (atol, rtol) per dtype for comparing a kernel with the PyTorch reference path.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a buffer with NaN (floats) or a huge sentinel (ints) so unwritten elements fail."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


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
