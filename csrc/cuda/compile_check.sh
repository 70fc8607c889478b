#!/usr/bin/env bash
# Compile-only check of the CUDA backend (csrc/cuda): runs nvcc -c on every
# .cu and the host compiler on every .cpp, against the installed torch's
# headers, with the flags torch.utils.cpp_extension gives CUDA extensions.
# Nothing is linked or run, so no GPU (and no CUDA build of torch) is needed.
#
#   csrc/cuda/compile_check.sh            (or: make cuda-compile)
#
# Environment: PYTHON (default .venv/bin/python, else python3), NVCC
# (default: nvcc on PATH), CUDA_ARCH (default sm_90), CXX_STD (default
# c++17: the standard the sources are written to; torch's own extension
# builds use c++20), OUT (default build/cuda-check).
# Each .cu's line gives ptxas's count of kernels, registers and spills (the
# whole report: OUT/<source>.log). Exits 0 when everything compiled,
# 1 on any error, and 0 with a "skipped" line when nvcc is not installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "cuda-compile: skipped: nvcc not found (install the CUDA toolkit or set NVCC)"
  exit 0
fi
[[ -x .venv/bin/python ]] && PYTHON="${PYTHON:-.venv/bin/python}"
PYTHON="${PYTHON:-python3}"
CXX="${CXX:-g++}"
CUDA_ARCH="${CUDA_ARCH:-sm_90}"
CXX_STD="${CXX_STD:-c++17}"
OUT="${OUT:-build/cuda-check}"
mkdir -p "$OUT"

mapfile -t INCLUDES < <("$PYTHON" -c '
from torch.utils.cpp_extension import include_paths
for p in include_paths():
    print("-I" + p)')
TORCH_INCLUDE="${INCLUDES[0]#-I}"

DEFINES=()
# A CPU build of torch ships the c10/cuda headers but not the header CMake
# generates for them (c10/cuda/impl/cuda_cmake_macros.h, which only sets an
# export macro for Windows DLLs); this define is c10's switch for going
# without it.
if [[ ! -f "$TORCH_INCLUDE/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  DEFINES+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi

# As torch.utils.cpp_extension.COMMON_NVCC_FLAGS; the two diagnostics
# silenced are torch's own headers using C++20 bit-field initialisers.
NVCC_FLAGS=(-std="$CXX_STD" -arch="$CUDA_ARCH" -O3 -Xcompiler=-fPIC
            -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
            --expt-relaxed-constexpr -diag-suppress=3306
            -Xcompiler=-Wno-c++20-extensions)
CXX_FLAGS=(-std="$CXX_STD" -O2 -fPIC -Wall -Wno-c++20-extensions)

# Each source's messages go to a log, ptxas's -v report per kernel (registers,
# spills) included; one summary line per source, every other message as printed.
ptxas_summary() {
  awk '/Used [0-9]+ registers/ { n++; if ($5 > regs) regs = $5 }
       /bytes spill stores/ { if ($5 > 0) { spilling++; bytes += $5 } }
       END { if (n) printf "; %d kernels, at most %d registers, %d spilling (%d bytes)",
                        n, regs, spilling, bytes }' "$1"
}

echo "cuda-compile: $("$NVCC" --version | tail -n 1), $CUDA_ARCH, $CXX_STD, torch headers in $TORCH_INCLUDE"
status=0
for src in csrc/cuda/*.cu csrc/cuda/*.cpp; do
  name="$(basename "$src")"
  log="$OUT/$name.log"
  compile=("$CXX" "${CXX_FLAGS[@]}")
  [[ "$src" == *.cu ]] && compile=("$NVCC" "${NVCC_FLAGS[@]}" -Xptxas=-v)
  start=$SECONDS
  if "${compile[@]}" "${DEFINES[@]}" "${INCLUDES[@]}" -c "$src" -o "$OUT/${name%.*}.o" 2>"$log"
  then
    echo "cuda-compile: ok   $src ($((SECONDS - start)) s$(ptxas_summary "$log"))"
  else
    echo "cuda-compile: FAIL $src"
    status=1
  fi
  grep -vE "^ptxas info|bytes stack frame|^ *$" "$log" >&2 || true
done
exit $status
