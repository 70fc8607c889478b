#!/usr/bin/env bash
# One lent GPU, one run (issue 15): the phases in order of value, one shared
# deadline, every result under $OUT as JSON + Markdown (device, driver,
# versions, commit), then session.json / session.md summarising them all.
#
#   bench/gpu_session.sh                 the session on the GPU (~8 min on an H200)
#   bench/gpu_session.sh --device cpu    dry run: every phase at toy size on this
#                                        CPU (Triton interpreter, graphs emulated,
#                                        no compute-sanitizer): catches typos before
#                                        GPU minutes are spent (make gpu-dry-run)
#
# Phases (PHASES, default all, in this order):
#   quick     build the CUDA extension while the fast contract tests run on CUDA
#             tensors; then, autotuning on, every Triton configuration once
#             (test_triton_configs), CUDA-graph capture (test_capture,
#             test_graph_providers) and the cuda backend's tests
#   host      host time per fused call, eager and traced routes, triton and
#             cuda backends (bench/host_time.py)
#   ops       the three stage shapes, fwd+bwd, bf16 channels_last: eager,
#             fused:triton, fused:cuda and their CUDA-graph variants; then
#             compile and compile+graph (with eager, for the ratio)
#   table3    ResNet-19, Highway-19, ResFuse-19, bf16, batch 128, 10 timed
#             steps: ref/fused x eager/graph; then ref/fused compile, a model
#             per run while time is left
#   sanitize  compute-sanitizer memcheck and racecheck of the CUDA backend's
#             kernels, backward included (bench/gpu_checks.py small)
#
# DEADLINE (seconds, default 450 on a GPU) is shared: each phase gets at
# most its own cap and never more than what is left; a phase that cannot get
# its minimum is skipped and says so. OUT defaults to build/gpu-session.
# Runs with $PYTHON (default python3).
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE="${2:?--device needs cuda or cpu}"; shift 2; fi
if [[ "${1:-}" == -h || "${1:-}" == --help || $# -gt 0 ]]; then
  sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  [[ $# -gt 0 && "$1" != -h && "$1" != --help ]] && { echo "unknown argument $1"; exit 2; }
  exit 0
fi
case "$DEVICE" in
  cuda) DRY=0 ;;
  cpu) DRY=1; export TRITON_INTERPRET=1 ;;
  *) echo "--device must be cuda or cpu, got $DEVICE"; exit 2 ;;
esac
OUT="${OUT:-build/gpu-session}"
mkdir -p "$OUT"
: >"$OUT/phases.jsonl"
: >"$OUT/tests.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$SECONDS
DEADLINE="${DEADLINE:-$([[ $DRY == 1 ]] && echo 900 || echo 450)}"
PHASES="${PHASES:-quick host ops table3 sanitize}"
say() { echo "== [+$((SECONDS - T0))s] $*"; }
left() { echo $((DEADLINE - (SECONDS - T0))); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }  # min(CAP, time left)
record() {  # PHASE RC START [NOTE]
  printf '{"phase": "%s", "rc": %s, "seconds": %s, "note": "%s"}\n' \
    "$1" "$2" "$((SECONDS - $3))" "${4:-}" >>"$OUT/phases.jsonl"
  say "$1: exit $2 ($((SECONDS - $3)) s)${4:+; $4}"
}
enough() {  # PHASE MIN: true when MIN seconds are left, else records a skip
  if (($(left) < $2)); then record "$1" -1 "$SECONDS" "skipped: $(left) s left, needs $2"; return 1; fi
}

environment() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  else
    echo "no nvidia-smi (dry run on $DEVICE)"
  fi
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError: print("no triton")'
  command -v nvcc >/dev/null && nvcc --version | tail -1
  git rev-parse HEAD 2>/dev/null
}

# ------------------------------------------------------------------ phases

