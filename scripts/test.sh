#!/usr/bin/env bash
# Installs fused_opt (scripts/install.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pytest -q -p no:cacheprovider tests bench "$@"
