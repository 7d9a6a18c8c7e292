// Internal interfaces between the parts of the core (not installed).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "fastspec/fastspec.hpp"

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC/Clang function
// multiversioning), so a portable build still runs them at full width. Off under the sanitizers and where the
// C library lacks ifunc (CMake's FASTSPEC_NO_MULTIVERSION).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(FASTSPEC_NO_MULTIVERSION)
#define FASTSPEC_MULTIVERSION __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define FASTSPEC_MULTIVERSION
#endif

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

namespace cpu {
// The dense layers of the CPU backend (cpu/dense.cpp). x is (rows, in), W is (out, in) row-major,
// y is (rows, out). GEMV at rows == 1, GEMM otherwise, then one fused epilogue pass.
void dense_relu(const float* x, std::size_t rows, const float* W, const float* b, int in, int out, float* y);
void dense_sigmoid_output(const float* x, std::size_t rows, const float* W, const float* b, int in, int out,
                          float scale, float offset, float* y);
// Batch-1 y = W x reading 16-bit weights (f16, or bf16 when bf16 is true) directly; AVX-512F only:
// call it only when have_avx512f() (cpu/gemv16_avx512.cpp).
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
// OpenBLAS's (process-global) thread count: set only when it differs.
void ensure_blas_threads(int threads);
std::string blas_config();
}  // namespace cpu

}  // namespace fastspec::detail
