#!/usr/bin/env bash
# Evaluation tier: lm-evaluation-harness in its own environment .venv-eval (lm-eval's pins stay out
# of the main one), then tests/eval offline (tiny random models, local tasks). CPU torch goes in
# first so that nothing pulls a CUDA build. About 3 minutes on an idle 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
python3 -m venv .venv-eval
.venv-eval/bin/pip install -q torch==2.13.0
FLEXMOE_SKIP_CUDA_BUILD=1 .venv-eval/bin/pip install -q -e ".[eval]" pytest
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv-eval/bin/python -m pytest -q -p no:cacheprovider tests/eval
echo "eval tier: $(( $(date +%s) - start )) s"
