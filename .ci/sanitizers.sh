#!/usr/bin/env bash
# Build the core and its C++ tests with AddressSanitizer + UndefinedBehaviorSanitizer and run them, once with
# the kernel variant the CPU picks and again with FASTSPEC_FORCE_ISA=avx2 and =baseline.
# Called from the repo root with the test venv active (its python must import scipy_openblas32,
# which provides OpenBLAS). Exits non-zero on any failed check or sanitizer report.
set -euo pipefail
BUILD_DIR=${BUILD_DIR:-build/sanitize}  # build/ is git-ignored
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

cmake -S . -B "$BUILD_DIR" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DFASTSPEC_SANITIZE=ON -DFASTSPEC_BUILD_TESTS=ON -DFASTSPEC_PYTHON=OFF -DFASTSPEC_CUDA=OFF \
  -DPython_EXECUTABLE="$(command -v python)"
cmake --build "$BUILD_DIR" -j "${JOBS:-2}"

# halt_on_error + -fno-sanitize-recover=all: the first report aborts the test, so ctest fails.
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:abort_on_error=0:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout 300
# Every multiversioned kernel variant (csrc/src/internal.hpp): test_kernels calls each one explicitly; the tests
# that run whole decoders and the broadening stage run again with the dispatcher forced to the narrower variants
# (on this AVX-512 machine the default run above uses avx512; FASTSPEC_FORCE_ISA also turns the AVX-512 16-bit
# GEMV off, so the float32 batch-1 path of f16 models runs too).
for isa in avx2 baseline; do
  echo "--- FASTSPEC_FORCE_ISA=$isa"
  FASTSPEC_FORCE_ISA=$isa ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout 300 \
    -R '^(test_forward|test_jacobian|test_broadening|test_kernels)$'
done
echo "sanitizers: all C++ tests passed under ASan + UBSan (kernel variants: default, avx2, baseline)"
