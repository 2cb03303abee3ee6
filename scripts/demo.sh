#!/usr/bin/env bash
# Installs fused_opt (scripts/install.sh) and runs the main job: the reference fine-tune in its
# quick mode (all-MiniLM-L6-v2 on BBC News, torch.optim.AdamW vs fused_opt.AdamW, a few minutes on
# a CPU). Extra arguments go to `fused-opt finetune`; the report lands in finetune-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m fused_opt.finetune --quick "$@"
