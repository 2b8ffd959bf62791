"""What the prepared GPU session (:mod:`benchmarks.gpu_session`) carries to the GPU machine and
checks here without a GPU: the wheels and their requirements against the GPU image's packages,
the prebuilt CUDA extension, the travelling size, the commit stamp and the carried peers.
Standard library only (the dry run runs anywhere; the set-up runs before the wheels are installed).
"""
from __future__ import annotations

import re
import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_DIR = ".whl"
EXT_DIR = ".gpu_ext"
EXT_FILE = "flexmoe_kernels/_C.cpython-312-x86_64-linux-gnu.so"
TRAVEL_LIMIT = 64 * 2**20

# What deepspeed needs that the image lacks (KINDS.md lists the image's packages); the
# prepare script downloads exactly these (deepspeed itself is built from its sdist).
REQUIRED_WHEELS = ("deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types",
                   "typing_inspection", "typing_extensions")
# The GPU image's Python packages (KINDS.md, "Python packages already there"), normalised.
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_names(wheel_dir: Path) -> dict:
    """{normalised distribution name: [wheel files]} of ``wheel_dir``."""
    out: dict = {}
    for w in sorted(Path(wheel_dir).glob("*.whl")):
        out.setdefault(_norm(w.name.split("-")[0]), []).append(w)
    return out


def _requires(wheel: Path) -> list:
    """The unconditional requirement names of a wheel (its METADATA's Requires-Dist)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            names.append(_norm(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0]))
    return names


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def travel_bytes(root: Path = ROOT, carry=(WHEEL_DIR, EXT_DIR)) -> int | None:
    """Bytes the device call sends: tracked and untracked-not-ignored files plus ``carry``."""
    try:
        ls = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                            capture_output=True, check=True, timeout=30).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return None
    files = sum(_size(root / f) for f in ls.split("\0") if f)
    return files + sum(_size(root / c) for c in carry)


def _check_wheels(root: Path) -> list:
    found = wheel_names(root / WHEEL_DIR)
    res = []
    missing = [n for n in REQUIRED_WHEELS if _norm(n) not in found]
    doubles = [n for n, ws in found.items() if len(ws) > 1]
    mib = _size(root / WHEEL_DIR) / 2**20
    if missing or doubles:
        res.append((False, f"wheels in {WHEEL_DIR}/: missing {missing}, more than one version of {doubles} "
                    "(run: bash benchmarks/prepare_gpu_session.sh)"))
        return res
    res.append((True, f"wheels in {WHEEL_DIR}/: {len(found)} distributions, {mib:.1f} MiB"))
    unmet = sorted({r for ws in found.values() for r in _requires(ws[0])} - set(found) - IMAGE_PACKAGES)
    res.append((not unmet, "every requirement of the carried wheels is carried or in the GPU image"
                if not unmet else f"requirements neither carried nor in the GPU image: {unmet}"))
    return res


def _check_ext(root: Path) -> tuple:
    so = root / EXT_DIR / EXT_FILE
    if not so.is_file():
        return False, f"prebuilt extension {EXT_DIR}/{EXT_FILE} missing (run: bash benchmarks/prepare_gpu_session.sh)"
    srcs = [p for p in (root / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")]
    stale = [p.name for p in srcs if p.stat().st_mtime > so.stat().st_mtime + 1]
    if stale:
        return False, f"prebuilt extension older than csrc/{stale}: rerun benchmarks/prepare_gpu_session.sh"
    return True, f"prebuilt extension {EXT_DIR}/{EXT_FILE} ({so.stat().st_size / 2**20:.1f} MiB)"



def stamp_commit(root: Path = ROOT) -> str | None:
    """Write the checkout's commit to ``.gpu_ext/commit.txt`` (the GPU machine has no .git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not (root / EXT_DIR).is_dir():
        return None
    text = sha + ("-dirty" if dirty else "")
    (root / EXT_DIR / "commit.txt").write_text(text + "\n")
    return text


def carried_peers(root: Path = ROOT) -> list:
    """Peer providers whose wheel travels in :data:`WHEEL_DIR` (Liger-Kernel's fused MoE)."""
    return ["liger_fused_moe"] if any((root / WHEEL_DIR).glob("liger_kernel-*.whl")) else []