TESTS_FAST=(tests/test_ops.py tests/test_bad_input.py tests/test_models.py tests/test_compile.py
            tests/test_triton_traceable.py tests/test_triton_kernels.py)
TESTS_TUNED=(tests/test_triton_configs.py tests/test_capture.py tests/test_graph_providers.py)

bench() {  # LIMIT ARGS...: python -m resfuse_kernels.bench ARGS (tables not echoed)
  timeout "$1" "$PY" -m resfuse_kernels.bench "${@:2}" 2>&1 | grep -v '^|'
  return "${PIPESTATUS[0]}"
}

pytest_run() {  # LIMIT ARGS...: pytest into tests.log
  timeout "$1" "$PY" -m pytest -p no:cacheprovider -rfE "${@:2}" >>"$OUT/tests.log" 2>&1
}

quick() {
  local start=$SECONDS rc=0 build_rc
  ( MAX_JOBS=16 timeout "$(cap 220)" nice -n 10 "$PY" setup.py build_ext --inplace \
      >"$OUT/build.log" 2>&1; echo $? >"$OUT/build.rc" ) &
  local build_pid=$!
  if [[ $DRY == 1 ]]; then  # toy: a few contract tests under the interpreter
    pytest_run "$(cap 120)" -q -k "catches or argument_errors or refuses or hyperparameters \
or autotuning_during or cover_every" tests/test_capture.py tests/test_triton_configs.py || rc=$?
  else  # while nvcc builds (RESFUSE_TRITON_AUTOTUNE=0: no tuning of every odd test shape)
    RESFUSE_TRITON_AUTOTUNE=0 pytest_run "$(cap 150)" -q -n 12 -k "not cuda" "${TESTS_FAST[@]}" \
      || rc=$?
  fi
  wait "$build_pid"
  build_rc=$(cat "$OUT/build.rc" 2>/dev/null || echo 1)
  say "build exit $build_rc"
  "$PY" -m resfuse_kernels.info 2>&1 | grep -A4 '^backends'
  if [[ $DRY == 0 ]]; then  # autotuning on: every configuration once, capture, cuda backend
    pytest_run "$(cap 90)" -q -n 8 "${TESTS_TUNED[@]}" || rc=$?
    RESFUSE_TRITON_AUTOTUNE=0 pytest_run "$(cap 60)" -q -n 12 -k cuda \
      tests/test_bad_input.py tests/test_models.py tests/test_ops.py || rc=$?
  fi
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | sort -u | head -30
  record quick "$((rc || build_rc))" "$start" \
    "$(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.log" | tail -3 | tr '\n' ' ' | tr -d '"=')"
}

host() {
  local start=$SECONDS rc=0 routes=eager,traced reps=200 rounds=5
  [[ $DRY == 1 ]] && { routes=eager; reps=5; rounds=2; }
  timeout "$(cap 40)" "$PY" bench/host_time.py --device "$DEVICE" --routes "$routes" \
    --reps "$reps" --rounds "$rounds" --out "$OUT/host-$DEVICE-default.json" || rc=$?
  local other=cuda; [[ $DRY == 1 ]] && other=torch
  RESFUSE_BACKEND=$other timeout "$(cap 30)" "$PY" bench/host_time.py --device "$DEVICE" \
    --routes "$routes" --reps "$reps" --rounds "$rounds" --out "$OUT/host-$DEVICE-$other.json" \
    || rc=$?
  record host "$rc" "$start"
}

