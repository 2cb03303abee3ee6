#!/usr/bin/env bash
# Installs fused_opt (scripts/install.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
# The clang that tests/test_cross_compile.py compiles the CPU module with for Arm and macOS.
"$PY" -m pip install -q --disable-pip-version-check ziglang
"$PY" -m pytest -q -p no:cacheprovider tests bench "$@"
