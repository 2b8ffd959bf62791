"""Issue 25 item 5: packaging. ``python -m build --wheel`` with nvcc present puts the compiled
extension (SASS for sm_80 and sm_90a) in the wheel and says so, with how to skip it; a wheel built
with ``FLEXMOE_SKIP_CUDA_BUILD=1`` has none, and its absence is a sentence, never an import error.
Each wheel is installed in a fresh venv with ``--no-deps`` beside the local torch (never a CUDA
torch from the index) and imported from outside the checkout. Slow: the nvcc build takes minutes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def _checkout_copy(dst: Path) -> Path:
    """The tracked files of the checkout (as working-tree content) in ``dst``: the build writes its
    build/ and egg-info there, not in the shared checkout."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _build_wheel(tmp: Path, **env) -> tuple[Path, str]:
    pytest.importorskip("build")
    src = _checkout_copy(tmp / "src")
    out = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=1800,
                          env={**{k: v for k, v in os.environ.items() if k not in ("FLEXMOE_SKIP_CUDA_BUILD",
                                                                                  "FLEXMOE_CUDA_ARCHS")}, **env})
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 and any(m in text for m in ("No matching distribution", "Could not find a version",
                                                        "Failed to establish a new connection",
                                                        "Temporary failure in name resolution")):
        pytest.skip("the isolated build could not fetch its build requirements (setuptools, wheel, "
                    "pybind11) from the package index: offline")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheels = list(out.glob("flexmoe_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], proc.stdout + proc.stderr


def _fresh_venv(tmp: Path) -> Path:
    """A new venv that sees this interpreter's torch (a .pth line naming its site-packages; the
    .pth files there, e.g. the editable install of this checkout, are not processed)."""
    import torch

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "local_torch.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    return py


def _install_and_run(tmp: Path, wheel: Path, code: str) -> str:
    py = _fresh_venv(tmp)
    pip = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    run = subprocess.run([str(py), "-c", code], cwd=tmp, capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc: the wheel cannot hold the CUDA extension")
def test_wheel_holds_the_cuda_extension_for_sm80_and_sm90a(tmp_path):
    wheel, log = _build_wheel(tmp_path)
    assert "building the CUDA extension" in log and "FLEXMOE_SKIP_CUDA_BUILD=1" in log
    with zipfile.ZipFile(wheel) as z:
        so = [n for n in z.namelist() if n.startswith("flexmoe_kernels/_C") and n.endswith(".so")]
        assert so, z.namelist()
        z.extract(so[0], tmp_path / "x")
    cuobjdump = _nvcc().parent / "cuobjdump"
    if cuobjdump.exists():
        elf = subprocess.run([str(cuobjdump), "--list-elf", str(tmp_path / "x" / so[0])], capture_output=True,
                             text=True, check=True).stdout
        assert "sm_80" in elf and "sm_90a" in elf, elf
    out = _install_and_run(tmp_path, wheel, (
        "import flexmoe_kernels as fk, flexmoe_kernels._C as C, sys; "
        "print(fk.__file__); print(C.CUDA_ARCHS); print(fk.cuda_unavailable_reason())"))
    where, archs, reason = out.splitlines()[:3]
    assert str(tmp_path / "venv") in where and str(ROOT) not in where
    assert archs == "80;90a"
    assert "not importable" not in reason  # the extension loads; without a GPU the reason is the device


def test_wheel_without_nvcc_imports_and_says_why(tmp_path):
    wheel, log = _build_wheel(tmp_path, FLEXMOE_SKIP_CUDA_BUILD="1")
    assert "not building the CUDA extension: FLEXMOE_SKIP_CUDA_BUILD is set" in log
    with zipfile.ZipFile(wheel) as z:
        assert not [n for n in z.namelist() if n.startswith("flexmoe_kernels/_C")]
        assert "flexmoe_training/configs/recipe_flexolmo_7b.json" in z.namelist()
    out = _install_and_run(tmp_path, wheel, (
        "import flexmoe_kernels as fk, torch; print(fk.__file__); print(fk.cuda_unavailable_reason()); "
        "print(sorted(fk.available_backends('cpu')))"))
    where, reason, backends = out.splitlines()[:3]
    assert str(tmp_path / "venv") in where
    assert "flexmoe_kernels._C is not importable" in reason and "FLEXMOE_SKIP_CUDA_BUILD" in reason
    assert "torch" in backends
