#!/usr/bin/env bash
# On a lent GPU machine (no network; torch, triton, transformers, pytest-benchmark present): build dsattn, run
# the test suite on the GPU, the kernel and whole-model benchmarks and the trained-model fidelity check, and
# leave everything in one folder to commit: bench/results/<date>-<device>/ (report.md, JSON, PNG plots, logs,
# versions). With $OUT set (the device tool's output folder) the folder is copied there as well.
#
#   bash bench/run_gpu.sh [RESULT_DIR]
#
# Time: at most DSATTN_GPU_BUDGET_S (default 530 s, inside the 9-minute slot) from start to end. Every step
# has its own limit, taken from what is left minus what the later steps are guaranteed; a step that runs out is
# interrupted with SIGINT first (pytest then writes its JUnit/benchmark JSON for the cases that finished) and
# killed 15 s later. Budget, in order: build <= 150 s, tests <= 150 s, then what is left (>= 250 s) for
# `python -m dsattn bench`: kernel benchmarks ~30%, model benchmarks ~45% (bench_model.py stops starting cases
# at 60% of its share), the rest for the fidelity check (1.5 "minutes" = 60 planned steps of CPU training on
# the 16 cores there, evaluated on the GPU) and the report (written before fidelity, and again after it).
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${DSATTN_GPU_BUDGET_S:-530}
SECONDS=0
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # this machine only: a faster build
export MAX_JOBS=${MAX_JOBS:-16}

DEVICE_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
SLUG=$(echo "${DEVICE_NAME:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
RESULT_DIR=${1:-bench/results/$(date -u +%F)-$SLUG}
mkdir -p "$RESULT_DIR"
log() { echo "== [${SECONDS}s] $*" | tee -a "$RESULT_DIR/run.log"; }

# limit NAME CAP RESERVE: seconds for a step: at most CAP, and never eating into RESERVE (what later steps need)
limit() {
  local left=$((BUDGET - SECONDS - $3))
  local t=$(( left < $2 ? left : $2 ))
  echo $(( t < 5 ? 5 : t ))
}
step() {  # step SECONDS LOGFILE CMD...: run with SIGINT at the limit, SIGKILL 15 s later
  local t=$1 logfile=$2; shift 2
  timeout -s INT -k 15 "$t" "$@" >"$logfile" 2>&1
}

log "device: ${DEVICE_NAME:-none found}; result folder $RESULT_DIR; budget ${BUDGET}s"
T=$(limit build 150 400)
log "build (pip install --no-build-isolation -e ., limit ${T}s)"
step "$T" "$RESULT_DIR/build.log" python3 -m pip install --no-build-isolation --no-deps -e . \
  || { log "build failed or timed out (tail of build.log follows)"; tail -30 "$RESULT_DIR/build.log"; }

{
  echo "date: $(date -u +%FT%TZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no .git here (working-tree copy)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  python3 -m dsattn info
  python3 -m pip list 2>/dev/null | grep -i -E '^(torch|triton|transformers|pytest|pytest-benchmark|numpy|matplotlib) '
} >"$RESULT_DIR/versions.txt" 2>&1
cat "$RESULT_DIR/versions.txt"
python3 -c "import pytest_benchmark" 2>/dev/null \
  || log "pytest-benchmark is missing: carry its wheel and put it on PYTHONPATH (see the device tool's README)"

T=$(limit tests 150 250)
log "test suite on the GPU (limit ${T}s)"
# The AOT compile checks are CI's (they need no GPU and would eat this slot); Triton's JIT compiles dominate the
# rest, so they run in 8 processes when pytest-xdist is there (the device image has it).
XDIST=(); python3 -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step "$T" "$RESULT_DIR/tests.log" python3 -m pytest tests -q -p no:cacheprovider -rs "${XDIST[@]}" \
  --ignore=tests/test_aot_compile.py --junitxml="$RESULT_DIR/tests.xml"
log "tests exit $?: $(tail -1 "$RESULT_DIR/tests.log")"

# dsattn bench runs the kernel and the model benchmarks as separate pytest sessions (each interrupted at its
# own timeout, keeping its finished cases), then the fidelity check, then writes report.md and the plots.
LEFT=$((BUDGET - SECONDS - 10))
KERNEL_T=$(( LEFT * 30 / 100 )); MODEL_T=$(( LEFT * 45 / 100 )); FIDELITY_MIN=${FIDELITY_MIN:-1.5}
log "benchmarks + fidelity + report (kernels ${KERNEL_T}s, model ${MODEL_T}s, then fidelity; limit ${LEFT}s)"
step "$LEFT" "$RESULT_DIR/bench.log" python3 -m dsattn bench --out "$RESULT_DIR" --quick \
  --timeout "$KERNEL_T" --model-timeout "$MODEL_T" --fidelity-minutes "$FIDELITY_MIN"
log "bench exit $?"
tail -5 "$RESULT_DIR/bench.log"
[ -f "$RESULT_DIR/report.md" ] && head -80 "$RESULT_DIR/report.md"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp -r "$RESULT_DIR" "$OUT/"; fi
log "done (${SECONDS}s of ${BUDGET}s)"