ops() {
  local start=$SECONDS rc=0
  local common=(--device "$DEVICE" --dtype bf16 --channels-last --modes both --out "$OUT")
  local fused="eager,fused:triton,fused:cuda,eager+graph,fused:triton+graph,fused:cuda+graph"
  local compiled="eager,compile,compile+graph" sizes=(--warmup 5 --repeats 30)
  if [[ $DRY == 1 ]]; then
    fused="eager,fused:cpu,fused:triton,eager+graph,fused:cpu+graph"
    sizes=(--warmup 1 --repeats 2 --shapes 2x8x4x4)
  fi
  bench "$(cap 90)" ops "${common[@]}" "${sizes[@]}" --providers "$fused" \
    --name "ops-$SLUG-fused" || rc=$?
  if enough ops-compile 45; then
    local only=(); [[ $DRY == 1 ]] && only=(--ops resfuse_tail)
    bench "$(cap 120)" ops "${common[@]}" "${sizes[@]}" "${only[@]}" --providers "$compiled" \
      --name "ops-$SLUG-compile" || rc=$?
  fi
  record ops "$rc" "$start"
}

table3() {
  local start=$SECONDS rc=0 m
  local sizes=(--dtypes bf16 --batch 128 --warmup 3 --steps 10)
  [[ $DRY == 1 ]] && sizes=(--dtypes bf16 --batch 2 --warmup 1 --steps 1 --image-size 8)
  bench "$(cap 120)" table3 --device "$DEVICE" --models resnet19,highway19,resfuse19 \
    --providers ref-eager,fused-eager,ref-graph,fused-graph "${sizes[@]}" --out "$OUT" \
    --name "table3-$SLUG-eager-graph" --no-plot || rc=$?
  local models=(resfuse19 resnet19 highway19); [[ $DRY == 1 ]] && models=(resnet19)
  for m in "${models[@]}"; do  # compiles take ~a minute a model: one per run, as time allows
    enough "table3-compile-$m" 75 || break
    bench "$(cap 200)" table3 --device "$DEVICE" --models "$m" --compile-models all \
      --providers ref-eager,fused-eager,ref-compile,fused-compile "${sizes[@]}" --out "$OUT" \
      --name "table3-$SLUG-compile-$m" --no-plot || rc=$?
  done
  record table3 "$rc" "$start"
}

sanitize() {  # the cuda backend's kernels, forward and backward, small shapes, no caching
  local start=$SECONDS rc=0 tool
  if ! command -v compute-sanitizer >/dev/null; then
    timeout "$(cap 120)" "$PY" bench/gpu_checks.py small --device "$DEVICE" --backend cpu \
      --quick >"$OUT/sanitizer.log" 2>&1 || rc=$?
    record sanitize "$rc" "$start" "no compute-sanitizer: gpu_checks.py small alone"
    return
  fi
  for tool in memcheck racecheck; do
    enough "sanitize-$tool" 30 || break
    RESFUSE_TRITON_AUTOTUNE=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(cap 120)" \
      compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" bench/gpu_checks.py small \
      --backend cuda --quick >>"$OUT/sanitizer.log" 2>&1 || rc=$?
    say "compute-sanitizer $tool: $(grep -c '^ok' "$OUT/sanitizer.log") ok lines so far; \
$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
  done
  record sanitize "$rc" "$start" "$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | sort | uniq -c \
| tr '\n' ' ' | tr -d '"')"
}

# ------------------------------------------------------------------ the run

environment | tee "$OUT/session.log"
SLUG=$("$PY" -c "import torch; from resfuse_kernels.bench.common import device_slug
print(device_slug(torch.device('$DEVICE')))")
say "device $DEVICE ($SLUG), deadline ${DEADLINE} s, phases: $PHASES" | tee -a "$OUT/session.log"
declare -A MIN=([quick]=60 [host]=20 [ops]=40 [table3]=60 [sanitize]=40)
for phase in $PHASES; do
  [[ -n "${MIN[$phase]:-}" ]] || { echo "unknown phase $phase" | tee -a "$OUT/session.log"; exit 2; }
  enough "$phase" "${MIN[$phase]}" || continue
  "$phase" 2>&1 | tee -a "$OUT/session.log"
done
"$PY" bench/session_report.py "$OUT" "$DEVICE" >/dev/null 2>>"$OUT/session.log"
say "done: $OUT/session.md" | tee -a "$OUT/session.log"
