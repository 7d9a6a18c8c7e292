// The one place that names the BLAS library. Two builds (CMake's FASTSPEC_BLAS):
//  - scipy-openblas32: OpenBLAS from the PyPI wheel, every symbol prefixed `scipy_` (the Python package's build);
//  - system: any CBLAS CMake's FindBLAS finds (OpenBLAS, BLIS, MKL, reference); the thread count is set only
//    when it is OpenBLAS (FASTSPEC_BLAS_OPENBLAS_THREADS), other libraries keep their own setting.
// All callers use the row-major products below with 32-bit dimensions (decoder.cpp keeps them in range).
#pragma once
#include <cblas.h>

#include <string>

#if defined(FASTSPEC_BLAS_SCIPY_OPENBLAS)
#define FASTSPEC_BLAS_FN(name) scipy_##name
#else
#define FASTSPEC_BLAS_FN(name) name
#endif

namespace fastspec::detail::blas {

// y (out) = W (out, in, row-major, leading dimension ldw) x
inline void gemv(const float* W, int out, int in, int ldw, const float* x, float* y) {
    FASTSPEC_BLAS_FN(cblas_sgemv)(CblasRowMajor, CblasNoTrans, out, in, 1.0f, W, ldw, x, 1, 0.0f, y, 1);
}

// y (rows, out) = x (rows, in) W^T, W row-major (out, in)
inline void gemm_xwt(const float* x, int rows, const float* W, int in, int out, float* y) {
    FASTSPEC_BLAS_FN(cblas_sgemm)(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, x, in, W, in, 0.0f, y,
                                  out);
}

inline void set_threads(int threads) {
#if defined(FASTSPEC_BLAS_SCIPY_OPENBLAS) || defined(FASTSPEC_BLAS_OPENBLAS_THREADS)
    if (FASTSPEC_BLAS_FN(openblas_get_num_threads)() != threads) FASTSPEC_BLAS_FN(openblas_set_num_threads)(threads);
#else
    (void)threads;
#endif
}

inline std::string config() {
#if defined(FASTSPEC_BLAS_SCIPY_OPENBLAS) || defined(FASTSPEC_BLAS_OPENBLAS_THREADS)
    return FASTSPEC_BLAS_FN(openblas_get_config)();
#else
    return FASTSPEC_BLAS_NAME;  // the library CMake linked (see CMakeLists.txt)
#endif
}

}  // namespace fastspec::detail::blas
