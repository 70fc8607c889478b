#!/usr/bin/env bash
# Everything a lent GPU is for, in one call: build the CUDA backend, run the
# test suite on CUDA tensors (triton, cuda and torch backends), check the
# kernels under compute-sanitizer and at the stage shapes against a float64
# oracle, profile them, time them. Each phase has its own time limit, so a
# hang in one still leaves the others' results.
#
#   bench/gpu_session.sh PHASE ...
#     check    build + whole test suite + sanitizer + stage check (~6 min)
#     quick    build + the contract tests of ops, blocks, compile (~2 min)
#     profile  wall time vs kernel time per op, stage shapes (bench/gpu_checks.py)
#     host     where a Triton call's host time goes: per-launch host time, the
#              wrapper with no-op launches, cProfile (bench/gpu_checks.py host)
#     ops      op benchmark, bf16 channels_last (the issue's targets)
#     stages   stage shapes vs the float64 oracle, bf16 channels_last
#     table3   Table 3 step times, batch 128, bf16 (extrapolated)
#
# Logs and results go to $OUT (default build/gpu-session): session.log (all
# that is printed), build.log, tests.log and the benchmarks' JSON/Markdown.
# DEADLINE (default 560 s): later phases get what is left of it.
# Runs with the machine's own python3 (torch with CUDA, Triton, pytest-xdist).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu-session}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$SECONDS
DEADLINE="${DEADLINE:-560}"
say() { echo "== [+$((SECONDS - T0))s] $*"; }
left() { local n=$((DEADLINE - (SECONDS - T0))); echo $((n > 10 ? n : 10)); }

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch",
torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  nvcc --version | tail -1
}

build() {  # the CPU and CUDA extensions, in place (parallel nvcc jobs, low priority)
  MAX_JOBS=16 timeout 200 nice -n 10 "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  say "build exit $?"
  "$PY" -m resfuse_kernels.info 2>&1 | grep -A4 '^backends'
}

tests() {  # LIMIT -k-EXPRESSION [FILES...]: pytest on CUDA tensors, no Triton tuning
  local limit=$1 expr=$2 rc
  shift 2
  RESFUSE_TRITON_AUTOTUNE=0 timeout "$limit" "$PY" -m pytest -v -n 12 -p no:cacheprovider \
    -k "$expr" "${@:-tests}" >>"$OUT/tests.log" 2>&1
  rc=$?
  say "pytest -k '$expr': exit $rc: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"
  say "so far: $(grep -c ' PASSED ' "$OUT/tests.log") passed, $(grep -c ' FAILED ' "$OUT/tests.log") failed"
}

sanitize() {  # every kernel, small shapes, no caching allocator (so OOB is seen)
  local tool
  for tool in memcheck racecheck; do
    RESFUSE_TRITON_AUTOTUNE=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 \
      compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" bench/gpu_checks.py small \
      >>"$OUT/sanitizer.log" 2>&1
    say "compute-sanitizer $tool: exit $? ($(grep -c '^ok' "$OUT/sanitizer.log") ok lines so far)"
  done
}

failures() {
  grep -E "^(FAILED|ERROR)| FAILED " "$OUT/tests.log" | sort -u | head -40
}

check() {
  build &
  local build_pid=$!
  tests 200 "not cuda and not test_build"     # while nvcc builds
  wait "$build_pid"
  sanitize &
  local san_pid=$!
  tests 120 "cuda or test_build"
  wait "$san_pid"
  failures
  grep -E "ERROR SUMMARY" "$OUT/sanitizer.log" | sort | uniq -c
  stages
}

QUICK_TESTS=(tests/test_ops.py tests/test_bad_input.py tests/test_models.py tests/test_compile.py
             tests/test_triton_traceable.py tests/test_triton_kernels.py)

quick() {
  build &
  local build_pid=$!
  tests 120 "not cuda" "${QUICK_TESTS[@]}"   # while nvcc builds
  wait "$build_pid"
  # racecheck of the CUDA kernels' shared-memory reductions (training, fp32),
  # beside the cuda backend's tests
  (RESFUSE_TRITON_AUTOTUNE=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer \
     --tool racecheck --error-exitcode 9 "$PY" bench/gpu_checks.py small --backend cuda --quick \
     >"$OUT/sanitizer.log" 2>&1
   say "compute-sanitizer racecheck (cuda backend, training, fp32): exit $?, \
$(grep -c '^ok' "$OUT/sanitizer.log") cases ok; $(grep -E 'SUMMARY' "$OUT/sanitizer.log")") &
  tests 45 "cuda" tests/test_bad_input.py tests/test_models.py
  wait
  failures
}

profile() {
  say "profile: call wall time vs kernel time (bf16, channels_last, fwd+bwd)"
  timeout "$(($(left) < 45 ? $(left) : 45))" "$PY" bench/gpu_checks.py profile 2>&1 | grep -v 'profiler_st'
  say "profile exit ${PIPESTATUS[0]}"
}

host() {
  say "host time of a Triton call (bf16, channels_last, fwd+bwd, 128x64x64x64)"
  timeout "$(($(left) < 60 ? $(left) : 60))" "$PY" bench/gpu_checks.py host 2>&1
  say "host exit $?"
}

stages() {
  say "stage shapes vs the float64 oracle (autotuned)"
  timeout "$(left)" "$PY" bench/gpu_checks.py stages ${STAGES_ARGS:---quick} 2>&1
  say "stages exit $?"
}

ops() {  # OPS_ARGS: more options (e.g. --providers eager,fused:triton --modes both)
  say "op benchmark, bf16 channels_last ${OPS_ARGS:-}"
  timeout "$(left)" "$PY" -m resfuse_kernels.bench ops --dtype bf16 --channels-last --warmup 5 \
    --repeats 30 ${OPS_ARGS:-} --out "$OUT" --name "ops-$1-bf16-cl" 2>&1 | grep -v '^|'
  say "ops exit ${PIPESTATUS[0]}"
}

table3() {
  say "table3"
  timeout "$(left)" "$PY" -m resfuse_kernels.bench table3 --models resnet19,highway19,resfuse19 \
    --providers ref-eager,fused-eager --dtypes bf16 --batch 128 --warmup 3 --steps 10 ${TABLE3_ARGS:-} \
    --out "$OUT" --name "table3-$1" --no-plot 2>&1 | grep -v '^|'
  say "table3 exit ${PIPESTATUS[0]}"
}

if [[ $# -eq 0 ]]; then
  sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  exit 2
fi
environment | tee "$OUT/session.log"
slug=$("$PY" -c 'import torch; from resfuse_kernels.bench.common import device_slug
print(device_slug(torch.device("cuda")))')
for phase in "$@"; do
  case "$phase" in
    check|quick|profile|host|stages) "$phase" ;;
    ops|table3) "$phase" "$slug" ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac 2>&1 | tee -a "$OUT/session.log"
done
say "done"
