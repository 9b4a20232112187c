#!/usr/bin/env bash
# cdfast's GPU checks in one command (sized for under 8 minutes on one H100/H200):
#
#   tools/gpu_check.sh [--cpu-only]
#
#   1. build   the wheel with the CUDA extension, checked in a fresh venv
#              (tools/check_wheel.sh), and the extension built in place for the steps below;
#   2. tests   every GPU test: pytest -m gpu, plus the Triton and CUDA test files, whose
#              tests run on the device when there is one;
#   3. sanitizer  compute-sanitizer memcheck and racecheck on small cases of every CUDA
#              kernel (tools/sanitizer_cases.py), each tensor its own allocation;
#   4. bench   the GPU rows of the benchmark (python -m bench.run --device cuda) and the
#              GPU section of bench/RESULTS.md (python -m bench.report).
#
# Without a GPU (or with --cpu-only) it says so and runs the CPU side: the wheel build and
# check, and the sanitizer cases on the CPU emulation of the kernels (so the script the
# sanitizer runs stays correct); it then exits 0 if those pass. CI runs this part.
#
# Each step's output is in $GPU_CHECK_LOGS (default: a temp folder); the summary at the end
# gives each step's status and time. Steps that cannot run (no compute-sanitizer, or one
# that refuses the device) are reported as such, not as passed. Exit status: 0 when every
# step that ran passed, else 1.
#
# Environment: PYTHON (default python3), GPU_CHECK_LOGS, GPU_CHECK_BENCH_S (seconds kept
# for the benchmark when the sanitizer runs, default 200), GPU_CHECK_BUDGET_S (the whole
# run, default 470).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
LOGS="${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/cdfast-gpu-check.XXXXXX")}"
mkdir -p "$LOGS"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
BENCH_S="${GPU_CHECK_BENCH_S:-200}"  # kept for step 4 when step 3 runs
START=$SECONDS
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
SUMMARY=()
FAILED=0

say() { echo "gpu_check: $*"; }
left() { echo $(( BUDGET - (SECONDS - START) )); }

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $LOGS/NAME.log, record the outcome
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  say "[$name] $* (limit ${limit} s, log $LOGS/$name.log)"
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 5 "$LOGS/$name.log" | sed "s/^/gpu_check:   /"
  if [[ $rc == 0 ]]; then
    SUMMARY+=("$name: passed ($((SECONDS - t0)) s)")
  elif [[ $rc == 124 || $rc == 137 ]]; then
    SUMMARY+=("$name: FAILED, stopped at its ${limit} s limit (log $LOGS/$name.log)"); FAILED=1
  else
    SUMMARY+=("$name: FAILED with status $rc ($((SECONDS - t0)) s; log $LOGS/$name.log)"); FAILED=1
  fi
  return $rc
}

skip() { SUMMARY+=("$1: not run: $2"); say "[$1] not run: $2"; }

finish() {
  echo
  say "summary ($((SECONDS - START)) s in all; logs in $LOGS)"
  for line in "${SUMMARY[@]}"; do echo "gpu_check:   $line"; done
  exit $FAILED
}

# ------------------------------------------------------------------ is there a GPU?
GPU_NAME="$("$PY" - <<'EOF' 2>/dev/null
import torch
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
)"
if [[ "${1:-}" == "--cpu-only" ]]; then
  GPU_NAME=""
  say "--cpu-only: the CPU side only"
elif [[ -z "$GPU_NAME" ]]; then
  say "no GPU here (torch.cuda.is_available() is False): the GPU tests, compute-sanitizer and the GPU"
  say "benchmark cannot run; running the CPU side (wheel build and check, kernel cases on the CPU emulation)"
else
  say "GPU: $GPU_NAME; torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
fi

# ------------------------------------------------------------------ 1. build
if [[ -n "$GPU_NAME" ]]; then
  export CDFAST_BUILD_CUDA=1   # a GPU machine must build the CUDA extension, or fail
  step build-inplace 240 "$PY" -m pip install -q --no-build-isolation --no-deps -e . || finish
  step import 60 "$PY" -c "import cdfast, cdfast._cuda as c; print('targets', c.targets); print(cdfast.backends())" \
    || finish
fi
step wheel "$(( $(left) > 300 ? 300 : $(left) ))" bash tools/check_wheel.sh

