#!/usr/bin/env bash
# Proves the CUDA backend on a GPU machine in one short run (issue 12): builds the package with FASTSPEC_CUDA=ON,
# runs the C++ and Python CUDA tests, then the GPU benchmark (benchmarks/bench_gpu.py), writing everything to $OUT.
# Budget: about 5 minutes on the workplace's H200 (16 cores), each stage capped so that the whole stays under 8.
#
# The device machine has no network. Its image has nvcc 13, CMake, ninja, pybind11, scikit-build-core, numpy,
# scipy, h5py, tqdm, pytest, CuPy, PyTorch and the nvidia-cublas wheel; it lacks scipy-openblas32 (the CPU core's
# BLAS), which travels as a wheel in .whl/ (git-ignored). Prepare it once here, then call the device tool:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl scipy-openblas32==0.3.34.481.3
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
# Outputs ($OUT, default ./gpu_out), 7 files (the device tool brings back at most 8): gpu_check.log (everything,
# nvidia-smi included), build.log, ctest.log, pytest.log, junit.xml, bench_gpu.json, bench_gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
# At exit, close our ends of the pipe and wait for tee, so that the log's last lines are written before the tool
# collects $OUT (the exit status is kept).
trap 'exec >&- 2>&-; wait "$TEE_PID"' EXIT
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
SITE=${FASTSPEC_SITE:-/tmp/fastspec-site}  # fastspec and scipy-openblas32 go here, side by side (the RPATH needs it)
START=$SECONDS
status=0
stage() { printf '\n=== %s (%ds)\n' "$*" $((SECONDS - START)); }
fail() { echo "FAILED: $*"; status=1; }

stage "machine"
nvidia-smi 2>&1
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
nvcc --version | tail -n 2
$PY -c "import sys, numpy, torch, cupy; print(sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__, 'cupy', cupy.__version__)"

stage "dependencies the image lacks (.whl)"
rm -rf "$SITE" && mkdir -p "$SITE"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || fail "installing .whl"
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import scipy_openblas32" || fail "scipy-openblas32 is missing: carry it in .whl (see the header)"

stage "build the package with FASTSPEC_CUDA=ON (sm_90)"
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
FASTSPEC_CUDA=ON timeout 150 $PY -m pip install -v --no-index --no-deps --no-build-isolation --target "$SITE" \
  -Cbuild-dir=build/gpu-py -Ccmake.define.FASTSPEC_CUDA_ARCHITECTURES=90 . > "$OUT/build.log" 2>&1 ||
  { tail -n 40 "$OUT/build.log"; fail "package build"; }
grep -E "fastspec: (CUDA|BLAS)" "$OUT/build.log"
$PY -c "
import fastspec, fastspec._core as c
print('build_info', c.build_info())
print('cuda_available', c.cuda_available(), c.cuda_unavailable_reason())
d = fastspec.Decoder.load(device='cuda'); print(d, d._core.device_description)
" || fail "import / CUDA decoder"

stage "C++ tests (test_cuda, test_device_plan, test_forward)"
{
  timeout 100 bash -c "cmake -S . -B build/gpu-cpp -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTSPEC_CUDA=ON \
      -DFASTSPEC_CUDA_ARCHITECTURES=90 -DFASTSPEC_BUILD_TESTS=ON -DFASTSPEC_PYTHON=OFF -DPython_EXECUTABLE=\$(command -v $PY) \
    && cmake --build build/gpu-cpp -j $JOBS --target test_cuda test_device_plan test_forward \
    && ctest --test-dir build/gpu-cpp -R 'test_cuda|test_device_plan|test_forward' --output-on-failure --timeout 120"
} > "$OUT/ctest.log" 2>&1 || fail "C++ tests"
tail -n 12 "$OUT/ctest.log"
grep -q "test_cuda .*Passed" "$OUT/ctest.log" || fail "test_cuda did not pass (skipped or failed)"

stage "Python CUDA tests"
timeout 100 $PY -m pytest -p no:cacheprovider -q -rs --junitxml="$OUT/junit.xml" tests/test_cuda.py tests/test_cuda_host.py \
  > "$OUT/pytest.log" 2>&1 || fail "pytest"
tail -n 25 "$OUT/pytest.log"
grep -q "skipped" "$OUT/pytest.log" && grep -E "SKIPPED.*no CUDA GPU" "$OUT/pytest.log" && fail "CUDA tests skipped on a GPU machine"

stage "benchmark"
timeout 120 $PY benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" --md "$OUT/bench_gpu.md" || fail "benchmark"

stage "done: $([[ $status == 0 ]] && echo 'all stages passed' || echo 'SOME STAGES FAILED (see above)')"
exit $status
