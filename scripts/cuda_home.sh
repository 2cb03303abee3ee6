# Sourced by the build scripts: when CUDA_HOME is unset, derive it from the nvcc on PATH. torch
# guesses from nvcc's location, which is wrong when that nvcc is a wrapper script that execs the
# real compiler elsewhere; follow the wrapper instead.
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  _nvcc=$(command -v nvcc)
  _real=$(sed -n 's/^exec \([^ ]*nvcc\).*/\1/p' "$_nvcc" 2>/dev/null | head -n1)
  _real=$(readlink -f "${_real:-$_nvcc}")
  export CUDA_HOME=$(dirname "$(dirname "$_real")")
  unset _nvcc _real
fi
