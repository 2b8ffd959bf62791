"""The CUDA extension flexmoe_kernels._C: it was built (when nvcc exists), it imports without
a GPU, it exposes the expected functions, and its C++ argument checks name the argument.

Everything here runs on a CPU-only machine: no test makes a CUDA call (the C++ launchers
validate their arguments before touching CUDA). Build it first with
``python setup.py build_ext --inplace`` (or ``pip install -e .``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = (
    "router_workspace_bytes",
    "router_forward",
    "router_backward",
    "gather_rows",
    "combine_forward",
    "combine_backward",
    "built_cuda_version",
    "driver_cuda_version",
)


def _nvcc_present() -> bool:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return True
    return shutil.which("nvcc") is not None


def _skip_switch() -> bool:
    return os.environ.get("FLEXMOE_SKIP_CUDA_BUILD", "0") not in ("", "0")


needs_extension = pytest.mark.skipif(
    not _nvcc_present() or _skip_switch(),
    reason="no nvcc (or FLEXMOE_SKIP_CUDA_BUILD set): the extension is not expected to exist",
)


def _ext():
    spec = importlib.util.find_spec("flexmoe_kernels._C")
    assert spec is not None, (
        "nvcc is present and FLEXMOE_SKIP_CUDA_BUILD is not set, but flexmoe_kernels._C was not "
        "built: run `python setup.py build_ext --inplace` (or `pip install -e .`) and look for the "
        "nvcc error"
    )
    return importlib.import_module("flexmoe_kernels._C")


def test_import_package_does_not_load_extension():
    code = "import sys, flexmoe_kernels; print('flexmoe_kernels._C' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_unavailable_reason_is_a_sentence():
    import torch

    import flexmoe_kernels as fk

    reason = fk.cuda_unavailable_reason()
    assert isinstance(reason, str)
    assert fk.cuda_is_available() == (reason == "")
    if not torch.cuda.is_available():
        assert not fk.cuda_is_available()
        assert len(reason) > 20


@needs_extension
def test_extension_built_and_imports_without_gpu():
    C = _ext()
    for name in EXPECTED:
        assert callable(getattr(C, name)), name
    assert C.built_cuda_version() >= 11000
    assert C.MAX_EXPERTS == 256
    assert (C.DTYPE_FLOAT32, C.DTYPE_FLOAT16, C.DTYPE_BFLOAT16) == (0, 1, 2)
    if "FLEXMOE_CUDA_ARCHS" in os.environ:  # built in this environment: the list it asked for
        assert C.CUDA_ARCHS == os.environ["FLEXMOE_CUDA_ARCHS"]
    else:
        assert C.CUDA_ARCHS and C.CUDA_ARCHS != "unknown"


@needs_extension
def test_extension_is_newer_than_sources():
    """A stale module would hide a compile error in the current csrc/."""
    C = _ext()
    built = Path(C.__file__).stat().st_mtime
    sources = [p for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")]
    assert len(sources) >= 4
    stale = [p.name for p in sources if p.stat().st_mtime > built + 1]
    assert not stale, f"flexmoe_kernels._C is older than csrc/{stale}: rebuild it"


@needs_extension
def test_workspace_size():
    C = _ext()
    small = C.router_workspace_bytes(1, 8)
    big = C.router_workspace_bytes(100_000, 8)
    assert 16 < small < big
    assert big >= 16 + 4 * 8 * (100_000 // 1024)
    with pytest.raises(ValueError, match="num_experts"):
        C.router_workspace_bytes(10, 300)
    with pytest.raises(ValueError, match="num_tokens"):
        C.router_workspace_bytes(0, 8)


# Fake, never-dereferenced "device pointers": every check below fails before any CUDA call.
_P = 1 << 20


def _router_args(**over):
    args = dict(logits=_P, dtype=0, num_tokens=10, num_experts=8, top_k=2, bias=0, mask=0,
                mask_mode=0, renorm=False, topk_ids=_P, topk_w=_P, probs=_P, z=0, counts=_P,
                offsets=_P, sorted_pairs=_P, inv_pairs=_P, workspace=_P, workspace_bytes=1 << 20,
                stream=0)
    args.update(over)
    return args


@needs_extension
@pytest.mark.parametrize(
    "over, match",
    [
        (dict(top_k=9), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(num_experts=257, top_k=2), "num_experts"),
        (dict(num_tokens=0), "num_tokens"),
        (dict(dtype=7), "dtype"),
        (dict(mask_mode=3), "mask_mode"),
        (dict(mask_mode=2, mask=0), "mask"),
        (dict(logits=0), "logits"),
        (dict(sorted_pairs=0), "sorted_pairs"),
        (dict(workspace=0), "workspace"),
        (dict(workspace_bytes=8), "workspace_bytes"),
        (dict(num_tokens=2**30, top_k=4), "T\\*K"),
    ],
)
def test_router_forward_checks_name_the_argument(over, match):
    C = _ext()
    with pytest.raises(ValueError, match=match):
        C.router_forward(**_router_args(**over))


@needs_extension
def test_other_launchers_check_arguments():
    C = _ext()
    with pytest.raises(ValueError, match="elem_bytes"):
        C.gather_rows(_P, 3, 4, 8, _P, 8, 2, _P, 0)
    with pytest.raises(ValueError, match="num_pairs"):
        C.gather_rows(_P, 2, 4, 8, _P, 9, 2, _P, 0)
    with pytest.raises(ValueError, match="dst"):
        C.gather_rows(_P, 2, 4, 8, _P, 8, 2, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        C.combine_forward(_P, 5, 4, 8, 2, 0, _P, _P, 0)
    with pytest.raises(ValueError, match="hidden"):
        C.combine_forward(_P, 0, 4, 0, 2, 0, _P, _P, 0)
    with pytest.raises(ValueError, match="inv_pairs"):
        C.combine_forward(_P, 0, 4, 8, 2, 0, 0, _P, 0)
    with pytest.raises(ValueError, match="dy and dw"):
        C.combine_backward(_P, 0, 4, 8, 2, _P, 0, _P, 0, 0, 0)
    with pytest.raises(ValueError, match="y must be"):
        C.combine_backward(_P, 0, 4, 8, 2, 0, 0, _P, 0, _P, 0)
    with pytest.raises(ValueError, match="top_k"):
        C.router_backward(_P, _P, _P, 0, 0, 0, 0, 4, 8, 9, False, _P, 0)
    with pytest.raises(ValueError, match="dz_out"):
        C.router_backward(_P, _P, _P, 0, 0, 0, 0, 4, 8, 2, False, 0, 0)
    with pytest.raises(TypeError):  # pybind11 rejects non-integers for pointers
        C.gather_rows("x", 2, 4, 8, _P, 8, 2, _P, 0)
