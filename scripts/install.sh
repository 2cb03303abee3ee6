#!/usr/bin/env bash
# Installs what fused_opt needs and builds its extensions (CPU always; CUDA when nvcc is found).
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==${FUSED_OPT_TORCH:-2.14.1}" ninja \
  "pytest>=8" pytest-benchmark hypothesis tqdm matplotlib

source scripts/cuda_home.sh
echo "fused_opt install: CUDA_HOME=${CUDA_HOME:-none}"

MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e .
"$PY" -m fused_opt.info
