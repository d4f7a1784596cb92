#!/usr/bin/env bash
# Every check that needs a GPU, in one run (a lent GPU machine's time is short):
#
#     DDKIT_DATA=/path/with/fashion-mnist bash benchmarks/gpu_checks.sh OUT_DIR
#
# 1. the gpu-marked tests (tests/test_cuda.py: every method, teacher, relabel and evaluation on CUDA;
#    CUDA augmentations equal the CPU ones), then again under torch.use_deterministic_algorithms(True)
#    without warn_only: an error there names a CUDA kernel that still has no deterministic version;
# 2. `ddkit demo --device cuda` end to end;
# 3. benchmarks/unroll_memory.py on CUDA (MTT's graph against TESLA's, ConvNet-3 width 128);
# 4. benchmarks/stats_pass.py on CUDA: the real-data statistics pass of the full tier's teachers against a
#    forward pass and the float64 reference;
# 5. benchmarks/precision.py on CUDA: student training speed and accuracy in fp32, bf16 and fp16 (train.precision);
# 6. benchmarks/tier_cost.py: each stage of the full decoupled and matching tiers timed, then extrapolated.
# TOTAL_SECONDS (default 540) bounds the whole run, so that it fits the GPU machine's 600 s per command:
# each step's time limit is the smaller of its own limit and what is left of TOTAL_SECONDS less
# RESERVE_SECONDS (default 20: the time `timeout` allows a step to die, plus the logging between steps);
# a step with fewer than MIN_STEP_SECONDS (default 20) left is skipped, with a note in the log. The last
# step (tier-cost) gets whatever is left. Every step's exit code is collected: the last line printed is
# `gpu_checks: ...` naming the failed (exit code) and skipped steps, and the script exits 1 if any step
# failed (a time-out is a failure: exit 124), else 2 if a step was skipped (not every check ran), else 0.
# Runs with the machine's python3 (its torch; PYTHON=... for another) and this checkout's src/. Writes
# OUT_DIR/checks.log (every step's output), unroll-memory.{json,md,png}, stats-pass.{json,md},
# precision.{json,md} and tier-cost.{json,md}: ten files.
set -u
OUT=${1:-gpu-checks}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
BUDGET=${TOTAL_SECONDS:-540}      # seconds for the whole run
RESERVE=${RESERVE_SECONDS:-20}    # kept back from every step's limit (kill grace 5 s, logging, the summary)
MIN_STEP=${MIN_STEP_SECONDS:-20}  # a step that would get less than this is skipped
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LOG=$OUT/checks.log
: >"$LOG"
FAILED=()
SKIPPED=()
PASSED=0

step() {  # step SECONDS NAME COMMAND...: run within min(SECONDS, what is left), log everything, record the exit code
  local limit=$1 name=$2 t0=$SECONDS rc left
  shift 2
  left=$((BUDGET - SECONDS - RESERVE))
  if ((left < MIN_STEP)); then
    echo "=== $name: skipped, only ${left} s of TOTAL_SECONDS=$BUDGET left after the ${RESERVE} s reserve (needs ${MIN_STEP} s)" \
      | tee -a "$LOG"
    SKIPPED+=("$name")
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit} s)" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s$( ((rc == 124 || rc == 137)) && echo " (timed out)")" | tee -a "$LOG"
  if ((rc == 0)); then PASSED=$((PASSED + 1)); else FAILED+=("$name($rc)"); fi
  return 0
}

step 30 environment bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  $PY -c 'import torch, ddkit; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"ddkit\", ddkit.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no CUDA\")'"
grep -E "^(torch|NVIDIA)" "$LOG" | tail -n 2
step 200 pytest-gpu "$PY" -m pytest -m gpu -q -rfE --tb=short -o cache_dir=/tmp/ddkit-pytest-cache tests
tail -n 25 "$LOG" | grep -E "passed|failed|FAILED|ERROR" || true
step 90 pytest-gpu-strict "$PY" -c "
import sys, torch, pytest
torch.use_deterministic_algorithms(True)
sys.exit(pytest.main(['-m', 'gpu', '-q', '-rfE', '--tb=line', '-o', 'cache_dir=/tmp/ddkit-pytest-cache', 'tests']))"
step 120 demo "$PY" -m ddkit demo --device "$DEVICE" --out /tmp/ddkit-demo
grep -A12 "^set " "$LOG" | tail -n 12 || true
step 120 unroll-memory "$PY" benchmarks/unroll_memory.py --device "$DEVICE" --models convnet3 --modes unroll exact \
  --out "$OUT/unroll-memory.json"
step 90 stats-pass "$PY" benchmarks/stats_pass.py --device "$DEVICE" --models resnet18_cifar convnet3-bn convnetd4-bn \
  --per-class 2000 --out "$OUT/stats-pass.json"
cat "$OUT/stats-pass.md" 2>/dev/null | tail -n 4 || true
step 90 precision "$PY" benchmarks/precision.py --device "$DEVICE" --students convnet3 resnet18_cifar --steps 40 \
  --seeds 0 1 --out "$OUT/precision.json"
tail -n 6 "$OUT/precision.md" 2>/dev/null || true
step "$BUDGET" tier-cost "$PY" benchmarks/tier_cost.py configs/bench/fashion-mnist-decoupled.yaml \
  configs/bench/fashion-mnist-matching.yaml --device "$DEVICE" --budget 1.0 --out "$OUT/tier-cost.json"
tail -n 8 "$OUT/tier-cost.md" 2>/dev/null || true

summary="gpu_checks: $PASSED passed"
((${#FAILED[@]})) && summary+="; failed: ${FAILED[*]}"
((${#SKIPPED[@]})) && summary+="; skipped (no time left): ${SKIPPED[*]}"
summary+="; $SECONDS s of TOTAL_SECONDS=$BUDGET; log $LOG"
echo "$summary" | tee -a "$LOG"
((${#FAILED[@]} == 0)) || exit 1
((${#SKIPPED[@]} == 0)) || exit 2
exit 0
