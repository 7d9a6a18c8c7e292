#!/usr/bin/env bash
# Compile and link the CUDA backend (libfastspec_cuda.so) with FASTSPEC_CUDA=ON for sm_90 and sm_80, so that it
# never rots, although nothing built from it can run here (no GPU); then run its host-side tests, which need none.
# Called from the repo root with the test venv active. nvcc: PATH or /usr/local/cuda; cuBLASLt: the PyPI wheel
# nvidia-cublas, installed here into the venv (headers + libraries, no GPU needed).
set -euo pipefail
BUILD_DIR=${BUILD_DIR:-build/cuda-ci}  # build/ is git-ignored
START=$SECONDS
python -m pip install -q nvidia-cublas
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
cmake -S . -B "$BUILD_DIR" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DFASTSPEC_CUDA=ON \
  -DFASTSPEC_CUDA_ARCHITECTURES="80;90" -DFASTSPEC_BUILD_TESTS=ON -DFASTSPEC_PYTHON=OFF \
  -DPython_EXECUTABLE="$(command -v python)"
cmake --build "$BUILD_DIR" -j "${JOBS:-2}" --target fastspec_cuda test_device_plan test_cuda
# The library exports one symbol and links nothing of the core or of the CUDA runtime dynamically.
nm -D --defined-only "$BUILD_DIR/libfastspec_cuda.so" | awk '{print $3}' | grep -qx fastspec_cuda_backend_module
! nm -D --defined-only "$BUILD_DIR/libfastspec_cuda.so" | awk '{print $3}' | grep -vx fastspec_cuda_backend_module | grep -q .
! readelf -d "$BUILD_DIR/libfastspec_cuda.so" | grep -q 'libcudart'
for arch in sm_80 sm_90; do  # the fatbin's kernels (one per .cu file) name their architecture
  [[ $(strings "$BUILD_DIR/libfastspec_cuda.so" | grep -o "\b$arch\b" | wc -l) -ge 3 ]] ||
    { echo "libfastspec_cuda.so lacks $arch code for its 3 kernel files" >&2; exit 1; }
done
# Host-side tests: the plan arithmetic, and test_cuda, which must report itself skipped (exit 77) without a GPU.
ctest --test-dir "$BUILD_DIR" -R 'test_device_plan|test_cuda' --output-on-failure
python -m pytest -q tests/test_cuda_host.py
echo "cuda build: libfastspec_cuda.so compiled and linked for sm_80 and sm_90 ($((SECONDS - START)) s)"
