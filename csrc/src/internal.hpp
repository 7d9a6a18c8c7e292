// Internal interfaces between the parts of the core (not installed).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "fastspec/fastspec.hpp"

// Hot loops are compiled three times, for AVX-512F, AVX2+FMA and baseline x86-64, as separate functions
// (FASTSPEC_KERNEL_VARIANTS below), and each call dispatches on kernel_isa(): the best variant this CPU runs,
// or the one named by the environment variable FASTSPEC_FORCE_ISA (avx512, avx2, baseline), so the tests
// run every variant on one machine. No ifunc is involved, so the sanitizer builds run all three too.
// Baseline only where the compiler is not GCC/Clang on x86-64, or with FASTSPEC_NO_MULTIVERSION.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTSPEC_NO_MULTIVERSION)
#define FASTSPEC_HAVE_VARIANTS 1
#define FASTSPEC_TARGET_AVX512 __attribute__((target("avx512f")))
#define FASTSPEC_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTSPEC_TARGET_AVX512
#define FASTSPEC_TARGET_AVX2
#endif
#if defined(__GNUC__) || defined(__clang__)
#define FASTSPEC_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTSPEC_ALWAYS_INLINE inline
#endif
// Given an always-inline NAME##_body, defines NAME##_isa(isa, ...) running the body compiled for that ISA,
// and NAME(...) running it for kernel_isa(). PARAMS and ARGS: the parenthesised parameter and argument lists.
#define FASTSPEC_KERNEL_VARIANTS(NAME, PARAMS, ARGS)                                                   \
    namespace {                                                                                       \
    FASTSPEC_TARGET_AVX512 void NAME##_avx512 PARAMS { NAME##_body ARGS; }                             \
    FASTSPEC_TARGET_AVX2 void NAME##_avx2 PARAMS { NAME##_body ARGS; }                               \
    void NAME##_baseline PARAMS { NAME##_body ARGS; }                                                  \
    }                                                                                                 \
    void NAME##_isa(Isa isa, FASTSPEC_UNPAREN PARAMS) {                                                \
        (isa == Isa::avx512 ? NAME##_avx512 : isa == Isa::avx2 ? NAME##_avx2 : NAME##_baseline) ARGS;  \
    }                                                                                                 \
    void NAME PARAMS { NAME##_isa(kernel_isa(), FASTSPEC_UNPAREN ARGS); }
#define FASTSPEC_UNPAREN(...) __VA_ARGS__

namespace fastspec::detail {

// CRC-32 (IEEE 802.3, the zlib polynomial) of a byte range.
std::uint32_t crc32(const std::uint8_t* data, std::size_t n);

// Label handling, the one place that knows the normalisation (labels.cpp).
// validate_inputs throws InputError for the first bad label (or z entry); it reads everything
// and writes nothing, so forward() can check all rows before producing any output.
void validate_inputs(const Model& model, const double* labels, std::size_t n, const float* z, bool clip);
// Writes rows [z | normalised network labels] of the decoder input, row-major with input_dim() columns.
// Labels are clamped to the range when clip is true (validate_inputs already ran).
void make_input_rows(const Model& model, const double* labels, const float* z, std::size_t rows, bool clip,
                     float* dst);
// d(normalised network input t)/d(label t) of rows (rows, n_network_labels), 0 for a label that clip clamps:
// the input tangents of the forward-mode Jacobian (CPU and CUDA backends).
void network_tangent_scales(const Model& model, const double* labels, std::size_t rows, bool clip, float* dst);

namespace cpu {
// The dense layers of the CPU backend (cpu/dense.cpp). x is (rows, in), W is (out, in) row-major,
// y is (rows, out). GEMV at rows == 1, GEMM otherwise, then one fused epilogue pass.
void dense_relu(const float* x, std::size_t rows, const float* W, const float* b, int in, int out, float* y);
void dense_sigmoid_output(const float* x, std::size_t rows, const float* W, const float* b, int in, int out,
                          float scale, float offset, float* y);
// Batch-1 y = W x reading 16-bit weights (f16, or bf16 when bf16 is true) directly; AVX-512F only:
// call it only when have_avx512f(), i.e. kernel_isa() is avx512 (cpu/gemv16_avx512.cpp).
bool have_avx512f() noexcept;
void gemv16(const std::uint16_t* W, bool bf16, int in, int out, const float* x, float* y);
// Y (k, out) = X (k, in) W^T for k vectors at once, W read from memory once (AVX-512F only, like gemv16).
void gemv16_multi(const std::uint16_t* W, bool bf16, int in, int out, const float* X, int k, float* Y);
// The same dense layers at batch 1 from 16-bit weights (gemv16 + the fused epilogues).
void dense_relu_16(const float* x, const std::uint16_t* W, bool bf16, const float* b, int in, int out, float* y);
void dense_sigmoid_output_16(const float* x, const std::uint16_t* W, bool bf16, const float* b, int in, int out,
                             float scale, float offset, float* y);
// The fused epilogues, exposed for tests/cpp/test_kernels.cpp.
float fast_exp(float x);
void bias_relu(float* y, std::size_t rows, const float* b, int out);
void bias_sigmoid_output(float* y, std::size_t rows, const float* b, int out, float scale, float offset);

// The instruction sets the multiversioned kernels are compiled for (FASTSPEC_KERNEL_VARIANTS).
enum class Isa { baseline, avx2, avx512 };
const char* isa_name(Isa isa) noexcept;
bool isa_supported(Isa isa) noexcept;  // this CPU (and this build) can run the variant
// The variant every kernel call uses, chosen once per process: FASTSPEC_FORCE_ISA when set (a value that is
// not avx512 / avx2 / baseline, or that this CPU cannot run, stops the process with a message on stderr:
// a test must never silently run another variant than the one it names), else the best supported one.
Isa kernel_isa() noexcept;
// One explicit variant of each multiversioned kernel, whatever kernel_isa() says (for the tests).
void bias_relu_isa(Isa isa, float* y, std::size_t rows, const float* b, int out);
void bias_sigmoid_output_isa(Isa isa, float* y, std::size_t rows, const float* b, int out, float scale,
                             float offset);
void correlate_isa(Isa isa, const float* x, int n, const float* k, int half, float* y);
// OpenBLAS's (process-global) thread count: set only when it differs.
void ensure_blas_threads(int threads);
std::string blas_config();
}  // namespace cpu

}  // namespace fastspec::detail
