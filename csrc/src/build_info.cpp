// What this build is: reported by fastspec::build_info() and the Python module.
#include "internal.hpp"

#ifndef FASTSPEC_COMPILER
#define FASTSPEC_COMPILER "unknown"
#endif
#ifndef FASTSPEC_CXX_FLAGS
#define FASTSPEC_CXX_FLAGS ""
#endif
#ifndef FASTSPEC_VERSION
#define FASTSPEC_VERSION "unknown"
#endif

namespace fastspec {

BuildInfo build_info() {
    BuildInfo info;
    info.blas = FASTSPEC_BLAS_NAME;
    info.blas_config = detail::cpu::blas_config();
    info.compiler = FASTSPEC_COMPILER;
    info.cxx_flags = FASTSPEC_CXX_FLAGS;
    info.version = FASTSPEC_VERSION;
#ifdef FASTSPEC_CUDA_COMPILED
    info.cuda_compiled = true;  // libfastspec_cuda.so was built beside this core (loaded on first use)
#else
    info.cuda_compiled = false;
#endif
    return info;
}

}  // namespace fastspec