if [[ -z "$GPU_NAME" ]]; then
  step kernel-cases-emulated 300 "$PY" tools/sanitizer_cases.py --emulate
  skip gpu-tests "no GPU"
  skip sanitizer "no GPU"
  skip bench "no GPU"
  say "no GPU: the CPU-side checks are done; run this script on a GPU machine for the rest"
  finish
fi

# ------------------------------------------------------------------ 2. GPU tests
# -m gpu: the tests marked for a GPU (they skip without one), the CUDA kernels' among them;
# test_triton.py runs the Triton kernels on the device when there is one (its CPU runs use
# the interpreter). CUDA_LAUNCH_BLOCKING makes a kernel's error surface at its own launch.
step gpu-tests "$(( $(left) > 180 ? 180 : $(left) ))" env CUDA_LAUNCH_BLOCKING=1 "$PY" -m pytest -q \
  -p no:cacheprovider -m gpu tests
step triton-on-gpu "$(( $(left) > 180 ? 180 : $(left) ))" "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_triton.py

# ------------------------------------------------------------------ 3. compute-sanitizer
# sanitize TOOL: tools/sanitizer_cases.py under compute-sanitizer; a sanitizer that cannot
# attach to this device (some container runtimes refuse it) is reported as not run.
sanitize() {
  local tool="$1" limit=$(( $(left) - BENCH_S )) t0=$SECONDS rc log="$LOGS/sanitizer-$1.log"
  (( limit > 150 )) && limit=150
  if (( limit < 30 )); then skip "sanitizer-$tool" "out of time"; return; fi
  say "[sanitizer-$tool] limit ${limit} s, log $log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=10 "$limit" "$SAN" --tool "$tool" --error-exitcode 99 \
    --print-limit 20 "$PY" tools/sanitizer_cases.py > "$log" 2>&1
  rc=$?
  tail -n 5 "$log" | sed "s/^/gpu_check:   /"
  if grep -q -E "Device not supported|Unable to find injection|error 999" "$log"; then
    skip "sanitizer-$tool" "compute-sanitizer could not attach here ($(grep -m1 -o -E \
      'Device not supported|Unable to find injection[^.]*|error 999' "$log"); log $log)"
  elif [[ $rc == 0 ]]; then
    SUMMARY+=("sanitizer-$tool: passed, no error reported ($((SECONDS - t0)) s)")
  elif [[ $rc == 99 ]]; then
    SUMMARY+=("sanitizer-$tool: FAILED, errors reported (log $log)"); FAILED=1
  else
    SUMMARY+=("sanitizer-$tool: FAILED with status $rc ($((SECONDS - t0)) s; log $log)"); FAILED=1
  fi
}

SAN="$(command -v compute-sanitizer || true)"
for d in "${CUDA_HOME:-}" /usr/local/cuda /opt/nvidia/cuda; do
  [[ -z "$SAN" && -n "$d" && -x "$d/bin/compute-sanitizer" ]] && SAN="$d/bin/compute-sanitizer"
done
if [[ -z "$SAN" ]]; then
  skip sanitizer "compute-sanitizer was not found (CUDA toolkit's bin/)"
else
  sanitize memcheck
  sanitize racecheck
fi

# ------------------------------------------------------------------ 4. GPU bench rows
# One run per kind of case, headline first: bench.run keeps the rows of other cases in
# the CSV, so what finished before the time ran out is kept. The reference (the authors'
# procedure) is timed on 300 steps and extrapolated; no torch.compile reference (its
# compilation alone would take the budget).
BENCH_DONE=0
for kind in headline layer scale_N scale_D model; do
  limit=$(( $(left) - 30 ))
  if (( limit < 45 )); then skip "bench-$kind" "out of time ($(left) s left)"; continue; fi
  step "bench-$kind" "$limit" "$PY" -m bench.run --device cuda --out bench/results --no-plots --no-compile \
    --reference-steps 300 --repeats 3 --budget 2 --only "$kind/" && BENCH_DONE=1
done
if [[ $BENCH_DONE == 1 ]]; then
  step bench-report 30 "$PY" -m bench.report \
    && say "bench/RESULTS.md now has the GPU section (commit it with bench/results/results.csv)"
fi
finish
