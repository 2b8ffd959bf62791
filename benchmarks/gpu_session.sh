#!/usr/bin/env bash
# The prepared GPU session: the whole benchmark session on a machine with an H100/H200, in one
# script. See benchmarks/README.md, "Prepared GPU session", and docs/GPU_SESSION.md.
#
#   bash benchmarks/gpu_session.sh OUT_DIR               on the GPU machine: <= 540 s wall, kernel
#                                                        compilation included; everything under OUT_DIR
#   bash benchmarks/gpu_session.sh --dry-run [--check]   anywhere: the plan, each step's budget, the
#                                                        total, the prerequisites (--check: exit 1 when
#                                                        one is missing, and stamp the commit)
#
# Prepare first, on the CPU machine: bash benchmarks/prepare_gpu_session.sh (.whl/ and .gpu_ext/).
# The steps and commands live in benchmarks/gpu_session.py, their budgets in benchmarks/session_budget.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

case "${1:-}" in
  --dry-run)
    shift
    exec "$PY" -m benchmarks.gpu_session plan "$@"
    ;;
  -h|--help)
    sed -n '2,13p' "$0"
    exit 0
    ;;
  ""|-*)
    echo "usage: bash benchmarks/gpu_session.sh OUT_DIR | --dry-run [--check]" >&2
    exit 2
    ;;
esac

OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
{
  echo "# gpu_session.sh $OUT, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -n), $("$PY" -V 2>&1)"
  "$PY" -m benchmarks.gpu_session run "$OUT"
} 2>&1 | tee -a "$OUT/log.txt"
