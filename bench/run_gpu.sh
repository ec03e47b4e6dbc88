#!/usr/bin/env bash
# On a lent GPU machine (no network; torch, triton, transformers present): build dsattn, run the GPU test
# suite and the full benchmark suite, and leave everything in one folder to commit under bench/results/.
#
#   bash bench/run_gpu.sh OUT_DIR        # ~9 minutes at most; OUT_DIR defaults to $OUT or bench/out/gpu
#
# pytest-benchmark may be missing there: carry its wheel (see the device tool's README) and put it on
# PYTHONPATH before calling this script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/out/gpu}}
mkdir -p "$OUT_DIR"
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # this machine only: a faster build
SECONDS=0
log() { echo "== [${SECONDS}s] $*" | tee -a "$OUT_DIR/run.log"; }

log "build"
timeout 240 python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT_DIR/build.log" 2>&1 \
  || { log "build failed (tail of build.log follows)"; tail -40 "$OUT_DIR/build.log"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -m dsattn info; } \
  >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

log "GPU test suite"
timeout 200 python3 -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" \
  >"$OUT_DIR/tests.log" 2>&1
log "tests exit $?: $(tail -1 "$OUT_DIR/tests.log")"

log "benchmarks + report"
timeout 240 python3 -m dsattn bench --out "$OUT_DIR" --no-fidelity --timeout 230 >"$OUT_DIR/bench.log" 2>&1
log "bench exit $?"
tail -60 "$OUT_DIR/report.md" 2>/dev/null
log "done"
