#!/usr/bin/env bash
# Build the core and its C++ tests with ThreadSanitizer (Debian's clang + libclang-rt-dev) and run the tests
# that call the decoders from several threads: test_concurrency (forward and forward_jacobian on shared and
# separate decoders with OpenBLAS thread counts 1 and 2) and test_threads. Called from the repo root with the
# test venv active (its python provides scipy_openblas32). Exits non-zero on a failed check or any TSan report.
set -euo pipefail
BUILD_DIR=${BUILD_DIR:-build/tsan}  # build/ is git-ignored
CC_TSAN=${CC_TSAN:-clang}
CXX_TSAN=${CXX_TSAN:-clang++}
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

# OpenBLAS itself is not instrumented: TSan sees the core's own memory accesses and locks, which is the point.
cmake -S . -B "$BUILD_DIR" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER="$CC_TSAN" -DCMAKE_CXX_COMPILER="$CXX_TSAN" \
  -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=thread" \
  -DFASTSPEC_BUILD_TESTS=ON -DFASTSPEC_PYTHON=OFF -DFASTSPEC_CUDA=OFF \
  -DPython_EXECUTABLE="$(command -v python)"
cmake --build "$BUILD_DIR" -j "${JOBS:-2}" --target test_concurrency test_threads

# halt_on_error: the first report aborts the test (exit code 66), so ctest fails.
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:exitcode=66}
ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout 600 -R '^(test_concurrency|test_threads)$'
echo "tsan: test_concurrency and test_threads passed under ThreadSanitizer"
