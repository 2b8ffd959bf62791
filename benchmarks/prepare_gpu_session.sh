#!/usr/bin/env bash
# Prepare, on the CPU machine (it needs the package registries), what benchmarks/gpu_session.sh
# needs beyond the GPU image. See docs/GPU_SESSION.md.
#
#   .whl/      deepspeed (built from its sdist: PyPI has no deepspeed wheel; DS_BUILD_OPS=0, pure
#              Python) and those of its requirements the image lacks (hjson, pydantic and its
#              own: pydantic_core, annotated-types, typing-inspection, typing-extensions >= 4.16),
#              as CPython 3.12 manylinux x86-64 wheels; liger-kernel 0.8.5 (the sweep's peer provider,
#              Liger's fused MoE; a py3-none-any wheel of 0.9 MB)
#   .gpu_ext/  flexmoe_kernels/_C.cpython-312-x86_64-linux-gnu.so: the CUDA extension for the
#              image's Python 3.12, sm_90a (raw pointers and a static CUDA runtime: it needs
#              pybind11 to build, not torch), built in build/py312-venv
#
# Both folders are git-ignored; the device call carries them (carry: [".whl", ".gpu_ext"]).
# Environment: PYTHON (a Python with pip, default python3), PY312 (a CPython 3.12, default
# pyenv's newest 3.12, else python3.12), nvcc on PATH or CUDA_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEEPSPEED=deepspeed==0.19.8
PINS=(hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
      typing-inspection==0.4.5 typing-extensions==4.16.0
      liger-kernel==0.8.5)  # the sweep's peer provider (pure Python, 0.9 MB; needs torch, triton: in the image)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

echo "== wheels -> .whl/"
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${PINS[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl "$DEEPSPEED"
ls -l .whl

echo "== CUDA extension for CPython 3.12 -> .gpu_ext/"
PY312=${PY312:-}
if [ -z "$PY312" ] && command -v pyenv >/dev/null; then
  v=$(pyenv versions --bare | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1 || true)
  [ -n "$v" ] && PY312=$(PYENV_VERSION=$v pyenv which python)
fi
PY312=${PY312:-$(command -v python3.12 || true)}
if [ -z "$PY312" ]; then
  echo "no CPython 3.12 found: set PY312=/path/to/python3.12" >&2
  exit 1
fi
"$PY312" -m venv build/py312-venv
build/py312-venv/bin/python -m pip install -q pybind11 setuptools
rm -rf .gpu_ext build/py312-temp
FLEXMOE_CUDA_ARCHS=90a FLEXMOE_NVCC_THREADS=${FLEXMOE_NVCC_THREADS:-2} build/py312-venv/bin/python setup.py -q \
  build_ext --build-lib .gpu_ext --build-temp build/py312-temp
(mkdir -p build/py312-check/flexmoe_kernels && cp .gpu_ext/flexmoe_kernels/_C.*.so build/py312-check/flexmoe_kernels/ \
  && touch build/py312-check/flexmoe_kernels/__init__.py && cd build/py312-check \
  && ../py312-venv/bin/python -c "import flexmoe_kernels._C as C; print('imports under', __import__('sys').version.split()[0], '- archs', C.CUDA_ARCHS, '- built with CUDA', C.built_cuda_version())")

echo "== the carried wheels other than deepspeed import under CPython 3.12 (deepspeed needs torch)"
rm -rf build/py312-site
build/py312-venv/bin/python -m pip install -q --no-index --no-deps --no-compile --target build/py312-site \
  $(ls .whl/*.whl | grep -v -e /deepspeed- -e /liger_kernel-)
PYTHONPATH=build/py312-site build/py312-venv/bin/python -c \
  "import hjson, pydantic, pydantic_core; print('pydantic', pydantic.VERSION, 'pydantic_core', pydantic_core.__version__, 'hjson ok')"

echo "== sizes"
du -sh .whl .gpu_ext
echo "== dry run"
"$PY" -m benchmarks.gpu_session plan --check
