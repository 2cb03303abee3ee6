#!/usr/bin/env bash
# Installs fused_opt (scripts/install.sh) and runs the demo: a small Transformer trained with
# torch.optim.AdamW and fused_opt.AdamW side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m fused_opt.demo "$@"
