#!/usr/bin/env bash
# Installs what fused_opt needs and builds its extensions (CPU always; CUDA when nvcc is found).
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==${FUSED_OPT_TORCH:-2.14.1}" ninja "pytest>=8"

# torch guesses CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script that execs the
# real compiler, point CUDA_HOME at the toolkit it execs instead.
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  nvcc_path=$(command -v nvcc)
  real=$(sed -n 's/^exec \([^ ]*nvcc\).*/\1/p' "$nvcc_path" 2>/dev/null | head -n1)
  real=$(readlink -f "${real:-$nvcc_path}")
  export CUDA_HOME=$(dirname "$(dirname "$real")")
fi
echo "fused_opt install: CUDA_HOME=${CUDA_HOME:-none}"

MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e .
"$PY" -m fused_opt.info
